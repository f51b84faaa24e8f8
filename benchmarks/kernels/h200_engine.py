"""The engine on MLX's CUDA backend: the default model's generations at depths 0, 1 and 3, twice (the
first pass pays MLX's JIT compilation of every new kernel shape, the second is the steady state), then
the trunk forward alone at 1, 2 and 4 tokens. Runs anywhere MLX runs; written for the lent H200:

    bash .mlxcuda2/install.sh && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/kernels/h200_engine.py

(with mlx-lm on PYTHONPATH too where the machine lacks it). Output: benchmarks/kernels/results/h200_engine.txt.
"""

import statistics
import time

import mlx.core as mx

import mtpnb
from mtpnb.rollback import rollback_cache

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def median_ms(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    model = mtpnb.load()
    print(mx.default_device())
    for rep in range(2):
        for depth in (0, 1, 3):
            t = time.perf_counter()
            result = model.generate(PROMPT, depth=depth, max_tokens=64)
            steps = result.steps[1:]
            print(f"pass {rep} depth {depth}: {time.perf_counter() - t:.2f} s, {result.metrics.decode_tok_s:.1f} tok/s, "
                  f"{len(steps)} steps, median draft {statistics.median(s.draft_s for s in steps) * 1e3:.1f} ms, "
                  f"median verify {statistics.median(s.verify_s for s in steps) * 1e3:.1f} ms, "
                  f"first verifies {[round(s.verify_s * 1e3, 1) for s in steps[:5]]} ms")
    cache = model.make_cache()
    mx.eval(model.forward(mx.array(model.engine.encode(PROMPT))[None], cache=cache))
    for tokens in (1, 2, 4):
        def forward():
            mx.eval(model.forward(mx.array([[5] * tokens]), cache=cache))
            rollback_cache(cache, keep=0, discard=tokens)

        print(f"trunk forward of {tokens} token(s): {median_ms(forward):.2f} ms")


if __name__ == "__main__":
    main()
