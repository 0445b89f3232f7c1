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
#   compile  bench_losses for KD and KD+CE at C = 1000, 32768, 131072 with torch.compile in every
#            cell (--quick's compile budget cuts those), killed at 150 s -> bench_compile.{log,json}
#   tiles    python -m tests.gpu.tile_sweep: the fused KD/DKD kernels alone (CUDA-graph replay)
#            for every candidate tile of each C, beside eager in a graph and both launched from
#            Python (host time), killed at 240 s                        -> tile_sweep.{log,json}
#   breakdown python -m tests.gpu.step_breakdown: eager and fused KD, KD+CE, DKD at C = 32768
#            and 131072, each step launched (events), its host time and its kernels'
#            (torch.profiler), killed at 90 s                        -> step_breakdown.{json,txt}
#   host     python -m tests.gpu.host_cost: host µs a call of one launch (torch, triton), of the
#            fused KD kernel alone, of kd_rows/kd_ce/dkd_rows forward + backward and eager's, and
#            a cProfile of the fused step, killed at 90 s          -> host_cost.{log,json}
#   variants python -m tests.gpu.host_variants: structures of the fused KD / KD+CE step side by
#            side (as shipped, gradient in forward, C++-only backward), launched, killed at 90 s
#                                                                         -> host_variants.{log,json}
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
# Seen (2026-11-27, commit e8bb9d8): on an H100 kernels 54 s (433 cases), losses ~100 s,
# distill: test_cuda 17 s, bench_distill --repeats 2 ~2 min, batch 256 cut at its limit after
# one repeat of CE and offline (the three steps took 460 s with the start-up, BUDGET=470); on an
# H200 tiles 65 s in all, profile more than 130 s (cut after CE and offline at BUDGET=150).
# Seen (2026-11-27, second session, H200s): kernels 44-51 s (487 cases), losses 92-100 s,
# breakdown ~25 s, host ~10 s; "kernels breakdown losses" took 189 s in all, each call's machine
# started in about 30 s.
# Seen (2026-11-27, fourth session, H200s): variants 18 s, kernels 51 s (493 cases), losses
# ~107 s, compile ~42 s, distill with BUDGET=270: test_cuda 23 s, bench_distill --repeats 2
# ~3 min (export + precompute 49 s of it), batch 256 cut; machines started in ~30 s.
# ort ~1 min (plus the wheel's 4 carries, ~6 s each onto a warm
# machine) and dask ~1 min as measured 2026-11-26.
# BUDGET=SECONDS (optional): the whole script's wall-clock budget, e.g. BUDGET=400 for a call
# with timeout_s=420: every step's timeout is cut to what is left (a step with under 20 s left is
# skipped), so one slow step cannot eat the call and the archive always comes back.
# The plan for a 15-minute device lease (about 2-3 minutes of it go to starting the machine):
#   run(command='BUDGET=300 STEPS="host kernels losses" bash tests/gpu/run_on_device.sh',
#       timeout_s=320)
#   run(command='BUDGET=300 STEPS="distill" bash tests/gpu/run_on_device.sh',
#       carry=[".whl"], timeout_s=320)
# then the ORT wheel's carries (tests/gpu/ort_gpu_wheel.sh) if time is left, and give_back.
# Exit status: 0 all passed, 1 a kernel check failed (or was killed), 2 the loss benchmark failed,
# 3 a later step failed (its rc, 124 = killed by timeout, is in the last line and run.log).
set -u -o pipefail
cd "$(dirname "$0")/../.."
# The device tool brings back at most 8 files from $OUT: every step writes into a work folder,
# and goes back as one archive, results.tar.gz, refreshed after every step (a call killed at its
# limit still brings back the steps before) and on exit; run.log is this script's own output.
FINAL=${OUT:-$PWD/gpu_out}
mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/gpu_results.XXXXXX)
save() {  # tar's status 1 = a log grew while read (run.log always does): the archive is fine
    tar -czf "$FINAL/results.tar.gz.tmp" --warning=no-file-changed -C "$OUT" .
    [ $? -le 1 ] && mv -f "$FINAL/results.tar.gz.tmp" "$FINAL/results.tar.gz" &&
        ls -l "$OUT" >"$FINAL/files.txt"
}
trap save EXIT
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project is not pip-installed there
unset TRITON_INTERPRET LOGITBANK_KERNELS  # compiled kernels; impl="auto" as shipped
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-kernels losses} "
KNOWN=" variants kernels losses compile tiles breakdown host ort distill profile dask "
for s in $STEPS; do  # a misspelt step would otherwise run nothing and spend the call
    [[ "$KNOWN" == *" $s "* ]] || { echo "error: unknown step '$s' (known:$KNOWN)" >&2; exit 2; }
done
start=$(date +%s)
has() { [[ "$STEPS" == *" $1 "* ]]; }
# cap SECONDS: SECONDS, or less when BUDGET leaves less (10 s kept for the kill and the archive)
cap() {
    local want=$1 left
    [ -n "${BUDGET:-}" ] || { echo "$want"; return; }
    left=$(( BUDGET - ($(date +%s) - start) - 10 ))
    echo $(( left < want ? left : want ))
}
# run_step NAME CAP CMD...: runs CMD under timeout, records "NAME=rc" in $OUT/rcs.txt (124:
# timed out; 125: skipped, no budget left; a file, as steps run inside pipelines' subshells) and
# refreshes the archive
run_step() {
    local name=$1 t rc
    t=$(cap "$2")
    shift 2
    if [ "$t" -lt 20 ]; then
        echo "== $name skipped: ${t}s of BUDGET left"
        rc=125
    else
        timeout -k 10 "$t" "$@"
        rc=$?
    fi
    echo "$name=$rc" >>"$OUT/rcs.txt"
    save
    return "$rc"
}
if [ -d .whl ] && { has distill || has dask || has profile; }; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then  # installed by this call or an earlier one on the same warm machine
    export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
if { has distill || has dask || has profile; } && ! "$PY" -c "import zarr, distributed" 2>/dev/null
then  # fail in a second, not after the kernel and loss steps
    echo "error: zarr/dask do not import here: carry .whl (see above) for distill, profile, dask" >&2
    exit 2
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
if has variants; then
    echo "== host_variants ($(( $(date +%s) - start ))s)"
    run_step variants 90 "$PY" -m tests.gpu.host_variants --out "$OUT" 2>&1 \
        | tee "$OUT/host_variants.log" || later_rc=3
fi
if has kernels; then
    echo "== check_kernels ($(( $(date +%s) - start ))s)"
    run_step kernels 230 "$PY" -m tests.gpu.check_kernels --out "$OUT" 2>&1 \
        | tee "$OUT/check_kernels.log"
    check_rc=$?
fi

if has losses; then
    echo "== bench_losses --quick ($(( $(date +%s) - start ))s)"
    run_step losses 140 "$PY" -m tests.benchmarks.bench_losses --quick --out "$OUT" 2>&1 \
        | tee "$OUT/bench_losses.log"
    bench_rc=$?
fi

if has compile; then
    echo "== bench_losses with torch.compile at large C ($(( $(date +%s) - start ))s)"
    mkdir -p "$OUT/compile"
    run_step compile 150 "$PY" -m tests.benchmarks.bench_losses --methods kd kd+ce \
        --classes 1000 32768 131072 --seconds 0.2 --sets 2 --out "$OUT/compile" 2>&1 \
        | tee "$OUT/bench_compile.log" || later_rc=3
fi

if has tiles; then
    echo "== tile_sweep ($(( $(date +%s) - start ))s)"
    run_step tiles 240 "$PY" -m tests.gpu.tile_sweep --out "$OUT" 2>&1 | tee "$OUT/tile_sweep.log" \
        || later_rc=3
fi

if has breakdown; then
    echo "== step_breakdown ($(( $(date +%s) - start ))s)"
    run_step breakdown 90 "$PY" -m tests.gpu.step_breakdown --out "$OUT" --classes 32768 131072 \
        2>&1 | tee "$OUT/step_breakdown.log" || later_rc=3
fi

if has host; then
    echo "== host_cost ($(( $(date +%s) - start ))s)"
    run_step host 90 "$PY" -m tests.gpu.host_cost --out "$OUT" 2>&1 | tee "$OUT/host_cost.log" \
        || later_rc=3
fi

if has ort; then
    echo "== check_ort ($(( $(date +%s) - start ))s)"
    PYTHONPATH="/tmp/ortsite:$PYTHONPATH" run_step ort 150 "$PY" -m tests.gpu.check_ort \
        --out "$OUT" 2>&1 | tee "$OUT/check_ort.log" || later_rc=3
fi

if has distill; then
    echo "== distill on CUDA ($(( $(date +%s) - start ))s)"
    {
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" \
            || echo "no CUDA: FAILED"
        # -rs lists skips: test_cuda.py skips without CUDA, which must not pass for a check.
        run_step test_cuda 100 "$PY" -m pytest -q -rs -p no:cacheprovider \
            tests/distill/test_cuda.py || echo "test_cuda FAILED ($?)"
        run_step bench_distill 300 "$PY" -m tests.benchmarks.bench_distill --device cuda \
            --repeats 2 || echo "bench_distill FAILED ($?)"
        # Batch 256: a step with 4x the GPU work for about the same host work (is 64 host-bound?)
        run_step bench_distill_256 200 "$PY" -m tests.benchmarks.bench_distill --device cuda \
            --repeats 1 --batch 256 || echo "bench_distill --batch 256 FAILED ($?)"
    } 2>&1 | tee "$OUT/distill.log"
    grep -q -E "FAILED|skipped" "$OUT/distill.log" && later_rc=3
fi

if has profile; then
    echo "== profile of distill on CUDA ($(( $(date +%s) - start ))s)"
    # torch.profiler over one epoch of each mode (slowed by it: the figures are bench_distill's)
    BENCH_DISTILL_PROFILE="$OUT" run_step profile 200 "$PY" -m tests.benchmarks.bench_distill \
        --device cuda --repeats 1 --rows 8192 >"$OUT/profile.log" 2>&1 || later_rc=3
    tail -5 "$OUT/profile.log"
fi

if has dask; then
    echo "== precompute on a dask worker with a GPU ($(( $(date +%s) - start ))s)"
    # With onnxruntime-gpu installed (step "ort", tests/gpu/ort_gpu_wheel.sh) the worker's session
    # must run on CUDA; the image's own onnxruntime runs on the CPU (the plumbing only).
    PYTHONPATH="/tmp/ortsite:$PYTHONPATH" REQUIRE_CUDA=$([ -d /tmp/ortsite ] && echo 1 || echo 0) \
        run_step dask 150 bash tests/gpu/dask_gpu_worker.sh "$PY" 2>&1 | tee "$OUT/dask.log" \
        || later_rc=3
fi

if has kernels; then
    echo "== check_kernels summary again (full log: $OUT/check_kernels.log)"
    sed -n '/^summary: worst/,$p' "$OUT/check_kernels.log"
fi
echo "== steps:$STEPS check_kernels rc=$check_rc, bench_losses rc=$bench_rc, later steps" \
    "rc=$later_rc; each step's rc (124 = killed by timeout, 125 = no budget left):" \
    "$(tr '\n' ' ' <"$OUT/rcs.txt" 2>/dev/null)" \
    "$(( $(date +%s) - start ))s in all"
if [ "$check_rc" -ne 0 ]; then exit 1; fi
if [ "$bench_rc" -ne 0 ]; then exit 2; fi
exit "$later_rc"
