#!/usr/bin/env bash
# One H200 session for the verify kernels, after MLX's CUDA build is installed (see
# ../shared/device/README.md): the verify-cost table (default MLX settings, then with
# MLX_MAX_OPS_PER_BUFFER=100), an ncu view of the big shapes, the CUDA correctness tests.
#   bash .mlxcuda2/install.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/kernels/h200_session.sh
set -u
OUT=${OUT:-/tmp/h200out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
echo "== stack (default MLX settings)"
timeout ${T_BENCH:-120} python3 benchmarks/kernels/bench_verify.py --floor --iters 8 --out "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.txt" | grep -v "^  "
echo "== stack, MLX_MAX_OPS_PER_BUFFER=100"
MLX_MAX_OPS_PER_BUFFER=100 timeout ${T_OPS:-60} python3 benchmarks/kernels/bench_verify.py --bits 4 --floor --iters 8 \
  --out "$OUT/bench_ops100.json" 2>&1 | tee "$OUT/bench_ops100.txt" | grep -E "^\| |floor|layers"
echo "== ncu"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout ${T_NCU:-45} $NCU --clock-control none --kernel-name regex:qmv --section SpeedOfLight \
  --section Occupancy --section LaunchStats python3 benchmarks/kernels/profile_qmv.py > "$OUT/ncu.txt" 2>&1
grep -E "^[0-9]+x|qmv.*\(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Dynamic Shared" \
  "$OUT/ncu.txt" | sed -E 's/\(const __nv_bfloat16.*//; s/\(const T6.*//' | head -80
echo "== tests"
MTPNB_KERNEL_TEST_LOG=$OUT/kernel_tests.txt timeout ${T_TEST:-400} python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py -rs 2>&1 | tail -8 > "$OUT/pytest.txt"
cat "$OUT/pytest.txt" "$OUT/kernel_tests.txt" 2>/dev/null
echo "== end"
