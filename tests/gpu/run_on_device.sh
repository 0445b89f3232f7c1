#!/usr/bin/env bash
# One run on a lent GPU machine (H200/H100), from the repository root:
#
#     bash tests/gpu/run_on_device.sh          # results under $OUT (./gpu_out if unset)
#
# 1. environment: nvidia-smi -L, python/torch/CUDA/triton versions           -> $OUT/env.txt
# 2. python -m tests.gpu.check_kernels: compiled fused kernels vs the float64 oracle, 8 worker
#    processes, new cases stop at 150 s, killed at 230 s    -> $OUT/check_kernels.{log,json,txt}
# 3. python -m tests.benchmarks.bench_losses --quick: eager vs torch.compile vs fused, KD/DKD,
#    C = 10..131072, no new compile after 75 s, killed at 140 s    -> $OUT/bench_losses.{log,json}
# The benchmark runs whatever the check gave. Expected ~3-4 minutes; at most ~6 with the caps.
# Exit status: 0 all passed, 1 a kernel check failed (or was killed), 2 the benchmark failed.
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project is not pip-installed there
unset TRITON_INTERPRET LOGITBANK_KERNELS  # compiled kernels; impl="auto" as shipped
PY=${PYTHON:-python3}
start=$(date +%s)

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on ${HOSTNAME:-?}, $(nproc) CPUs, repo $PWD"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
        --format=csv
    "$PY" - <<'PYEOF'
import platform, sys
import numpy, torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "numpy", numpy.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory", f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA device")
PYEOF
    git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} 2>&1 | tee "$OUT/env.txt"

echo "== check_kernels ($(( $(date +%s) - start ))s)"
timeout -k 10 230 "$PY" -m tests.gpu.check_kernels --out "$OUT" 2>&1 | tee "$OUT/check_kernels.log"
check_rc=$?

echo "== bench_losses --quick ($(( $(date +%s) - start ))s)"
timeout -k 10 140 "$PY" -m tests.benchmarks.bench_losses --quick --out "$OUT" 2>&1 \
    | tee "$OUT/bench_losses.log"
bench_rc=$?

echo "== check_kernels summary again (full log: $OUT/check_kernels.log)"
sed -n '/^summary: worst/,$p' "$OUT/check_kernels.log"
echo "== check_kernels rc=$check_rc, bench_losses rc=$bench_rc (124 = killed by timeout)," \
    "$(( $(date +%s) - start ))s in all"
if [ "$check_rc" -ne 0 ]; then exit 1; fi
if [ "$bench_rc" -ne 0 ]; then exit 2; fi
exit 0
