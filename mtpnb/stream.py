"""The stream layer: the decode loop's steps (mtpnb.engine.DecodeLoop) -> output text (decoded in the
context of the prompt, mtpnb.detokenizer), stop strings and events, then the Result. No MLX here: as
mlx-lm's `stream_generate` over `generate_step`.

Per step the tokens are decided in order: the accepted drafts, then the rejected ones (shown, not
output), then the correction / bonus token ("plain" at depth 0). The generation ends at EOS, at a
stop string (cut from the text, never streamed: tokens whose text may begin one are held back until
it is clear) or at max_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .detokenizer import Detokenizer
from .events import Done, Result, StepEvent, TokenEvent
from .metrics import compute_metrics
from .params import GenerationParams


@dataclass(slots=True)
class Step:
    """One step of the decode loop, on the host: step 0 is the prefill's token (no drafts); a verify
    step carries its drafts and the verdict (how many were accepted, then the token that follows)."""

    index: int
    drafts: list[int]
    p_drafts: list[float]  # the drafts' probabilities under the target
    q_drafts: list[float]  # ... and under the draft distribution
    accepted: int  # the verdict: drafts accepted, a prefix
    token: int  # the correction (drafts rejected), bonus (all accepted) or plain token
    p_token: float
    draft_s: float = 0.0
    verify_s: float = 0.0  # step 0: filled in with the time to the first token
    phases: dict[str, float] | None = None  # when profiling
    first_token_at: float | None = None  # step 0: when the first token reached the host (perf_counter)
    cached_tokens: int = 0  # step 0: prompt tokens whose state came from a prompt cache (not prefilled)


class GenerationStream:
    """One generation's text and events, built from its steps."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: GenerationParams, *, depth: int, eos: set[int],
                 memory: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)):
        self.tokenizer = tokenizer
        self.params = params
        self.depth = depth
        self.prompt_tokens = len(prompt_ids)
        self.eos = eos
        self.memory = memory  # (active, peak) MB: the engine's to measure
        self.detokenizer = Detokenizer(tokenizer, context=prompt_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.events: list[TokenEvent] = []
        self.steps: list[StepEvent] = []
        self.finish_reason = ""
        self._held: list[TokenEvent | StepEvent] = []  # queued events not yet yielded (see _release)

    def run(self, steps: Iterator[Step]) -> Iterator[TokenEvent | StepEvent | Done]:
        """Yield the events of the steps as they come, then Done(result); closing this closes the loop."""
        self.start = time.perf_counter()
        self.finish_reason = "cancelled"
        try:
            for step in steps:
                if step.index == 0:
                    self.ttft = step.first_token_at - self.start
                    self.cached_tokens = step.cached_tokens
                    step.verify_s = self.ttft
                if (yield from self._emit(step)):
                    break
        finally:
            steps.close()
            self.end = time.perf_counter()
        yield Done(self._result())

    # -- one step ---------------------------------------------------------------------------------
    def _emit(self, s: Step):
        """Yield the step's events; return True when the generation is finished."""
        K = len(s.drafts)
        before = len(self.tokens)
        finished = False
        for j, d in enumerate(s.drafts[:s.accepted]):
            finished = self._commit(d, "accepted", s.index, j + 1, s.p_drafts[j], s.q_drafts[j])
            if finished:
                break
        accepted = len(self.tokens) - before  # drafts kept in the output (the end may cut the step)
        if not finished:
            for j in range(s.accepted, K):
                self._queue(TokenEvent(s.drafts[j], self._piece(s.drafts[j]), "rejected", s.index, j + 1,
                                       s.p_drafts[j], s.q_drafts[j]))
            kind = "plain" if K == 0 else ("bonus" if s.accepted == K else "correction")
            finished = self._commit(s.token, kind, s.index, 0 if kind == "plain" else s.accepted + 1, s.p_token, None)
        yield from self._release(finished)
        event = StepEvent(s.index, K, accepted, len(self.tokens) - before, s.draft_s, s.verify_s,
                          time.perf_counter() - self.start, len(self.tokens), s.phases)
        self.steps.append(event)
        if self._held:  # its tokens wait: so does the step, so that a consumer cut off after a step
            self._held.append(event)  # has all of its tokens (a partial result adds up)
        else:
            yield event
        return finished

    # -- text and stop strings ---------------------------------------------------------------------
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
            event = next(e for e in reversed(self._held) if _output(e))
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
            if _output(event):
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
        return self.tokenizer.decode([token])

    def _result(self) -> Result:
        active_mb, peak_mb = self.memory()
        metrics = compute_metrics(self.events, self.steps, depth=self.depth, prompt_tokens=self.prompt_tokens,
                                  ttft_s=getattr(self, "ttft", self.end - self.start), total_s=self.end - self.start,
                                  finish_reason=self.finish_reason, active_memory_mb=active_mb,
                                  cached_tokens=getattr(self, "cached_tokens", 0),
                                  peak_memory_mb=peak_mb)
        return Result(list(self.tokens), self.text, self.events, self.steps, metrics)


def _output(event: TokenEvent | StepEvent) -> bool:
    """An output token's event (not a rejected draft's, not a step's)."""
    return isinstance(event, TokenEvent) and event.kind != "rejected"
