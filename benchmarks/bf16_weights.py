"""What reading a bf16 checkpoint's weights as bfloat16 saves in the CPU kernels' matmuls (mtpnb/cpu_kernels.py):
a trunk forward of 1 and of 4 tokens on the default model after a code prompt, each layer's kernel reading
its weights as float32 or as their bf16 copy, alternated --rounds times in one process; milliseconds,
medians of single forwards. Also checks that both give bitwise the same logits, and says how much of a
forward (bf16 reading) is spent inside the C kernels' calls: the rest is MLX's ops between them and Python.

    python benchmarks/bf16_weights.py
    python benchmarks/bf16_weights.py --calls 400 --rounds 5

Timing needs a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mtpnb
import mlx.core as mx
import numpy as np

from mtpnb import cpu_kernels
from mtpnb.bench.prompts import code_prompts
from mtpnb.rollback import rollback_cache


def host_weights(model) -> dict[str, list]:
    """Per kernel layer, the weight as each reading takes it: (layer, (array, address))."""
    layers = [m for m in model.trunk.modules() if type(m) in (cpu_kernels.SmallBatchLinear,
                                                                cpu_kernels.SmallBatchEmbedding)]
    readings = {"float32": [], "bfloat16": []}
    for layer in layers:
        rows = np.ascontiguousarray(np.asarray(layer.weight))
        halves = cpu_kernels.bf16_halves(rows)
        if halves is None:
            raise SystemExit("this model's weights are not all bfloat16 numbers: nothing to compare")
        for name, array in (("float32", rows), ("bfloat16", halves)):
            readings[name].append((layer, (layer.weight, (array, array.ctypes.data))))
    return readings


def kernel_share(forward, calls: int) -> dict[int, tuple[float, float]]:
    """Per forward of 1 and 4 tokens: (ms inside the C matmul and recurrence calls, ms in all), means."""
    spent = [0.0]
    originals = cpu_kernels._call, cpu_kernels._gated_delta_call

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    cpu_kernels._call, cpu_kernels._gated_delta_call = (timed(f) for f in originals)
    try:
        shares = {}
        for tokens in (1, 4):
            spent[0] = 0.0
            start = time.perf_counter()
            for _ in range(calls):
                forward(tokens)
            shares[tokens] = (spent[0] / calls * 1e3, (time.perf_counter() - start) / calls * 1e3)
        return shares
    finally:
        cpu_kernels._call, cpu_kernels._gated_delta_call = originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed forwards per figure (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two readings (default 3)")
    args = parser.parse_args()
    model = mtpnb.load()
    if not cpu_kernels.usable():
        raise SystemExit(f"the CPU kernels are off here: {cpu_kernels.status()['reason']}")
    readings = host_weights(model)
    ids = model.tokenizer.encode(code_prompts(1)[0]["text"])
    cache = model.make_cache()
    mx.eval(model.forward(mx.array(ids)[None], cache=cache, last_only=True))

    def use(name: str) -> None:
        for layer, kept in readings[name]:
            object.__setattr__(layer, "_host_weight_of", kept)

    def forward(tokens: int) -> mx.array:
        _, logits = model.forward(mx.array(ids[:tokens])[None], cache=cache)
        mx.eval(logits)
        rollback_cache(cache, keep=0, discard=tokens)
        return logits

    def median_ms(tokens: int) -> float:
        for _ in range(10):
            forward(tokens)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            forward(tokens)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    logits = {}
    for name in readings:
        use(name)
        logits[name] = np.asarray(forward(4))
    same = np.array_equal(logits["float32"], logits["bfloat16"])
    print(f"logits of a 4-token forward bitwise equal: {same}")
    print(f"{'ms, median of single forwards':<32}{'1 token':>10}{'4 tokens':>10}")
    for round_ in range(args.rounds):
        for name in readings:
            use(name)
            row = [median_ms(tokens) for tokens in (1, 4)]
            print(f"{f'{name} weights (round {round_ + 1})':<32}" + "".join(f"{ms:>10.2f}" for ms in row))
    use("bfloat16")
    inside = kernel_share(forward, args.calls)
    for tokens, (kernels_ms, total_ms) in inside.items():
        print(f"{tokens} token(s): {kernels_ms:.2f} of {total_ms:.2f} ms inside the C kernels' calls (means)")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
