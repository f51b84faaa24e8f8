"""The cost model: what one verify, one draft step and one acceptance cost with warm caches, and the
speedup bound they allow.

The speedup bound of depth D is  E[tokens per verify] / ((t_verify(D+1) + t_draft + (D-1) t_later) / t_1)
with E[tokens per verify] = 1 + mean accepted drafts per verify, measured in the runs, t_draft the first
draft step of a round and t_later each later one. Every time is wall time around an `mx.eval` barrier,
median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import mlx.core as mx

from ..engine import draft, next_token, to_host, token_to_host
from ..rollback import rollback_cache
from ..sampling import Sampling, accept_greedy, accept_sampled


def speedup_bound(tokens_per_verify: float, verify_ratio: float, draft_ratio: float, depth: int,
                  later_draft_ratio: float | None = None) -> float:
    """E[tokens per verify] / ((t_verify(D+1) + t_draft + (D-1) t_later) / t_1): the speedup over plain
    decoding if nothing but the trunk forwards and the head's steps cost time. `later_draft_ratio`: what
    each step after the first costs (draft_step_times); without it every step costs t_draft."""
    later = draft_ratio if later_draft_ratio is None else later_draft_ratio
    cost = verify_ratio + (draft_ratio + (depth - 1) * later if depth else 0.0)
    return tokens_per_verify / cost if cost > 0 else float("nan")


def expected_tokens_per_verify(acceptance_by_position: Sequence[float]) -> float:
    """1 + sum_k prod_{j<=k} a_j: tokens per verify from the per-position acceptance P(accept | reached)."""
    total, reach = 1.0, 1.0
    for a in acceptance_by_position:
        reach *= a
        total += reach
    return total


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over repeats."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def draft_step_times(model, sampling: Sampling, hidden: mx.array, token: int, head_cache, later_steps: int,
                     repeats: int, key: mx.array | None = None) -> tuple[float, float]:
    """(the first draft step, each later one) in seconds, as the engine drafts (mtpnb.engine.draft, to an
    eval barrier): a round of one draft from one pending position (hidden [1, 1, H], `token` after it;
    head_cache warm with the positions before), and what a round of 1 + later_steps drafts takes on top
    of it, per step (median of paired differences: slow drifts of a shared machine cancel). The cache is
    put back after every round."""

    def round_time(depth):
        t = time.perf_counter()
        drafts, dists, columns, cached = draft(model, sampling, depth, hidden, [token], head_cache, lambda: key)
        mx.eval(drafts, dists, columns, head_cache.state)  # step 0's rows in the cache: its work too
        elapsed = time.perf_counter() - t
        head_cache.trim(cached)  # the later steps' rows, as the verify's rollback takes them back
        for layer_cache in head_cache.caches:  # and step 0's, which entered every layer's cache
            layer_cache.trim(1)
        return elapsed

    for depth in (1, 1 + later_steps):  # warm-up of both shapes
        round_time(depth)
    firsts, extras = [], []
    for _ in range(repeats):
        firsts.append(round_time(1))
        extras.append((round_time(1 + later_steps) - firsts[-1]) / later_steps)
    return statistics.median(firsts), statistics.median(extras)


def measure_costs(model, context_ids: Sequence[int], max_depth: int, samplings: dict[str, Sampling],
                  repeats: int = 9) -> dict:
    """Verify-cost curve, draft-step and acceptance costs with warm caches at len(context_ids) tokens."""
    key = mx.random.key(0)  # one key for every timed draw: what is drawn does not matter, its cost does
    ids = mx.array(list(context_ids))[None]
    cache = model.make_cache()
    hidden, logits = model.forward(ids, cache=cache)
    mx.eval(hidden, logits, [c.state for c in cache])
    for c in cache:  # the prefill's tape is not a verify: nothing to roll back to
        if hasattr(c, "tape"):
            c.tape = None
    vocab = logits.shape[-1]
    max_m = max_depth + 1
    probe = mx.array(list(context_ids[-max_m:]) * max_m)[: max_m][None].astype(mx.int32)
    verify_times: dict[int, list[float]] = {m: [] for m in range(1, max_m + 1)}

    def verify(m):
        h, lg = model.forward(probe[:, :m], cache=cache)
        mx.eval(h, lg)
        return h, lg

    for m in range(1, max_m + 1):  # warm-up of every shape
        verify(m)
        rollback_cache(cache, keep=0, discard=m)
    for _ in range(repeats):
        for m in range(1, max_m + 1):
            t = time.perf_counter()
            verify(m)
            verify_times[m].append(time.perf_counter() - t)
            rollback_cache(cache, keep=0, discard=m)
    verify_s = {m: statistics.median(v) for m, v in verify_times.items()}
    t1 = verify_s[1]
    out = {
        "context_tokens": len(context_ids),
        "repeats": repeats,
        "t1_ms": t1 * 1e3,
        "verify_ms": [verify_s[m] * 1e3 for m in range(1, max_m + 1)],
        "verify_ratio": [verify_s[m] / t1 for m in range(1, max_m + 1)],
        "draft_step_ms": {},  # the first of a round, over one pending position
        "draft_ratio": {},
        "later_draft_step_ms": {},  # each later one
        "later_draft_ratio": {},
        "accept_ms": {},
    }
    if not model.has_mtp:
        return out
    # The head's cache warm with every position but the last two: a round reads the one before last (the
    # context's last token after it; the last position has none).
    head_cache = model.make_head_cache()
    model.head(hidden[:, :-2], model.embed(ids[:, 1:-1]), cache=head_cache)
    mx.eval(head_cache.state)
    _, verify_logits = verify(max_m)
    rollback_cache(cache, keep=0, discard=max_m)
    draft_logits = mx.stack([verify_logits[0, -1]] * max(max_depth, 1))
    for mode, sampling in samplings.items():
        t_draft, t_later = draft_step_times(model, sampling, hidden[:, -2:-1], context_ids[-1], head_cache,
                                            max(max_depth - 1, 1), repeats, key)
        out["draft_step_ms"][mode] = t_draft * 1e3
        out["draft_ratio"][mode] = t_draft / t1
        out["later_draft_step_ms"][mode] = t_later * 1e3
        out["later_draft_ratio"][mode] = t_later / t1
        accept_ms = []
        for k in range(max_depth + 1):
            lg = verify_logits[0, : k + 1]
            if k:  # (no empty arrays: MLX's CUDA backend faults on some zero-size kernels)
                rows = draft_logits[:k] if model.draft_vocab is None else draft_logits[:k, model.draft_vocab]
                q = rows if sampling.greedy else sampling.logprobs(rows)  # as the engine's, on the draft vocabulary
                columns = mx.argmax(q, axis=-1).astype(mx.int32)
                drafts = columns if model.draft_vocab is None else model.draft_vocab[columns]
                mx.eval(q, columns, drafts)

            def accept():
                if not k:  # no drafts: plain decoding's choice
                    token_to_host(next_token(sampling, lg[0], key))
                elif sampling.greedy:
                    to_host(accept_greedy(lg, q, drafts, columns))
                else:
                    to_host(accept_sampled(sampling.logprobs(lg), q, drafts, key, columns, model.draft_vocab))

            accept()
            accept_ms.append(median_time(accept, repeats) * 1e3)
        out["accept_ms"][mode] = accept_ms
    out["vocab_size"] = vocab
    return out
