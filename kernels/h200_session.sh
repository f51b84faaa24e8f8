#!/usr/bin/env bash
# One H200 session for the verify kernels, after MLX's CUDA build is installed (see
# ../shared/device/README.md): CUDA correctness tests, the verify-cost table, a per-linear launch
# config sweep and an ncu profile. Writes its logs under $OUT.
#   bash .mlxcuda2/install.sh && export PYTHONPATH=/tmp/site:$PWD && bash kernels/h200_session.sh
set -u
OUT=${OUT:-/tmp/h200out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
echo "== tests"
MTPNB_KERNEL_TEST_LOG=$OUT/kernel_tests.txt timeout ${T_TEST:-150} python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py -rs 2>&1 | tail -25 | tee "$OUT/pytest.txt"
cat "$OUT/kernel_tests.txt" 2>/dev/null
echo "== stack"
timeout ${T_STACK:-200} python3 kernels/bench_verify.py --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.txt" | grep -v "^  "
if [ -n "${SWEEP:-1}" ]; then
  echo "== sweep"
  timeout ${T_SWEEP:-120} python3 kernels/bench_verify.py --no-stack --sweep --bits 4 --iters 5 \
    --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | grep -E "M=|failed|Error"
fi
if [ -n "${PROFILE:-1}" ]; then
  echo "== ncu"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout ${T_NCU:-100} $NCU --clock-control none --kernel-name regex:qmv --launch-count 4 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats python3 kernels/profile_qmv.py > "$OUT/ncu.txt" 2>&1
  grep -E "mtpnb|qmv|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Theoretical Occ|Compute \(SM\)" "$OUT/ncu.txt" | head -60
fi
echo "== end"
