"""The engine: the decode loop over arrays (prefill, draft with the MTP head, verify in one trunk
forward, accept exactly, roll back), which yields a small `Step` record per verify, and `Engine`,
which runs it through the stream layer (mtpnb.stream: text, stop strings, events, the Result), as
mlx-lm's `generate_step` / `stream_generate` are split. Depth 0 (plain autoregressive decoding, the
baseline) shares the prefill, the target distribution (`Sampling`) and the stream layer, and is
pipelined as mlx-lm does. `Engine(model, profile=True)` times every phase behind an eval barrier
(the bench's phase profile); otherwise no sync exists for timing alone.

State between steps (n = committed tokens so far, x_n the newest, not yet fed to the trunk):
- the trunk's caches hold positions < n;
- `pending_hidden` holds the trunk's hidden states at the positions the head has not seen yet, and
  `pending_tokens` the token that followed each of them (the last one is x_n). The head's first
  draft step runs over all of them at once (the prompt's last prefill chunk, the head having read
  the others during the prefill; then the j+1 positions a verify commits); its later steps feed back their own output on one row each and are trimmed
  from the head's cache after the verify.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import threading
import time
from collections.abc import Iterator

import mlx.core as mx

from .errors import MTPNBError
from .events import Done, Result, StepEvent, TokenEvent, final_result
from .params import GenerationParams
from .prompt_cache import PromptCache, trunk_state
from .rollback import rollback_cache
from .runtime import runtime
from .sampling import Sampling, accept_greedy, accept_sampled, next_greedy, sample
from .stream import GenerationStream, Step

# Prompt tokens per prefill forward. A cancellation (a hang-up, a Stop) waits for the forward in
# progress: on a GPU 512 tokens take milliseconds (mlx-lm prefills 2048 at a time), on 2 CPU cores a
# 512-token forward of the default model took 0.75-2 s, 128 tokens a quarter of that. Fixed sizes, not
# timed ones: where the chunks end changes the floating-point rounding, and a prompt must give the same
# numbers in every process (the server's and its client's comparison, a rerun with the same seed).
PREFILL_CHUNK_GPU, PREFILL_CHUNK_CPU = 512, 128


class Engine:
    """Runs generations on one Model. Not re-entrant: one generation at a time per engine.

    Threads: a generation started on the main thread runs there; one started on any other thread
    runs on the MLX runtime's thread (mtpnb.runtime), its events handed back as they come, so
    generations from threads never overlap and MLX's per-thread streams never outlive the process."""

    def __init__(self, model, *, profile: bool = False):
        self.model = model
        self.profile = profile  # phase timings on every StepEvent, with eval barriers (the bench's profile)

    def generate(self, prompt, **params) -> Result:
        return final_result(self.stream(prompt, **params))

    def stream(self, prompt, *, cache: PromptCache | None = None, tools: list | None = None,
               opening: str | None = None, history: int | None = None, **params) -> "Generation":
        """Yield events as tokens are decided. Validates everything before the first yield;
        closing the iterator early, or cancel() from any thread, cancels the generation (the engine
        stays usable). `cache`: a PromptCache to start from the longest cached state the prompt
        extends, and to keep this generation's states in (mtpnb.prompt_cache). `tools`, `opening`: see
        encode. `history`: for a chat prompt already encoded (token ids), `history_length`'s answer
        (computed here for chat messages), where the prompt cache also keeps the state."""
        if cache is not None and not isinstance(cache, PromptCache):
            raise MTPNBError(f"cache must be an mtpnb.PromptCache, got {type(cache).__name__}")
        gp = GenerationParams.of(**params)
        ids = self.encode(prompt, chat=gp.chat, reasoning=gp.reasoning, tools=tools, opening=opening)
        vocab = self.model.text_config.get("vocab_size")
        if vocab and max(ids) >= vocab:
            raise MTPNBError(f"token id {max(ids)} is outside the model's vocabulary of {vocab}")
        context = self.model.text_config.get("max_position_embeddings")
        if context and len(ids) >= context:
            raise MTPNBError(f"the prompt has {len(ids)} tokens, past what {self.model.name} reads "
                             f"({context} positions, max_position_embeddings, the answer included): shorten it")
        if context:  # the answer ends ("length") where the model's context does, if that comes first
            gp = dataclasses.replace(gp, max_tokens=min(gp.max_tokens, context - len(ids)))
        cancelled = threading.Event()
        if cache is not None and history is None:  # where the conversation so far ends: kept there too
            history = self.history_length(prompt, ids, chat=gp.chat, reasoning=gp.reasoning, tools=tools)
        events = self._generation(ids, gp, cancelled, cache, history)
        if not (threading.current_thread() is threading.main_thread() or runtime().on_thread()):
            events = runtime().iterate(events)  # another thread's generation runs on the MLX thread (mtpnb.runtime)
        return Generation(events, cancelled)

    def _generation(self, ids: list[int], params: GenerationParams, cancelled: threading.Event,
                    prompt_cache: PromptCache | None, history: int | None) -> Iterator[TokenEvent | StepEvent | Done]:
        """The loop's steps through the stream layer (runs when first iterated)."""
        model = self.model
        mx.reset_peak_memory()
        depth = params.depth if model.has_mtp else 0
        loop = DecodeLoop(model, ids, Sampling(*params.sampling_settings), depth, self.profile, cancelled,
                          prompt_cache, history, seed=params.seed)
        text = GenerationStream(model.tokenizer, ids, params, depth=depth,
                                eos=set(model.tokenizer.eos_token_ids or ()), memory=memory_mb)
        try:
            yield from text.run(loop.steps())
        finally:
            release_memory()

    def encode(self, prompt, *, chat: bool = False, reasoning: bool | None = None,
               tools: list | None = None, opening: str | None = None) -> list[int]:
        """Prompt (text, token ids, or chat messages) -> token ids. `tools` (OpenAI's function tools)
        are rendered by the chat template, for templates that render them. `opening`: text the answer
        starts with, as if the model had written it (the server's forced tool call opens the call)."""
        tokenizer = self.model.tokenizer
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise MTPNBError(f"{self.model.name}'s tokenizer has no chat template: pass the prompt as text")
            if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
                raise MTPNBError("chat messages must be dicts with string 'role' and 'content'")
            ids = self.render_chat(prompt, add_generation_prompt=True, reasoning=reasoning, tools=tools)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(t < 0 for t in ids):
                raise MTPNBError("token ids must be >= 0")
        else:
            raise MTPNBError("prompt must be text, a list of token ids, or a list of chat messages")
        if not ids:
            raise MTPNBError("the prompt is empty: give at least one token")
        if opening:
            ids = list(ids) + tokenizer.encode(opening, add_special_tokens=False)
        return list(ids)

    def history_length(self, prompt, ids: list[int], *, chat: bool = False, reasoning: bool | None = None,
                       tools: list | None = None) -> int | None:
        """For a chat prompt: how many of its tokens are the conversation so far, without the
        generation prompt that opens the assistant's turn (None if that is not a prefix of `ids`).
        The next turn's prompt starts with them, even where the chat template renders this turn's
        answer otherwise than it was generated (Qwen3.5's drops the empty thinking block), so the
        prompt cache keeps the state there."""
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        if not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)):
            return None
        history = self.render_chat(prompt, add_generation_prompt=False, reasoning=reasoning, tools=tools)
        n = len(history)
        return n if 0 < n < len(ids) and history == ids[:n] else None

    def render_chat(self, messages, *, add_generation_prompt: bool, reasoning: bool | None,
                    tools: list | None) -> list[int]:
        """Chat messages -> token ids, through the tokenizer's chat template. A template that refuses the
        messages (Qwen's raise_exception on a role they do not know, say) is the caller's error."""
        from jinja2 import TemplateError  # transformers' chat templates are jinja2

        extra = {} if reasoning is None else {"enable_thinking": reasoning}
        if tools:
            extra["tools"] = tools
        try:
            ids = self.model.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                           tokenize=True, **extra)
        except TemplateError as e:
            raise MTPNBError(f"{self.model.name}'s chat template refused the messages: {e}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)  # transformers 5 may return a BatchEncoding


class Generation(Iterator):
    """What Engine.stream returns: the generation's events. close() ends it, and so does cancel(),
    which any thread may call while another iterates (a server's handler when its client hangs up, a
    widget's Stop): the decode loop checks between prefill chunks and between steps, and the events
    end with Done (finish_reason "cancelled")."""

    def __init__(self, events: Iterator, cancelled: threading.Event):
        self._events = events
        self._cancelled = cancelled

    def __next__(self):
        return next(self._events)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.cancel()
        try:
            self._events.close()
        except ValueError:  # running on another thread: it sees the cancellation at its next check
            pass


class DecodeLoop:
    """One generation's decode loop over arrays (created per call; holds its own caches and random
    key): yields a Step per verify (per token at depth 0), the decision on the host; ends early once
    `cancelled`. Its key is mx.random.key(seed), or drawn from MLX's global random state without a
    seed, then split for every draw: a seeded generation is the same whatever else ran meanwhile."""

    def __init__(self, model, prompt_ids: list[int], sampling: Sampling, depth: int, profile: bool = False,
                 cancelled: threading.Event | None = None, prompt_cache: PromptCache | None = None,
                 history: int | None = None, *, seed: int | None = None):
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.depth = depth
        self.profile = profile
        self.cancelled = cancelled or threading.Event()
        self.prompt_cache = prompt_cache
        self.reuse = None  # the prompt cache's part in this generation (mtpnb.prompt_cache.Reuse)
        self.reused = 0  # prompt tokens whose state came from the prompt cache
        self.history = history  # prompt tokens of the conversation so far: the cache keeps the state there too
        self.trunk_at_history = None  # the trunk's state there, taken during the prefill
        self.fed = list(prompt_ids)  # the tokens the trunk's caches hold at the last yield
        self.live = None  # (trunk caches, head cache, pending hidden) at the last yield
        self.vocabulary = None  # what the head drafts from (mtpnb.model.DraftVocabulary; None: the model's all)
        self._key = None
        if not sampling.greedy:
            self._key = (mx.random.key(seed) if seed is not None
                         else mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32))

    def _draw_key(self) -> mx.array | None:
        """A fresh key for one draw (None at greedy: nothing is drawn)."""
        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key

    def steps(self) -> Iterator[Step]:
        try:
            for step in self._speculative() if self.depth else self._plain():
                if self.cancelled.is_set():
                    return
                yield step
        except GeneratorExit:  # the stream layer ended the generation (EOS, stop, length): keep its state
            if self.reuse is not None and not self.cancelled.is_set() and len(self.fed) > len(self.prompt_ids):
                self.reuse.keep(self.fed, *self.live, answer=True)
            raise
        finally:  # the caches are freed now, before the engine empties MLX's buffer cache
            self.live = self.trunk_at_history = None

    def _start(self, cache, head_cache=None):
        """Load the longest cached state the prompt extends into the fresh caches; -> the hidden
        states the head has not consumed yet (None: nothing cached, or depth 0)."""
        if self.prompt_cache is None:
            return None
        self.reuse = self.prompt_cache.lookup(self.model, self.prompt_ids, speculative=head_cache is not None)
        self.reused = self.reuse.tokens
        return self.reuse.restore(cache, head_cache)

    def _prefill(self, cache, head_cache=None, pending=None):
        """The trunk over the prompt from where the prompt cache left it, a chunk at a time
        (PREFILL_CHUNK_CPU/GPU tokens), each chunk's cache state evaluated and MLX's buffer cache cleared
        after it (mlx-lm's pattern); with head_cache, the head too reads every chunk but the last (whose
        last position waits for the first generated token), so that no forward runs over the whole prompt
        at once. `pending`: hidden states the head has not read yet (from the prompt cache). A chunk ends
        where the conversation so far does when the prompt cache keeps the state there.
        -> (the hidden states the head has not read [1, n, H] (None without head_cache), the position of
        the first of them, the logits at the last position [V]); None when cancelled between chunks."""
        model, ids, size = self.model, self.prompt_ids, (PREFILL_CHUNK_CPU if mx.default_device() == mx.cpu
                                                         else PREFILL_CHUNK_GPU)
        cut = self.history if self.reuse is not None and self.history and self.reused < self.history < len(ids) else 0
        start = self.reused
        first = start - (0 if pending is None else pending.shape[1])  # the position of pending[0]
        while True:
            if self.cancelled.is_set():
                return None
            end = min(start + size, len(ids))
            if start < cut < end:
                end = cut
            hidden, logits = model.forward(mx.array(ids[start:end])[None], cache=cache, last_only=True)
            if head_cache is not None:
                pending = hidden if pending is None else mx.concatenate([pending, hidden], axis=1)
            if end == len(ids):
                return pending, first, logits[0, -1]
            state = [c.state for c in cache]
            if head_cache is not None:  # the head pairs each position with the token after it
                if end == cut:  # the state at the end of the conversation so far: its last position pending
                    first = self._head_reads(head_cache, pending[:, :-1], first)
                    pending = pending[:, -1:]
                    self.reuse.keep(ids[:end], trunk_state(cache), head_cache, pending, answer=False)
                first = self._head_reads(head_cache, pending, first)
                pending = None
                state.append(head_cache.state)
            elif end == cut:
                self.trunk_at_history = trunk_state(cache)
            mx.eval(state)
            mx.clear_cache()
            start = end

    def _head_reads(self, head_cache, hidden, first: int) -> int:
        """The head reads hidden states [1, n, H] of positions first.. with the tokens after them;
        -> the position after the last one read."""
        n = hidden.shape[1]
        if n:
            self.model.head(hidden, self.model.embed(mx.array(self.prompt_ids[first + 1:first + n + 1])[None]),
                            cache=head_cache)
        return first + n

    def _speculative(self) -> Iterator[Step]:
        """Depth >= 1: draft, verify, accept, roll back (plain decoding is `_plain`)."""
        model = self.model
        cache, head_cache = model.make_cache(), model.make_head_cache()
        pending = self._start(cache, head_cache)
        prefilled = self._prefill(cache, head_cache, pending)
        if prefilled is None:
            return
        pending_hidden, first, last_logits = prefilled
        token, p_token = token_to_host(next_token(self.sampling, last_logits, self._draw_key()))
        self.vocabulary = model.draft_vocabulary(self.prompt_ids + [token])
        first_token_at = time.perf_counter()
        # The head catches up with the last chunk but its last position (whose next token is the one
        # just decided): the state at the end of the prompt, which the prompt cache keeps.
        self._head_reads(head_cache, pending_hidden[:, :-1], first)
        pending_hidden = pending_hidden[:, -1:]
        pending_tokens = [token]
        self.live = (cache, head_cache, pending_hidden)
        if self.reuse is not None:
            self.reuse.keep(self.prompt_ids, *self.live, answer=False)
        yield Step(0, [], [], [], 0, token, p_token, first_token_at=first_token_at, cached_tokens=self.reused)
        step = 0
        while True:
            step += 1
            t0 = time.perf_counter()
            drafts, draft_dists, draft_columns, cached_drafts = self._draft(pending_hidden, pending_tokens, head_cache)
            if self.profile:  # a barrier only the timing needs: otherwise the verify's sync computes them
                mx.eval(drafts, draft_dists, draft_columns)
            t1 = time.perf_counter()
            verify_in = mx.concatenate([mx.array([token], dtype=mx.int32), drafts.astype(mx.int32)])[None]
            hidden, logits = model.forward(verify_in, cache=cache)
            if self.profile:
                mx.eval(hidden, logits)
            t_forward = time.perf_counter()
            fed = token
            n_accepted, token, p_drafts, q_drafts, p_token = to_host(
                self._accept(logits[0], draft_dists, drafts, draft_columns))
            draft_ids = drafts.tolist()
            t2 = time.perf_counter()
            K = len(draft_ids)
            rollback_cache(cache, keep=n_accepted + 1, discard=K - n_accepted)
            head_cache.trim(cached_drafts)
            phases = None
            if self.profile:
                phases = {"verify_forward_s": t_forward - t1, "accept_sync_s": t2 - t_forward,
                          "rollback_s": time.perf_counter() - t2}
            pending_hidden = hidden[:, : n_accepted + 1]
            pending_tokens = draft_ids[:n_accepted] + [token]
            if self.vocabulary is not None:  # the drafts accepted are in it already
                self.vocabulary.add([token])
            self.fed += [fed] + draft_ids[:n_accepted]
            self.live = (cache, head_cache, pending_hidden)
            yield Step(step, draft_ids, p_drafts, q_drafts, n_accepted, token, p_token, t1 - t0, t2 - t1, phases)

    def _plain(self) -> Iterator[Step]:
        """Depth 0, pipelined as mlx-lm's generate_step is: the forward of token n+1 is queued on the
        device (mx.async_eval, its input the still-lazy token n) before the host waits for token n, so
        building the next graph, the events and the detokenization (the stream layer's work, done
        while this generator is suspended) overlap the device's work instead of leaving it idle. One
        forward too many at the end, discarded with the cache.
        Step.verify_s is the wait for token n, the next graph's building included."""
        model = self.model
        cache = model.make_cache(rollback=False)
        self._start(cache)
        self.live = (cache,)
        prefilled = self._prefill(cache)
        if prefilled is None:
            return
        decision = next_token(self.sampling, prefilled[2], self._draw_key())
        step = 0
        while True:
            t0 = time.perf_counter()
            if step == 0:  # the first token reaches the host before anything is queued
                token, p_token = token_to_host(decision)
                first_token_at = time.perf_counter()
                if self.trunk_at_history is not None:
                    self.reuse.keep(self.prompt_ids[:self.history], self.trunk_at_history, answer=False)
                if self.reuse is not None:  # the prompt's state, before the first token enters the caches
                    self.reuse.keep(self.prompt_ids, cache, answer=False)
            t_forward = time.perf_counter()
            _, logits = model.forward(decision[0].reshape(1, 1), cache=cache)
            if self.profile:  # serializes the pipeline: the phases say where the work goes, not how fast
                mx.eval(logits)
            t_queued = time.perf_counter()
            queued = next_token(self.sampling, logits[0, 0], self._draw_key())
            mx.async_eval(queued)
            if step:
                token, p_token = token_to_host(decision)
            phases = None
            if self.profile:  # step 0's token is the prefill's: its sync is the TTFT's
                phases = {"verify_forward_s": t_queued - t_forward,
                          "accept_sync_s": time.perf_counter() - t_queued if step else 0.0, "rollback_s": 0.0}
            self.fed.append(token)  # its forward is queued: the caches hold it
            if step == 0:
                yield Step(0, [], [], [], 0, token, p_token, phases=phases, first_token_at=first_token_at,
                           cached_tokens=self.reused)
            else:
                yield Step(step, [], [], [], 0, token, p_token, 0.0, time.perf_counter() - t0, phases)
            decision, step = queued, step + 1

    def _draft(self, pending_hidden, pending_tokens, head_cache):
        return draft(self.model, self.sampling, self.depth, pending_hidden, pending_tokens, head_cache, self._draw_key,
                     self.vocabulary)

    def _accept(self, logits, draft_dists, drafts, draft_columns):
        """The verdict on the drafts; q stays on the draft vocabulary (the acceptance reads it at the
        drafts' columns, and brings only the row it samples from to the whole vocabulary)."""
        if self.sampling.greedy:
            return accept_greedy(logits, draft_dists, drafts, draft_columns)
        return accept_sampled(self.sampling.logprobs(logits), draft_dists, drafts, self._draw_key(), draft_columns,
                              self.model.draft_ids(self.vocabulary))


def release_memory() -> None:
    """After a generation: MLX's buffer cache emptied, and on glibc the freed heap given back to the
    system (glibc keeps it otherwise: a long prompt's buffers stayed resident, +34% RSS)."""
    mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def memory_mb() -> tuple[float, float]:
    """MLX's active memory and its peak since the current generation started, in MB."""
    return mx.get_active_memory() / 2**20, mx.get_peak_memory() / 2**20


def to_host(decision):
    """One synchronisation: the acceptance decision as Python values."""
    n_accepted, token, p_drafts, q_drafts, p_token = decision
    mx.eval(n_accepted, token, p_drafts, q_drafts, p_token)
    return n_accepted.item(), token.item(), p_drafts.tolist(), q_drafts.tolist(), p_token.item()


def next_token(sampling: Sampling, logits: mx.array, key: mx.array | None) -> tuple[mx.array, mx.array]:
    """Plain decoding's choice from one row of logits (also the first token after a prefill), with a
    random key when sampling: lazy (token, its probability under the target)."""
    if sampling.greedy:
        return next_greedy(logits)
    return sample(sampling.logprobs(logits), key)


def draft(model, sampling: Sampling, depth: int, pending_hidden: mx.array, pending_tokens: list[int], head_cache,
          draw_key, vocabulary=None) -> tuple[mx.array, mx.array, mx.array, int]:
    """One round of `depth` drafts from the positions the head has not read yet (pending_hidden [1, n, H],
    pending_tokens the token after each; `draw_key()` gives each draw's key): drafts [K], what they were
    drawn from [K, Vq] (log-probs when sampling, raw logits at greedy; over the draft vocabulary: the
    generation's `vocabulary` (mtpnb.model.DraftVocabulary), else the model's shortlist, else the whole
    vocabulary), each draft's column in it [K], and how many draft rows
    entered the head's cache (the verify's rollback takes them back). Step 0 runs over every pending
    position (they enter the head's cache) and only its last row drafts; in C where the kernel applies
    (Model.draft_round), the whole round in one call: its drafts drawn in C when sampling, from the
    distributions it returns (the acceptance reads those)."""
    in_c = model.draft_round(pending_hidden, pending_tokens, head_cache, depth, vocabulary)
    if in_c is not None:
        ids = model.draft_ids(vocabulary)
        if sampling.greedy:
            columns, dists = in_c.greedy()
        else:
            columns, dists = in_c.sampled(sampling.temperature, sampling.top_p, sampling.min_p, sampling.top_k,
                                          mx.random.uniform(shape=(depth,), key=draw_key()))
        return (columns if ids is None else ids[columns]), dists, columns, 0
    g = model.head(pending_hidden, model.embed(mx.array(pending_tokens)[None]), cache=head_cache)[:, -1:]
    draws = [draft_token(model, sampling, g, draw_key(), step=0, vocabulary=vocabulary)]
    for j in range(1, depth):
        g = model.head(g, model.embed(draws[-1][0].reshape(1, 1)), cache=head_cache, step=j)
        draws.append(draft_token(model, sampling, g, draw_key(), step=j, vocabulary=vocabulary))
    drafts, dists, columns = (mx.stack(a) for a in zip(*draws))
    return drafts, dists, columns, depth - 1


def draft_token(model, sampling: Sampling, g: mx.array, key: mx.array | None,
                step: int = 0, vocabulary=None) -> tuple[mx.array, mx.array, mx.array]:
    """One draft from the head's last output g [1, T, H] at draft step `step`, with a random key when
    sampling, from `vocabulary` (see draft): (token id, the distribution it was drawn from over the draft
    vocabulary: log-probs when sampling, raw logits at greedy, and the token's column in it)."""
    dist = model.draft_logits(g, step, vocabulary)[0, -1]
    dist = dist if sampling.greedy else sampling.logprobs(dist)
    column = mx.argmax(dist, axis=-1) if sampling.greedy else sample(dist, key)[0]
    ids = model.draft_ids(vocabulary)
    return (column if ids is None else ids[column]), dist, column


def token_to_host(decision):
    token, p_token = decision
    mx.eval(token, p_token)
    return token.item(), p_token.item()
