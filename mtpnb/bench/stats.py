"""Statistics of the runs: medians, rates over runs, the speedup on completions that do not loop, and the
paired parity test (depth 0 / mlx-lm)."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

PARITY_GOAL = 0.97  # mtpnb depth 0 / mlx-lm plain decoding, the floor
MIN_PARITY_PAIRS = 6  # fewer paired runs than this get no verdict (quick mode has 2)


def median(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return float(statistics.median(values)) if values else None


def parity(ratios: Sequence[float], goal: float = PARITY_GOAL, level: float = 0.9, resamples: int = 2000) -> dict:
    """mtpnb depth 0 / mlx-lm from paired runs (the same prompt, one right after the other): the median
    ratio, a percentile-bootstrap interval for it (seeded: the same data give the same report) and
    whether the goal is met, missed, or not separable from it at this run's noise. `pairs` keeps the
    ratios in run order (repeats alternate which engine runs first)."""
    in_order = [r for r in ratios if r]
    if not in_order:
        return {}
    ratios = sorted(in_order)
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo = medians[int((1 - level) / 2 * resamples)]
    hi = medians[int((1 + level) / 2 * resamples) - 1]
    mid = statistics.median(ratios)
    interval = f"{mid:.3f}x, {100 * level:.0f}% interval {lo:.3f}-{hi:.3f} over {len(ratios)} paired runs"
    if len(ratios) < MIN_PARITY_PAIRS:
        verdict, text = "undecided", f"too few pairs for a verdict: {interval} (a default run has 18)"
    elif lo >= goal:
        verdict, text = "met", f"at least {goal}x: {interval}"
    elif hi < goal:
        verdict, text = "missed", (f"below {goal}x: {interval}; the phase profile's depth-0 rows show where "
                                   "mtpnb's step spends its time")
    else:
        verdict, text = "undecided", (f"not separable from {goal}x at this run's noise: {interval} "
                                      "(pairs range {:.2f}-{:.2f}); more --repeats or --prompts narrow it".format(
                                          ratios[0], ratios[-1]))
    return {"ratio": mid, "interval": [lo, hi], "level": level, "pairs": in_order, "goal": goal,
            "verdict": verdict, "text": text}


def decode_rate(runs: list[dict]) -> float | None:
    """Decode tok/s over runs: their tokens after the first / their time after the first token."""
    tokens = sum(max(x["tokens"] - 1, 0) for x in runs)
    seconds = sum(x["decode_s"] for x in runs)
    return tokens / seconds if seconds > 0 else None


def non_looping_speedup(per_repeat: list[list[dict]], base_per_repeat: list[list[dict]]) -> dict:
    """The speedup over the prompts whose completions loop neither in this configuration nor at depth 0
    (paired per repeat, as the speedup): acceptance on a loop is easy, so a model that loops shows a
    speedup its other text does not get. None where every prompt looped."""
    ratios, pairs = [], 0
    for runs, base_runs in zip(per_repeat, base_per_repeat):
        kept = [(x, b) for x, b in zip(runs, base_runs) if not x["loops"] and not b["loops"]]
        pairs += len(kept)
        rate, base_rate = decode_rate([x for x, _ in kept]), decode_rate([b for _, b in kept])
        if rate and base_rate:
            ratios.append(rate / base_rate)
    return {"speedup_non_looping": median(ratios), "non_looping_runs": pairs}


def end_to_end_rate(runs: list[dict]) -> float | None:
    """Tokens / whole-call time over runs, prefill included."""
    seconds = sum(x["total_s"] for x in runs)
    return sum(x["tokens"] for x in runs) / seconds if seconds > 0 else None


def json_safe(o):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    return o
