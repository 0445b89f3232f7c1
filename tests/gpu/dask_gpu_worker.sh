#!/usr/bin/env bash
# precompute on a dask worker that owns a GPU, the README's recipe, against one process:
#
#     bash tests/gpu/dask_gpu_worker.sh [PYTHON]      (run_on_device.sh STEPS=dask runs it)
#
# The tiny config's teacher is trained and exported once; one process fills run one/, and a
# `dask scheduler` with one `CUDA_VISIBLE_DEVICES=0 dask worker --resources GPU=1` fills run two/
# through `precompute --scheduler`. precompute prints which device each worker's ONNX Runtime
# session ran on ("cuda" only with onnxruntime-gpu: the image's onnxruntime runs on the CPU); the
# two stores must hold the same rows, labels and view parameters, and logits within 1e-3 (the GPU's
# convolutions round differently from the CPU's). REQUIRE_CUDA=1: fail unless the worker's
# session ran on CUDA. Exit status 0 when they agree.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python3}
W=$(mktemp -d /tmp/daskgpu.XXXXXX)
CFG=stages/configs/tiny.yaml
SETS=(--set precompute.encoding=float32 --set precompute.chunks_per_shard=2)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$PY" -m pipeline teacher --config "$CFG" --quiet --set "run_dir=$W/one"
"$PY" -m pipeline export --config "$CFG" --quiet --set "run_dir=$W/one"
mkdir -p "$W/two" && cp "$W"/one/teacher.onnx "$W"/one/teacher.onnx.parity.json "$W/two/"
"$PY" -m pipeline precompute --config "$CFG" --quiet --set "run_dir=$W/one" "${SETS[@]}"

DASK=(env PYTHONPATH="${PYTHONPATH:-}" "$PY" -m distributed.cli.dask_scheduler)
setsid "${DASK[@]}" --host 127.0.0.1 --port 0 --no-dashboard --scheduler-file "$W/s.json" \
    >"$W/scheduler.log" 2>&1 &
pids+=($!)
CUDA_VISIBLE_DEVICES=0 setsid env PYTHONPATH="${PYTHONPATH:-}" "$PY" -m distributed.cli.dask_worker \
    --scheduler-file "$W/s.json" --resources GPU=1 --nworkers 1 --nthreads 1 --host 127.0.0.1 \
    --no-dashboard --death-timeout 30 --name gpu0 --local-directory "$W/w0" \
    >"$W/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -s "$W/s.json" ] && break; sleep 0.1; done
ADDR=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$W/s.json")
echo "scheduler at $ADDR"
"$PY" -m pipeline precompute --config "$CFG" --set "run_dir=$W/two" "${SETS[@]}" \
    --scheduler "$ADDR" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$W/precompute.log" || true
if [ "${REQUIRE_CUDA:-0}" = 1 ] && ! grep -q "^dask: .* on cuda" "$W/precompute.log"; then
    echo "FAIL: the GPU worker's ONNX Runtime session did not run on CUDA"
    exit 1
fi

"$PY" - "$W/one/store.zarr" "$W/two/store.zarr" <<'PYEOF'
import sys

import numpy as np
import zarr

one, two = (zarr.open_group(p, mode="r") for p in sys.argv[1:3])
for name in ("labels", "view_params", "done"):
    assert np.array_equal(one[name][:], two[name][:]), f"{name} differs"
assert two["done"][:].all(), "the cluster's store is not complete"
diff = float(np.abs(one["logits"][:] - two["logits"][:]).max())
print(f"RESULT: one process vs the GPU worker: labels, view_params, done equal; "
      f"max |logits diff| {diff:.2e}")
sys.exit(0 if diff <= 1e-3 else 1)
PYEOF
