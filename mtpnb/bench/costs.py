"""The cost model: what one verify, one draft step and one acceptance cost with warm caches, and the
speedup bound they allow.

The speedup bound of depth D is  E[tokens per verify] / (t_verify(D+1)/t_1 + D * t_draft/t_1)
with E[tokens per verify] = 1 + mean accepted drafts per verify, measured in the runs. Every time is
wall time around an `mx.eval` barrier, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import mlx.core as mx

from ..engine import draft_token, draw_draft, next_token, to_host, token_to_host
from ..rollback import rollback_cache
from ..sampling import Sampling, accept_greedy, accept_sampled


def speedup_bound(tokens_per_verify: float, verify_ratio: float, draft_ratio: float, depth: int,
                  later_draft_ratio: float | None = None) -> float:
    """E[tokens per verify] / ((t_verify(D+1) + t_draft + (D-1) t_later) / t_1): the speedup over plain
    decoding if nothing but the trunk forwards and the head's steps cost time. `later_draft_ratio`: what
    each step after the first costs when it differs (steps in C, mtpnb.cpu_kernels.HeadDraftSteps);
    without it every step costs t_draft."""
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
        "draft_step_ms": {},
        "draft_ratio": {},
        "later_draft_step_ms": {},  # the steps after the first, where the engine runs them otherwise
        "later_draft_ratio": {},
        "accept_ms": {},
    }
    if not model.has_mtp:
        return out
    head_cache = model.make_head_cache()
    g, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], cache=head_cache)
    mx.eval(g, head_cache.state)
    g = g[:, -1:]
    token = ids[:, -1:]
    _, verify_logits = verify(max_m)
    rollback_cache(cache, keep=0, discard=max_m)
    draft_logits = mx.stack([verify_logits[0, -1]] * max(max_depth, 1))
    for mode, sampling in samplings.items():
        def draft_step():  # the engine's own: head layer, draft-vocabulary logits, the draw
            g2 = model.head(g, model.embed(token), cache=head_cache, step=1)
            d, dist, _ = draft_token(model, sampling, g2, key, step=1)
            mx.eval(g2, d, dist)
            head_cache.trim(1)

        draft_step()
        t_draft = median_time(draft_step, repeats)
        out["draft_step_ms"][mode] = t_draft * 1e3
        out["draft_ratio"][mode] = t_draft / t1
        if model.draft_round(g, head_cache, 1) is not None:
            def later_step():  # the engine's steps after the first: in C (draws in MLX when sampling)
                later = model.draft_round(g, head_cache, 1)
                mx.eval(later.greedy(token) if sampling.greedy else draw_draft(model, sampling, later.step(token), key))

            t_later = median_time(later_step, repeats)
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
