"""The decode loop: prefill, draft with the MTP head, verify in one trunk forward, accept exactly,
roll back, stream events. Depth 0 (plain autoregressive decoding, the baseline) shares the prefill,
the target distribution (`Sampling`) and the stopping (`_emit`), and is pipelined as mlx-lm does.

State between steps (n = committed tokens so far, x_n the newest, not yet fed to the trunk):
- the trunk's caches hold positions < n;
- `pending_hidden` holds the trunk's hidden states at the positions the head has not seen yet, and
  `pending_tokens` the token that followed each of them (the last one is x_n). The head's first
  draft step runs over all of them at once (the whole prompt after prefill, then the j+1 positions
  a verify commits); its later steps feed back their own output on one row each and are trimmed
  from the head's cache after the verify.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import mlx.core as mx

from .detokenizer import Detokenizer
from .errors import MTPNBError
from .events import Done, Metrics, Result, StepEvent, TokenEvent
from .sampling import Sampling, accept_greedy, accept_sampled, next_greedy, sample

MAX_DEPTH = 8


@dataclass(frozen=True)
class GenerationParams:
    depth: int = 3  # drafts per verify; 0 = plain autoregressive decoding
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (EOS always stops)
    chat: bool = False  # apply the chat template to a text prompt
    reasoning: bool | None = None  # chat templates with a thinking switch: on / off / template default
    sampling: Sampling = field(init=False)

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 0 <= self.depth <= MAX_DEPTH:
            raise MTPNBError(f"depth must be an integer from 0 (plain decoding) to {MAX_DEPTH}, not {self.depth!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MTPNBError(f"max_tokens must be an integer >= 1, not {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise MTPNBError(f"seed must be a non-negative integer or None, not {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise MTPNBError("stop must be a string or a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "sampling", Sampling(self.temperature, self.top_p, self.top_k, self.min_p))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]


class Engine:
    """Runs generations on one Model. Not re-entrant: one generation at a time per engine."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompt, **params) -> Result:
        for event in self.stream(prompt, **params):
            if isinstance(event, Done):
                return event.result
        raise AssertionError("stream ended without a result")

    def stream(self, prompt, **params) -> Iterator[TokenEvent | StepEvent | Done]:
        """Yield events as tokens are decided. Validates everything before the first yield;
        closing the iterator early cancels the generation (the engine stays usable)."""
        unknown = sorted(set(params) - set(GenerationParams.names()))
        if unknown:
            raise MTPNBError(f"unknown parameter {unknown[0]!r}; known: {', '.join(GenerationParams.names())}")
        gp = GenerationParams(**params)
        ids = self.encode(prompt, chat=gp.chat, reasoning=gp.reasoning)
        vocab = self.model.text_config.get("vocab_size")
        if vocab and max(ids) >= vocab:
            raise MTPNBError(f"token id {max(ids)} is outside the model's vocabulary of {vocab}")
        return _Generation(self.model, ids, gp).run()

    def encode(self, prompt, *, chat: bool = False, reasoning: bool | None = None) -> list[int]:
        """Prompt (text, token ids, or chat messages) -> token ids."""
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
            extra = {} if reasoning is None else {"enable_thinking": reasoning}
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, **extra)
            if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(t < 0 for t in ids):
                raise MTPNBError("token ids must be >= 0")
        else:
            raise MTPNBError("prompt must be text, a list of token ids, or a list of chat messages")
        if not ids:
            raise MTPNBError("the prompt is empty: give at least one token")
        return list(ids)


class _Generation:
    """One generation's state and loop (created per call; holds its own caches)."""

    def __init__(self, model, prompt_ids: list[int], params: GenerationParams):
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampling = params.sampling
        self.depth = params.depth if model.has_mtp else 0
        self.eos = set(model.tokenizer.eos_token_ids or ())
        self.detokenizer = Detokenizer(model.tokenizer, context=prompt_ids)
        self.vocab_size = model.text_config["vocab_size"]
        self.tokens: list[int] = []
        self.text = ""
        self.events: list[TokenEvent] = []
        self.steps: list[StepEvent] = []
        self.finish_reason = ""
        self._held: list[TokenEvent] = []  # queued events not yet yielded (see _release)
        depth = max(self.depth, 1)
        self.reached = [0] * depth  # verify steps whose draft at position j was tested
        self.accepted_at = [0] * depth

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Iterator[TokenEvent | StepEvent | Done]:
        if self.params.seed is not None:
            mx.random.seed(self.params.seed)
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        self.finish_reason = "cancelled"
        try:
            yield from (self._decode() if self.depth else self._decode_plain())
        finally:
            self.end = time.perf_counter()
        yield Done(self._result())

    def _decode(self):
        """Depth >= 1: draft, verify, accept, roll back (plain decoding is `_decode_plain`)."""
        model = self.model
        cache, head_cache = model.make_cache(), model.make_head_cache()
        hidden, logits = model.forward(mx.array(self.prompt_ids)[None], cache=cache)
        token, p_token = _plain_to_host(next_token(self.sampling, logits[0, -1]))
        self.ttft = time.perf_counter() - self.start
        pending_hidden = hidden
        pending_tokens = self.prompt_ids[1:] + [token]
        step = 0
        if (yield from self._emit(step, [], [], [], 0, token, p_token, 0.0, self.ttft)):
            return
        while True:
            step += 1
            t0 = time.perf_counter()
            drafts, draft_dists = self._draft(pending_hidden, pending_tokens, head_cache)
            mx.eval(drafts, draft_dists)
            t1 = time.perf_counter()
            verify_in = mx.concatenate([mx.array([token], dtype=mx.int32), drafts.astype(mx.int32)])[None]
            hidden, logits = model.forward(verify_in, cache=cache)
            n_accepted, token, p_drafts, q_drafts, p_token = _to_host(self._accept(logits[0], draft_dists, drafts))
            draft_ids = drafts.tolist()
            t2 = time.perf_counter()
            K = len(draft_ids)
            _rollback(cache, keep=n_accepted + 1, discard=K - n_accepted)
            head_cache.trim(K - 1)
            pending_hidden = hidden[:, : n_accepted + 1]
            pending_tokens = draft_ids[:n_accepted] + [token]
            if (yield from self._emit(step, draft_ids, p_drafts, q_drafts, n_accepted, token, p_token, t1 - t0, t2 - t1)):
                return

    def _decode_plain(self):
        """Depth 0, pipelined as mlx-lm's generate_step is: the forward of token n+1 is queued on the
        device (mx.async_eval, its input the still-lazy token n) before the host waits for token n, so
        building the next graph, the events and the detokenization overlap the device's work instead
        of leaving it idle. One forward too many at the end, discarded with the cache.
        StepEvent.verify_s is the wait for token n, the next graph's building included."""
        model = self.model
        cache = model.make_cache(rollback=False)
        _, logits = model.forward(mx.array(self.prompt_ids)[None], cache=cache)
        decision = next_token(self.sampling, logits[0, -1])
        step = 0
        while True:
            t0 = time.perf_counter()
            if step == 0:  # the first token reaches the consumer before anything is queued
                token, p_token = _plain_to_host(decision)
                self.ttft = time.perf_counter() - self.start
            _, logits = model.forward(decision[0].reshape(1, 1), cache=cache)
            queued = next_token(self.sampling, logits[0, 0])
            mx.async_eval(queued)
            if step:
                token, p_token = _plain_to_host(decision)
            wait = self.ttft if step == 0 else time.perf_counter() - t0
            if (yield from self._emit(step, [], [], [], 0, token, p_token, 0.0, wait)):
                return
            decision, step = queued, step + 1

    def _draft(self, pending_hidden, pending_tokens, head_cache):
        """Run the head depth times; return drafts [K] and what they were drawn from [K, V]
        (log-probs when sampling, raw logits at greedy; -inf outside a draft vocabulary)."""
        sampling, model = self.sampling, self.model
        # The first step runs over every pending position (they enter the head's cache); only the
        # last one drafts, so only its logits are computed.
        g = model.head(pending_hidden, model.embed(mx.array(pending_tokens)[None]), cache=head_cache)[:, -1:]
        drafts, dists = [], []
        for j in range(self.depth):
            draft, dist = draft_token(model, sampling, g)
            drafts.append(draft)
            dists.append(dist)
            if j + 1 < self.depth:
                g = model.head(g, model.embed(draft.reshape(1, 1)), cache=head_cache)
        dists = mx.stack(dists)
        if model.draft_vocab is not None:  # back to the whole vocabulary, zero probability elsewhere
            full = mx.full((self.depth, self.vocab_size), -mx.inf, dtype=dists.dtype)
            dists = mx.put_along_axis(full, mx.broadcast_to(model.draft_vocab, dists.shape), dists, axis=-1)
        return mx.stack(drafts), dists

    def _accept(self, logits, draft_dists, drafts):
        if self.sampling.greedy:
            return accept_greedy(logits, draft_dists, drafts)
        return accept_sampled(self.sampling.logprobs(logits), draft_dists, drafts)

    # -- output -----------------------------------------------------------------------------------
    def _emit(self, step, drafts, p_drafts, q_drafts, n_accepted, token, p_token, draft_s, verify_s):
        """Yield the step's events; return True when the generation is finished."""
        K = len(drafts)
        before = len(self.tokens)
        finished = False
        for j, d in enumerate(drafts[:n_accepted]):
            self.reached[j] += 1
            self.accepted_at[j] += 1
            finished = self._commit(d, "accepted", step, j + 1, p_drafts[j], q_drafts[j])
            if finished:
                break
        accepted = len(self.tokens) - before  # drafts kept in the output (the end may cut the step)
        if not finished:
            for j in range(n_accepted, K):
                if j == n_accepted:
                    self.reached[j] += 1
                self._queue(TokenEvent(drafts[j], self._piece(drafts[j]), "rejected", step, j + 1, p_drafts[j], q_drafts[j]))
            kind = "plain" if K == 0 else ("bonus" if n_accepted == K else "correction")
            finished = self._commit(token, kind, step, 0 if kind == "plain" else n_accepted + 1, p_token, None)
        yield from self._release(finished)
        now = time.perf_counter()
        event = StepEvent(step, K, accepted, len(self.tokens) - before, draft_s, verify_s, now - self.start, len(self.tokens))
        self.steps.append(event)
        yield event
        return finished

    def _commit(self, token, kind, step, position, p, q) -> bool:
        """Add an output token and queue its event; True when the generation must stop."""
        if token in self.eos:
            self.finish_reason = "stop"
            self._end_text()
            return True
        self.tokens.append(token)
        piece = self.detokenizer.add(token)
        last = len(self.tokens) >= self.params.max_tokens
        if last:
            piece += self.detokenizer.flush()
        self._queue(TokenEvent(token, piece, kind, step, position, p, q))
        if self._extend_text(piece):
            return True
        if last:
            self.finish_reason = "length"
            return True
        return False

    def _end_text(self) -> None:
        """At EOS: the text the detokenizer held back (a character the EOS left incomplete) goes to
        the last output token, whose event is still queued (`_release` waits while text is held)."""
        rest = self.detokenizer.flush()
        if rest:
            event = next(e for e in reversed(self._held) if e.kind != "rejected")
            event.text += rest
            self._extend_text(rest)

    def _extend_text(self, piece: str) -> bool:
        """Append an output piece; at a stop string, cut the text there and return True."""
        self.text += piece
        stop_at = self._stop_index(len(piece))
        if stop_at is None:
            return False
        self._cut_text(stop_at)
        self.finish_reason = "stop"
        return True

    def _queue(self, event: TokenEvent) -> None:
        self.events.append(event)
        self._held.append(event)

    def _release(self, finished: bool):
        """Yield the queued events, unless the text ends with what may be the start of a stop
        string, or the detokenizer holds text back: those wait, so that a stop string never reaches
        a consumer and held-back text has a queued event to land on (the events' pieces always add
        up to the final text)."""
        if finished or not (self.detokenizer.pending or self._stop_prefix_at_end()):
            yield from self._held
            self._held.clear()

    def _stop_prefix_at_end(self) -> bool:
        return any(self.text.endswith(s[:n]) for s in self.params.stop for n in range(1, len(s)))

    def _cut_text(self, stop_at: int) -> None:
        """End the text where a stop string starts, trimming the queued events' pieces."""
        excess = len(self.text) - stop_at
        self.text = self.text[:stop_at]
        for event in reversed(self._held):
            if excess == 0:
                break
            if event.kind != "rejected":
                cut = min(excess, len(event.text))
                event.text = event.text[: len(event.text) - cut]
                excess -= cut

    def _stop_index(self, new_chars: int) -> int | None:
        """Where the earliest stop string that ends in the new text starts, if any."""
        best = None
        for s in self.params.stop:
            i = self.text.find(s, max(0, len(self.text) - new_chars - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _piece(self, token: int) -> str:
        return self.model.tokenizer.decode([token])

    def _result(self) -> Result:
        return Result(list(self.tokens), self.text, self.events, self.steps, self._metrics())

    def _metrics(self) -> Metrics:
        m = Metrics(depth=self.depth, prompt_tokens=len(self.prompt_ids), generated_tokens=len(self.tokens))
        m.finish_reason = self.finish_reason
        m.total_s = self.end - self.start
        ttft = getattr(self, "ttft", m.total_s)
        m.ttft_s = ttft
        m.prefill_tok_s = len(self.prompt_ids) / ttft if ttft > 0 else 0.0
        if len(self.tokens) > 1 and m.total_s > ttft:
            m.decode_tok_s = (len(self.tokens) - 1) / (m.total_s - ttft)
        m.end_to_end_tok_s = len(self.tokens) / m.total_s if m.total_s > 0 else 0.0
        m.decode_tok_s_first32 = _first_tokens_rate(self.steps, ttft, 32)
        verify_steps = self.steps[1:]
        m.verify_calls = len(verify_steps)
        m.drafted_tokens = sum(s.drafted for s in verify_steps)
        m.accepted_drafts = sum(s.accepted for s in verify_steps)
        m.rejected_drafts = m.drafted_tokens - m.accepted_drafts
        m.correction_tokens = sum(1 for e in self.events if e.kind == "correction")
        m.bonus_tokens = sum(1 for e in self.events if e.kind == "bonus")
        m.acceptance_rate = m.accepted_drafts / m.drafted_tokens if m.drafted_tokens else 0.0
        if self.depth:
            m.acceptance_by_position = [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached)]
        m.mean_tokens_per_verify = sum(s.emitted for s in verify_steps) / len(verify_steps) if verify_steps else 0.0
        m.draft_s = sum(s.draft_s for s in verify_steps)
        m.verify_s = sum(s.verify_s for s in verify_steps)
        m.active_memory_mb = mx.get_active_memory() / 2**20
        m.peak_memory_mb = mx.get_peak_memory() / 2**20
        return m


def _to_host(decision):
    """One synchronisation: the acceptance decision as Python values."""
    n_accepted, token, p_drafts, q_drafts, p_token = decision
    mx.eval(n_accepted, token, p_drafts, q_drafts, p_token)
    return n_accepted.item(), token.item(), p_drafts.tolist(), q_drafts.tolist(), p_token.item()


def next_token(sampling: Sampling, logits: mx.array) -> tuple[mx.array, mx.array]:
    """Plain decoding's choice from one row of logits (also the first token after a prefill):
    lazy (token, its probability under the target)."""
    if sampling.greedy:
        return next_greedy(logits)
    return sample(sampling.logprobs(logits))


def draft_token(model, sampling: Sampling, g: mx.array) -> tuple[mx.array, mx.array]:
    """One draft from the head's last output g [1, T, H]: (token id, the distribution it was drawn
    from over the draft vocabulary: log-probs when sampling, raw logits at greedy)."""
    logits = model.draft_logits(g)[0, -1]
    dist = logits if sampling.greedy else sampling.logprobs(logits)
    index = mx.argmax(dist, axis=-1) if sampling.greedy else sample(dist)[0]
    return (index if model.draft_vocab is None else model.draft_vocab[index]), dist


def _plain_to_host(decision):
    token, p_token = decision
    mx.eval(token, p_token)
    return token.item(), p_token.item()


def _rollback(cache, keep: int, discard: int) -> None:
    """Forget the last `discard` of the `keep + discard` tokens the trunk just ran on."""
    for c in cache:
        if hasattr(c, "rollback"):
            c.rollback(keep)
        elif discard:
            c.trim(discard)


def _first_tokens_rate(steps: list[StepEvent], ttft: float, n: int) -> float:
    """Decode tok/s over the first n generated tokens (the first comes from the prefill)."""
    for s in steps[1:]:
        if s.generated >= min(n, steps[-1].generated):
            return (s.generated - 1) / (s.elapsed_s - ttft) if s.elapsed_s > ttft and s.generated > 1 else 0.0
    return 0.0
