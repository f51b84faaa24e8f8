"""What the sampler's own `exp` (mtpnb/sampling.py) saves against MLX's on this CPU: the exp of 4 rows
of an 8k vocabulary, the acceptance of a round of 3 drafts with its host copy (greedy and T=0.6, called
as the engine calls it: uncompiled) and the T=0.6 processing of 4 rows of logits, in milliseconds,
medians of single calls, MLX's exp and the sampler's alternated --rounds times in one process.

    python benchmarks/sampler_exp.py
    python benchmarks/sampler_exp.py --calls 3000 --rounds 5

Timing needs a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mtpnb  # noqa: F401  (loads OpenBLAS before MLX, as every front end does)
import mlx.core as mx

from mtpnb import sampling
from mtpnb.engine import to_host

OWN = (sampling.exp, sampling.logsumexp)
MLX = (mx.exp, lambda x, axis=-1, keepdims=False: mx.logsumexp(x, axis=axis, keepdims=keepdims))


def median_ms(call, calls: int) -> float:
    for _ in range(50):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500, help="timed calls per figure (default 1500)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two exps (default 3)")
    args = parser.parse_args()
    vocab = 8192
    logits = mx.random.normal((1, 4, vocab), key=mx.random.key(0)) * 3
    draft_logits = mx.random.normal((1, 3, vocab), key=mx.random.key(1)) * 3
    drafts = mx.array([[1, 2, 3]])
    x = mx.random.normal((4, vocab), key=mx.random.key(2)) - 5
    processing = sampling.Sampling(temperature=0.6, top_p=0.95, top_k=20)
    p, q = processing.logprobs(logits), processing.logprobs(draft_logits)
    mx.eval(logits, draft_logits, x, p, q)
    figures = {
        "exp [4, 8k]": lambda: mx.eval(sampling.exp(x)),
        "greedy acceptance + host": lambda: to_host(sampling.accept_greedy(logits, draft_logits, drafts)),
        "T=0.6 acceptance + host": lambda: to_host(sampling.accept_sampled(p, q, drafts, mx.random.key(3))),
        "T=0.6 processing [4, 8k]": lambda: mx.eval(processing.logprobs(logits)),
    }
    print(f"{'ms, median of single calls':<28}" + "".join(f"{name:>26}" for name in figures))
    for round_ in range(args.rounds):
        for label, (exp, logsumexp) in (("mx.exp", MLX), ("sampling.exp", OWN)):
            sampling.exp, sampling.logsumexp = exp, logsumexp
            row = [median_ms(call, args.calls) for call in figures.values()]
            print(f"{f'{label} (round {round_ + 1})':<28}" + "".join(f"{ms:>26.3f}" for ms in row))
    sampling.exp, sampling.logsumexp = OWN


if __name__ == "__main__":
    main()
