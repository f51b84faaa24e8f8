"""A generation's figures (`Metrics`), computed in one place from its token events and step events.

Pure Python, no MLX: the engine calls it when a generation ends, the widgets for a generation that was
stopped half-way, the bench for its rows and the remote client gets the engine's result over the wire,
so every front end shows the same numbers for the same steps. Memory is the engine's to measure
(`Engine.memory_mb`): it is passed in.

Definitions (step 0 is the prefill's token; the verify steps are the others):
- decode tok/s: tokens after the first / time after the first token;
- end-to-end tok/s: all generated tokens / the whole wall time, prefill included;
- acceptance by position j: P(the draft at position j is kept | the verify reached it), where a verify
  reaches position j when every draft before it was kept; a draft cut by the end of the generation
  (EOS, a stop string, max_tokens) counts as not kept;
- a loop: some 8-token span of the generated ids occurs 3 or more times (issue 19's definition; in 128
  tokens, text nobody wants, and easy for a head to draft, so acceptance on it overstates what text that
  does not loop gets).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .events import Metrics, StepEvent, TokenEvent

LOOP_SPAN, LOOP_REPEATS = 8, 3


def loops(ids: Sequence[int], span: int = LOOP_SPAN, repeats: int = LOOP_REPEATS) -> bool:
    """Some `span`-token window occurs `repeats` or more times (overlapping occurrences count)."""
    counts = Counter(tuple(ids[i : i + span]) for i in range(len(ids) - span + 1))
    return bool(counts) and max(counts.values()) >= repeats


def count_positions(step: StepEvent, reached: list[int], accepted: list[int]) -> None:
    """Add one verify step to per-position counts: reached[j] / accepted[j] for draft position j+1."""
    for j in range(min(step.accepted + 1, step.drafted, len(reached))):
        reached[j] += 1
        accepted[j] += j < step.accepted


def acceptance_counts(steps: Sequence[StepEvent], depth: int) -> tuple[list[int], list[int]]:
    """(reached, accepted) per draft position over verify steps (step 0, the prefill's, is none)."""
    reached, accepted = [0] * depth, [0] * depth
    for s in steps:
        if s.step > 0 and s.drafted:
            count_positions(s, reached, accepted)
    return reached, accepted


def acceptance_by_position(steps: Sequence[StepEvent], depth: int) -> list[float]:
    reached, accepted = acceptance_counts(steps, depth)
    return [a / r if r else 0.0 for a, r in zip(accepted, reached)]


def decode_rate_first(steps: Sequence[StepEvent], ttft: float, n: int) -> float:
    """Decode tok/s over the first n generated tokens (the first comes from the prefill)."""
    for s in steps[1:]:
        if s.generated >= min(n, steps[-1].generated):
            return (s.generated - 1) / (s.elapsed_s - ttft) if s.elapsed_s > ttft and s.generated > 1 else 0.0
    return 0.0


def compute_metrics(events: Sequence[TokenEvent], steps: Sequence[StepEvent], *, depth: int, ttft_s: float,
                    total_s: float, finish_reason: str, prompt_tokens: int = 0, cached_tokens: int = 0,
                    active_memory_mb: float = 0.0, peak_memory_mb: float = 0.0) -> Metrics:
    """The Metrics of a generation from what it yielded (events: every TokenEvent, rejected drafts
    included; steps: every StepEvent) and its clock (time to the first token, whole wall time)."""
    generated = steps[-1].generated if steps else 0
    m = Metrics(depth=depth, prompt_tokens=prompt_tokens, cached_prompt_tokens=cached_tokens,
                generated_tokens=generated, ttft_s=ttft_s,
                total_s=total_s, finish_reason=finish_reason, active_memory_mb=active_memory_mb,
                peak_memory_mb=peak_memory_mb)
    m.prefill_tok_s = (prompt_tokens - cached_tokens) / ttft_s if ttft_s > 0 else 0.0  # tokens prefilled
    if generated > 1 and total_s > ttft_s:
        m.decode_tok_s = (generated - 1) / (total_s - ttft_s)
    m.end_to_end_tok_s = generated / total_s if total_s > 0 else 0.0
    m.decode_tok_s_first32 = decode_rate_first(steps, ttft_s, 32)
    verify = [s for s in steps if s.step > 0]
    m.verify_calls = len(verify)
    m.drafted_tokens = sum(s.drafted for s in verify)
    m.accepted_drafts = sum(s.accepted for s in verify)
    m.rejected_drafts = m.drafted_tokens - m.accepted_drafts
    m.correction_tokens = sum(e.kind == "correction" for e in events)
    m.bonus_tokens = sum(e.kind == "bonus" for e in events)
    m.acceptance_rate = m.accepted_drafts / m.drafted_tokens if m.drafted_tokens else 0.0
    if depth:
        m.acceptance_by_position = acceptance_by_position(verify, depth)
    m.mean_tokens_per_verify = sum(s.emitted for s in verify) / len(verify) if verify else 0.0
    m.draft_s = sum(s.draft_s for s in verify)
    m.verify_s = sum(s.verify_s for s in verify)
    return m
