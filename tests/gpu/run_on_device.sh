#!/usr/bin/env bash
# Runs on a lent GPU machine (H200/H100), from the repository root:
#
#     STEPS="kernels losses" bash tests/gpu/run_on_device.sh   # $OUT/results.tar.gz (./gpu_out)
#
# Steps (STEPS, in this order; default "kernels losses"):
#   kernels  python -m tests.gpu.check_kernels: compiled fused kernels vs the float64 oracle, 8
#            worker processes, new cases stop at 150 s, killed at 230 s  -> check_kernels.{log,json,txt}
#   losses   python -m tests.benchmarks.bench_losses --quick: eager vs torch.compile vs fused,
#            KD/DKD, C = 10..131072, killed at 140 s                     -> bench_losses.{log,json}
#   tiles    python -m tests.gpu.tile_sweep: the fused KD/DKD kernels alone (CUDA-graph replay)
#            for every candidate tile of each C, beside eager in a graph and both launched from
#            Python (host time), killed at 240 s                        -> tile_sweep.{log,json}
#   ort      python -m tests.gpu.check_ort (CUDA provider, I/O binding, fp16 vs torch): needs
#            onnxruntime-gpu at /tmp/ortsite (tests/gpu/ort_gpu_wheel.sh), killed at 150 s
#   distill  the distill stage on CUDA: tests/distill/test_cuda.py (follows the CPU, fused kernels
#            used), then bench_distill --device cuda --repeats 2 (CE / offline / online KD rows/s
#            and GPU memory) and again at batch 256, killed at 100, 300, 200 s -> distill.log
#   profile  bench_distill with BENCH_DISTILL_PROFILE (torch.profiler, one epoch a mode, 8,192
#            rows), killed at 200 s                                      -> profile_*.txt
#   dask     precompute of the tiny config by a `dask scheduler` and one `dask worker --resources
#            GPU=1` pinned to GPU 0, against one process; killed at 150 s -> dask.log
# distill and dask need zarr and dask, which the image lacks: carry `.whl` (README of the device
# tool; the wheels: zarr numcodecs donfig google_crc32c dask distributed tornado tblib zict locket
# partd, and onnxconverter_common for check_ort's fp16 row) and they are installed to /tmp/site
# first; a later call on the same warm machine finds them there.
# Expected (H100, 2026-11-26): kernels 35 s (262 cases then; 433 with the *_ce losses, ~1 min
# estimated), losses 80 s (~2 min now with the kd+ce and dkd+ce rows), distill ~2 min (~4 now,
# with a second repeat, batch 256 and the step-alone epochs), dask ~1 min, ort ~1 min (plus the
# wheel's 4 carries, ~6 s each onto a warm machine); tiles and profile not yet run (~2-3 min and
# ~1.5 min estimated).
# Exit status: 0 all passed, 1 a kernel check failed (or was killed), 2 the loss benchmark failed,
# 3 a later step failed.
set -u -o pipefail
cd "$(dirname "$0")/../.."
# The device tool brings back at most 8 files from $OUT: every step writes into a work folder,
# and on exit it goes back as one archive, results.tar.gz (plus the summary, run.log's tail).
FINAL=${OUT:-$PWD/gpu_out}
mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/gpu_results.XXXXXX)
trap 'tar -czf "$FINAL/results.tar.gz" -C "$OUT" . && ls -l "$OUT" >"$FINAL/files.txt"' EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project is not pip-installed there
unset TRITON_INTERPRET LOGITBANK_KERNELS  # compiled kernels; impl="auto" as shipped
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-kernels losses} "
start=$(date +%s)
has() { [[ "$STEPS" == *" $1 "* ]]; }
if [ -d .whl ] && { has distill || has dask || has profile; }; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then  # installed by this call or an earlier one on the same warm machine
    export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi

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

check_rc=0
bench_rc=0
later_rc=0
if has kernels; then
    echo "== check_kernels ($(( $(date +%s) - start ))s)"
    timeout -k 10 230 "$PY" -m tests.gpu.check_kernels --out "$OUT" 2>&1 \
        | tee "$OUT/check_kernels.log"
    check_rc=$?
fi

if has losses; then
    echo "== bench_losses --quick ($(( $(date +%s) - start ))s)"
    timeout -k 10 140 "$PY" -m tests.benchmarks.bench_losses --quick --out "$OUT" 2>&1 \
        | tee "$OUT/bench_losses.log"
    bench_rc=$?
fi

if has tiles; then
    echo "== tile_sweep ($(( $(date +%s) - start ))s)"
    timeout -k 10 240 "$PY" -m tests.gpu.tile_sweep --out "$OUT" 2>&1 | tee "$OUT/tile_sweep.log" \
        || later_rc=3
fi

if has ort; then
    echo "== check_ort ($(( $(date +%s) - start ))s)"
    PYTHONPATH="/tmp/ortsite:$PYTHONPATH" timeout -k 10 150 "$PY" -m tests.gpu.check_ort \
        --out "$OUT" 2>&1 | tee "$OUT/check_ort.log" || later_rc=3
fi

if has distill; then
    echo "== distill on CUDA ($(( $(date +%s) - start ))s)"
    {
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" \
            || echo "no CUDA: FAILED"
        # -rs lists skips: test_cuda.py skips without CUDA, which must not pass for a check.
        timeout -k 10 100 "$PY" -m pytest -q -rs -p no:cacheprovider tests/distill/test_cuda.py \
            || echo "test_cuda FAILED ($?)"
        timeout -k 10 300 "$PY" -m tests.benchmarks.bench_distill --device cuda --repeats 2 \
            || echo "bench_distill FAILED ($?)"
        # Batch 256: a step with 4x the GPU work for about the same host work (is 64 host-bound?)
        timeout -k 10 200 "$PY" -m tests.benchmarks.bench_distill --device cuda --repeats 1 \
            --batch 256 || echo "bench_distill --batch 256 FAILED ($?)"
    } 2>&1 | tee "$OUT/distill.log"
    grep -q -E "FAILED|skipped" "$OUT/distill.log" && later_rc=3
fi

if has profile; then
    echo "== profile of distill on CUDA ($(( $(date +%s) - start ))s)"
    # torch.profiler over one epoch of each mode (slowed by it: the figures are bench_distill's)
    BENCH_DISTILL_PROFILE="$OUT" timeout -k 10 200 "$PY" -m tests.benchmarks.bench_distill \
        --device cuda --repeats 1 --rows 8192 >"$OUT/profile.log" 2>&1 || later_rc=3
    tail -5 "$OUT/profile.log"
fi

if has dask; then
    echo "== precompute on a dask worker with a GPU ($(( $(date +%s) - start ))s)"
    # With onnxruntime-gpu installed (step "ort", tests/gpu/ort_gpu_wheel.sh) the worker's session
    # must run on CUDA; the image's own onnxruntime runs on the CPU (the plumbing only).
    PYTHONPATH="/tmp/ortsite:$PYTHONPATH" REQUIRE_CUDA=$([ -d /tmp/ortsite ] && echo 1 || echo 0) \
        timeout -k 10 150 bash tests/gpu/dask_gpu_worker.sh "$PY" 2>&1 | tee "$OUT/dask.log" \
        || later_rc=3
fi

if has kernels; then
    echo "== check_kernels summary again (full log: $OUT/check_kernels.log)"
    sed -n '/^summary: worst/,$p' "$OUT/check_kernels.log"
fi
echo "== steps:$STEPS check_kernels rc=$check_rc, bench_losses rc=$bench_rc, later steps" \
    "rc=$later_rc (124 = killed by timeout), $(( $(date +%s) - start ))s in all"
if [ "$check_rc" -ne 0 ]; then exit 1; fi
if [ "$bench_rc" -ne 0 ]; then exit 2; fi
exit "$later_rc"
