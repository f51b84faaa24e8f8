"""One down-projection-shaped linear (17408 -> 5120, 4-bit, group 64) for ncu: the verify kernel
at M=1 and M=4, then MLX's stock qmv at M=1 and M=4, each launched once, eagerly.

    ncu --clock-control none --kernel-name regex:qmv --launch-count 4 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 kernels/profile_qmv.py
"""

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_verify import kernels, quantized_linear  # noqa: E402

n, k, bits, gs = int(sys.argv[1]) if len(sys.argv) > 1 else 5120, 17408, 4, 64
lin = quantized_linear(k, n, bits, gs)
mx.eval(lin.parameters())
kern = kernels._get_kernel("cuda")
xs = {m: mx.random.normal((m, k)).astype(mx.bfloat16) for m in (1, 4)}
mx.eval(xs)
for m in (1, 4):
    print("kernel M", m, kernels.choose_cuda_config(m, n, k, bits, gs), flush=True)
    mx.eval(kern(xs[m], lin.weight, lin.scales, lin.biases, bits, gs))
for m in (1, 4):
    mx.eval(mx.quantized_matmul(xs[m], lin.weight, lin.scales, lin.biases, transpose=True,
                                group_size=gs, bits=bits))
mx.synchronize()
print("done")
