"""ONNX Runtime's CUDA provider on a GPU: parity with PyTorch and images/s, as ratios.

    python -m tests.gpu.check_ort [--model resnet56] [--batch 256] [--out DIR]

Exports a zoo model (random weights, CIFAR-size inputs) to ONNX, then on the GPU compares, for the
same batches: torch eager (float32, no TF32), ONNX Runtime's CUDA provider through
``session.run``, the project's ``Runner`` (I/O binding, output preallocated on the device), the
same with TF32 allowed (ONNX Runtime's own default, which the project turns off) and, where the
``onnxconverter_common`` package is installed, the fp16 session. Parity: max |Δ| of each against
torch's float32 logits. Throughput: median images/s over repeated timed passes, as a ratio to
torch eager. Needs a GPU build of onnxruntime whose CUDA provider really starts; where the
installed onnxruntime has none, it says so and exits 3 (nothing to check), which the device
script records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _images_per_s(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)  # warm-up: CUDA graphs, cuDNN algorithm search, allocations
    fn(batch)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script"
    )
    args = parser.parse_args(argv)
    dev = args.device

    import onnxruntime as ort

    from pipeline.models import build_model
    from pipeline.onnx_export import export_onnx
    from pipeline.ort import (
        SESSION_RTOL,
        Runner,
        active_provider,
        describe_parity,
        make_session,
        session_parity,
    )

    print(f"onnxruntime {ort.__version__}, providers listed: {ort.get_available_providers()}")
    if dev == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("RESULT: this onnxruntime has no CUDA provider: nothing to check on the GPU")
        return 3
    if dev == "cuda" and not torch.cuda.is_available():
        print("RESULT: no CUDA device visible to torch")
        return 3
    # The reference is plain float32: no TF32 in cuDNN's convolutions.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=100, in_channels=3, image_size=(32, 32))
    rng = np.random.default_rng(0)
    # Random weights with batch-norm statistics of their own activations, as a trained network
    # has: logits of everyday size (the fresh statistics give |logits| ~1e4, where float32 itself
    # rounds by more than the export's 1e-4 parity tolerance).
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model(torch.from_numpy(rng.standard_normal((64, 3, 32, 32), dtype=np.float32)))
    model.eval()
    rows = []
    parity: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "teacher.onnx"
        sample = torch.from_numpy(rng.standard_normal((8, 3, 32, 32), dtype=np.float32))
        export_onnx(model, sample, onnx_path)
        session = make_session(onnx_path, dev)
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        print(
            f"session providers: {session.get_providers()} -> {active_provider(session)}, "
            f"use_tf32={options.get('use_tf32', 'n/a')}"
        )
        runner = Runner(session, 100)
        gpu_model = model.to(dev)

        @torch.no_grad()
        def torch_eager(x: np.ndarray) -> np.ndarray:
            out = gpu_model(torch.from_numpy(x).to(dev))
            return out.float().cpu().numpy()

        def plain(x: np.ndarray) -> np.ndarray:
            return session.run(None, {session.get_inputs()[0].name: x})[0]

        engines = {f"torch eager ({dev})": torch_eager, f"ORT {dev} run()": plain}
        engines[f"ORT {dev} Runner (I/O binding on cuda)"] = lambda x: runner.run(x)
        if dev == "cuda":  # ORT's own default, which make_session turns off
            tf32 = Runner(make_session(onnx_path, dev, tf32=True), 100)
            engines[f"ORT {dev} Runner TF32"] = lambda x: tf32.run(x)
        fp16 = None
        try:
            fp16 = Runner(make_session(onnx_path, dev, fp16=True), 100)
            engines[f"ORT {dev} Runner fp16"] = lambda x: fp16.run(x)
        except Exception as e:  # a UserError when onnxconverter_common is missing
            print(f"fp16 not measured: {e}")
        # precompute's own check of a GPU session (TeacherLogits.check_parity): each session
        # against ONNX Runtime's CPU provider in float32, at the default tolerances.
        cpu = Runner(make_session(onnx_path, "cpu"), 100)
        x = rng.standard_normal((64, 3, 32, 32), dtype=np.float32)
        want = cpu.run(x)
        checked = {"float32": runner}
        if dev == "cuda":
            checked["tf32"] = tf32
        if fp16 is not None:
            checked["float16"] = fp16
        for precision, session_runner in checked.items():
            record = session_parity(session_runner.run(x), want, SESSION_RTOL[precision])
            parity[precision] = record
            print(
                f"precompute's check, {precision} on {dev} vs CPU float32: "
                f"{'passed' if record['passed'] else 'REFUSED'}: {describe_parity(record)}",
                flush=True,
            )
        for b in args.batch:
            x = rng.standard_normal((b, 3, 32, 32), dtype=np.float32)
            ref = torch_eager(x)
            scale = float(np.abs(ref).max())
            print(f"b={b}: largest |logit| {scale:.3g}")
            base = None
            for name, fn in engines.items():
                diff = float(np.abs(fn(x) - ref).max())
                rate = _images_per_s(fn, x, args.seconds)
                base = base or rate
                rows.append(
                    {
                        "batch": b,
                        "engine": name,
                        "images_s": rate,
                        "ratio": rate / base,
                        "diff": diff,
                        "scale": scale,
                    }
                )
                print(
                    f"b={b:4d} {name:32s} {rate:10.0f} img/s  {rate / base:5.2f}x  "
                    f"max|d| {diff:.2e}",
                    flush=True,
                )
    print("\nRESULT (same run; ratio to torch eager on the same device):")
    print("| batch | engine | images/s | × eager | max abs diff vs torch fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batch']} | {r['engine']} | {r['images_s']:.0f} | {r['ratio']:.2f} | "
            f"{r['diff']:.2e} |"
        )

    # float32 sessions: within 1e-4 (the export's parity) or 1e-5 of the largest logit; TF32
    # and fp16 round inputs to 10 mantissa bits: within 1e-2 of the largest logit.
    def tolerance(r: dict) -> float:
        loose = "fp16" in r["engine"] or "TF32" in r["engine"]
        return max(5e-2, 1e-2 * r["scale"]) if loose else max(1e-4, 1e-5 * r["scale"])

    over = [r for r in rows if r["diff"] > tolerance(r)]
    for r in over:  # which row, by how much: "FAIL: parity off" alone does not say
        print(f"over tolerance: b={r['batch']} {r['engine']}: max|d| {r['diff']:.2e} > "
              f"{tolerance(r):.2e}")  # fmt: skip
    refused = [p for p, record in parity.items() if not record["passed"]]
    if refused:
        print(f"refused by precompute's check: {', '.join(refused)}")
    ok = not over and not refused
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ort.json").write_text(
            json.dumps({"engines": rows, "precompute_check": parity}, indent=1)
        )
    print("PASS" if ok else "FAIL: parity off")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
