"""Kernel-level view of the verify kernel for ncu: the MLP's two big shapes (4-bit, group 64),
each launched once eagerly: ring and v1 variants at M=1 and M=4, and MLX's stock qmv.

    ncu --clock-control none --kernel-name regex:qmv --section SpeedOfLight --section Occupancy \
        python3 benchmarks/kernels/profile_qmv.py
"""

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_verify import kernels, quantized_linear  # noqa: E402


def main() -> None:
    if kernels.backend() != "cuda":
        sys.exit(f"profile_qmv: profiles the CUDA verify kernel, and MLX's device here is {kernels.backend()}: "
                 "run it on a machine with MLX's CUDA backend (benchmarks/kernels/NOTES.md)")
    bits, gs = 4, 64
    kern = kernels._get_kernel("cuda")
    for n, k in [(5120, 17408), (17408, 5120)]:
        lin = quantized_linear(k, n, bits, gs)
        xs = {m: mx.random.normal((m, k)).astype(mx.bfloat16) for m in (1, 4)}
        mx.eval(lin.parameters(), xs)
        for variant, m in [("ring", 1), ("ring", 4), ("v1", 1), ("v1", 4)]:
            cfg = kernels.choose_cuda_config(m, n, k, bits, gs, variant)
            print(f"{n}x{k} {variant} M={m} {cfg}", flush=True)
            mx.eval(kern(xs[m], lin.weight, lin.scales, lin.biases, bits, gs, variant=variant))
        for m in (1, 4):
            print(f"{n}x{k} stock M={m}", flush=True)
            mx.eval(mx.quantized_matmul(xs[m], lin.weight, lin.scales, lin.biases, transpose=True,
                                        group_size=gs, bits=bits))
        mx.synchronize()
    print("done")


if __name__ == "__main__":
    main()
