#!/usr/bin/env bash
# Bring onnxruntime-gpu to a lent GPU machine, whose image has only the CPU build of onnxruntime.
#
# The wheel (~245 MiB) is larger than what one `run` call carries (64 MiB), so it travels in
# parts, one call each, onto the same warm machine (it goes back after ~30 s idle: make the calls
# back to back), and is put together and installed there by the last call. Its needs (numpy,
# protobuf, flatbuffers, packaging; CUDA 13, cuBLAS, cuDNN 9 as nvidia-* packages) are in the image.
#
#   here:   bash tests/gpu/ort_gpu_wheel.sh prepare   # download, split into .ortgpu/pN (PART_MIB=62)
#   device: run(command="bash tests/gpu/ort_gpu_wheel.sh receive 1", carry=[".ortgpu/p1"])
#           ... the same for 2, 3 (prepare prints the exact list; PART_MIB=60 if a carry is
#           refused as too large: the tracked tree travels with each part) ...
#   device: run(command="bash tests/gpu/ort_gpu_wheel.sh install && STEPS=ort \
#               bash tests/gpu/run_on_device.sh", carry=[".ortgpu/p4", ".ortgpu/extra"])
#
# `install` receives the part carried with it too, checks the whole wheel's sha256 and installs
# it with --target /tmp/ortsite (put that first on PYTHONPATH so it shadows the CPU build),
# together with the small wheels in .ortgpu/extra (onnxconverter_common: check_ort's fp16
# session; .whl cannot travel beside a part, 64 MiB a call).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=.ortgpu
STAGE=${STAGE:-/tmp/ortgpu-parts}
SITE=${SITE:-/tmp/ortsite}
VERSION=${ORT_VERSION:-1.31.1}
PART_MIB=${PART_MIB:-62}

receive() {  # copy the parts carried so far to the machine's own /tmp
    mkdir -p "$STAGE"
    local found=0 f
    for f in "$DIR"/p*/*; do
        [ -e "$f" ] || continue
        cp -f "$f" "$STAGE/"
        case "$f" in *wheel.part.*) found=1 ;; esac
    done
    [ "$found" = 1 ] || { echo "error: no part carried (name .ortgpu/pN in carry)" >&2; exit 2; }
    echo "parts on this machine: $(ls "$STAGE" | grep -c '^wheel.part') of $(cat "$STAGE/COUNT")"
}

case "${1:-}" in
prepare)
    rm -rf "$DIR" && mkdir -p "$DIR/dl" "$DIR/extra"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/extra" \
        "onnxconverter-common==${ONNXCONVERTER_VERSION:-1.16.0}"
    if [ -n "${WHEEL:-}" ]; then  # a wheel downloaded before
        cp "$WHEEL" "$DIR/dl/"
    else
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            -d "$DIR/dl" "onnxruntime-gpu==$VERSION"
    fi
    wheel=$(ls "$DIR"/dl/onnxruntime_gpu-*.whl)
    split -b "${PART_MIB}M" -d -a 2 "$wheel" "$DIR/dl/wheel.part."
    n=0
    for part in "$DIR"/dl/wheel.part.*; do
        n=$((n + 1))
        mkdir -p "$DIR/p$n" && mv "$part" "$DIR/p$n/"
    done
    for p in "$DIR"/p*; do
        (cd "$DIR/dl" && sha256sum "$(basename "$wheel")") >"$p/SHA256"
        echo "$n" >"$p/COUNT"
    done
    rm -rf "$DIR/dl"
    echo "$n parts of at most $PART_MIB MiB in $DIR/p1 .. $DIR/p$n; on the device, back to back:"
    for i in $(seq 1 $((n - 1))); do
        echo "  run(command=\"bash tests/gpu/ort_gpu_wheel.sh receive $i\", carry=[\"$DIR/p$i\"])"
    done
    echo "  run(command=\"bash tests/gpu/ort_gpu_wheel.sh install && STEPS=ort bash tests/gpu/run_on_device.sh\", carry=[\"$DIR/p$n\", \"$DIR/extra\"])"
    ;;
receive)
    receive
    ;;
install)
    receive
    count=$(cat "$STAGE/COUNT")
    have=$(ls "$STAGE" | grep -c '^wheel.part')
    if [ "$have" != "$count" ]; then
        echo "error: $have of $count parts on this machine (it was given back between calls?);" \
            "carry them again, back to back" >&2
        exit 2
    fi
    name=$(awk '{print $2}' "$STAGE/SHA256")
    cat "$STAGE"/wheel.part.* >"/tmp/$name"
    (cd /tmp && sha256sum --quiet -c "$STAGE/SHA256") ||
        { echo "error: the reassembled wheel's sha256 differs; prepare and carry again" >&2; exit 2; }
    extra=()
    for f in "$DIR"/extra/*.whl; do [ -e "$f" ] && extra+=("$f"); done
    [ "${#extra[@]}" -gt 0 ] || echo "note: no .ortgpu/extra carried: check_ort measures no fp16" >&2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "/tmp/$name" "${extra[@]}"
    PYTHONPATH="$SITE" python3 -c \
        "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    ;;
*)
    echo "usage: $0 prepare | receive | install" >&2
    exit 2
    ;;
esac
