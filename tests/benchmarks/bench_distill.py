"""Distill training throughput and peak memory: CE only vs offline KD vs online KD, in one run.

The same student, batch size, rows and batch order (the plan does not depend on where the logits
come from), one epoch per mode:

- CE only: ``distill.method=ce``, no teacher at all — the ceiling;
- offline KD: ``kd`` from the precomputed store (``teacher_source: store``);
- online KD: ``kd`` with the teacher checkpoint in memory, run on every batch
  (``teacher_source: online``).

The data set is synthetic and CIFAR-like (3x32x32, 100 classes, made by the ``synthetic`` kind
and read back as an ``array`` dataset file, as a real one would be); the teacher has random weights
(speed does not depend on them), goes through ``export`` and ``precompute`` once (untimed), and view
0 is a real crop + flip (``augment.identity_view0=false``), so the student's replay does real work.
Each (mode, repeat) runs in its own subprocess, in the order CE, offline, online, CE, offline, ...
so machine noise hits every mode alike; medians are reported, and "x CE" is the median of the
per-repeat ratios (each ratio pairs neighbouring runs).

Per mode:

- rows/s: the training loop's own figure (``metrics.jsonl`` ``rows_per_s``: first batch to last
  step, evaluation excluded);
- peak RSS: the subprocess's ``VmHWM`` (``ru_maxrss`` where there is no /proc), and its growth
  over the RSS just before ``train_student`` (after the imports and a throw-away SGD step on a
  tiny conv, so torch's lazy imports are not counted): dataset, student, optimizer, batches,
  logits, teacher; on CUDA also ``torch.cuda.max_memory_allocated``;
- waiting for data: time the training loop spends blocked in ``next()`` on the prefetch iterator
  (``pipeline.distill.prefetch`` wrapped in the subprocess), as a share of the loop's time;
- data path alone: the same ``EpochBatches`` + prefetch + ``ToDevice`` iterator (same config,
  same epoch, built afresh for each pass) drained with no training, passes repeated until a second
  is timed, in rows/s; "data / step" = training rows/s ÷ data rows/s, the share of a step's time
  the data path would cost if nothing overlapped it;
- step alone: a fresh student trained one epoch by the same loop on the epoch's first batch,
  prepared once and yielded again at every step (only its copy to the device is repeated), so no
  store read, replay or prefetch thread runs beside the step: rows/s, its ratio to CE's step alone
  (what the method itself costs a step), and "loop / step alone" = training rows/s ÷ step-alone
  rows/s (what the data path costs the loop, overlap, GIL and cores included).

Before the baseline each subprocess also runs a few untimed steps of its method's loss on random
logits, so CUDA's fused kernels are compiled before the epoch rather than inside its timing.

Target: offline >= 0.95x CE only. Only ratios are results on a shared machine.

Default sizes follow the device: on CUDA resnet32x4 -> resnet8x4 on 16,384 rows; on the CPU
vgg8 -> small_cnn on 8,192 rows, so that a default run stays near 3 minutes on 2 cores (a resnet56
or resnet32x4 teacher forwards well under 100 rows/s on 2 cores: one online epoch of 8k rows
alone would take minutes; pass ``--teacher resnet56`` to measure it anyway).

    python -m tests.benchmarks.bench_distill [--rows N] [--student NAME] [--teacher NAME]
        [--batch 64] [--repeats 2] [--device auto|cpu|cuda] [--memory-budget-mb MB]

``BENCH_DISTILL_PROFILE=DIR`` profiles each mode's training into ``DIR/profile_MODE.txt``: on
CUDA torch.profiler's ops by self CUDA and self CPU time (which side a step waits on), on the CPU
a cProfile by own and cumulative time. A diagnosis: the table it also prints is slowed by it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "stages" / "configs" / "tiny.yaml"
MODES = ("ce", "offline", "online")
LABELS = {"ce": "CE only", "offline": "offline KD (store)", "online": "online KD (teacher)"}
MODE_SETS = {
    "ce": ["distill.method=ce"],
    "offline": ["distill.method=kd", "distill.teacher_source=store"],
    "online": ["distill.method=kd", "distill.teacher_source=online"],
}
TARGET = 0.95
DATA_SECONDS, DATA_PASSES = 1.0, 20  # the data path alone: time at least this, at most this many
CLASSES = 100
DEFAULTS = {  # device -> (rows, student, teacher)
    "cuda": (16384, "resnet8x4", "resnet32x4"),
    "cpu": (8192, "small_cnn", "vgg8"),
}


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status if line[:2] == "Vm"}
        return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024
    except (OSError, KeyError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
        return peak_mb, peak_mb


def _write_data(path: Path, rows: int) -> dict:
    """The synthetic CIFAR-like set as an ``array`` dataset file (loaded like a real one: the
    generator's float temporaries stay out of the measured processes); its ``data.options``."""
    import numpy as np

    from pipeline.datasets import synthetic

    options = {"num_samples": rows, "num_test": 256, "image_size": 32, "channels": 3}
    train, test = (synthetic(s, **options, num_classes=CLASSES, seed=0) for s in ("train", "test"))
    np.savez(
        path,
        train_images=np.asarray(train.images),
        train_labels=train.labels,
        test_images=np.asarray(test.images),
        test_labels=test.labels,
    )
    return {"num_classes": CLASSES, "mean": list(train.mean), "std": list(train.std)}


def _warm_method(config, device) -> None:
    """A few untimed steps of the method's loss on random logits: the fused kernels (CUDA) are
    compiled before the epoch, not inside its timing."""
    import torch

    from pipeline.distill_inputs import build_student_method
    from pipeline.methods import MethodContext

    cfg = config.distill
    method = build_student_method(cfg.method, cfg.method_options, CLASSES).to(device)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(cfg.batch_size, CLASSES, generator=gen).to(device).requires_grad_()
    teacher = 3 * torch.randn(cfg.batch_size, CLASSES, generator=gen).to(device)
    target = torch.randint(0, CLASSES, (cfg.batch_size,), generator=gen).to(device)
    for _ in range(3):
        method(student, teacher, target, MethodContext(0, cfg.epochs, 1))["total"].backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(spec: dict) -> dict:
    """One mode, one epoch, in this (fresh) process: the figures of one table cell each."""
    import torch

    import pipeline.distill as distill
    from pipeline.config import load_config
    from pipeline.data import splits
    from pipeline.distill_data import ToDevice
    from pipeline.distill_inputs import build_sources, build_student_method

    config = load_config(TINY, spec["sets"])
    device = distill.pick_device(config.distill.device)
    cuda = device.type == "cuda"
    clock = {"wait": 0.0, "first": None}
    original = distill.prefetch

    def timed_prefetch(batches, depth):  # the loop's batch source, with its blocking timed
        it = original(batches, depth)
        try:
            while True:
                start = time.perf_counter()
                batch = next(it, None)
                waited = time.perf_counter() - start
                clock["wait"] += waited
                if clock["first"] is None:
                    clock["first"] = waited
                if batch is None:
                    return
                yield batch
        finally:
            it.close()

    distill.prefetch = timed_prefetch
    # torch's lazy one-off costs out of the baseline (the first SGD step imports torch._dynamo,
    # ~130 MB; the first convolution sets up oneDNN): the growth is then this mode's own.
    probe = torch.nn.Conv2d(3, 4, 3)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    probe(torch.zeros(2, 3, 8, 8)).sum().backward()
    opt.step()
    del probe, opt
    _warm_method(config, device)
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before, _ = _memory_mb()
    profile_dir = os.environ.get("BENCH_DISTILL_PROFILE")  # a diagnosis, not a figure
    if profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        out = Path(profile_dir) / f"profile_{spec['mode']}.txt"
        if cuda:  # host and GPU time per op: which side the step waits on
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            with profile(activities=activities) as prof:
                distill.train_student(config, progress=False)
            averages = prof.key_averages()
            out.write_text(
                "by self CUDA time:\n"
                + averages.table(sort_by="self_cuda_time_total", row_limit=30)
                + "\nby self CPU time:\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=30)
            )
        else:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(distill.train_student, config, progress=False)
            with open(out, "w") as f:
                stats = pstats.Stats(profiler, stream=f).sort_stats("tottime")
                stats.print_stats(45)
                stats.sort_stats("cumulative").print_stats(45)
    else:
        distill.train_student(config, progress=False)
    _, rss_peak = _memory_mb()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    distill.prefetch = original

    out = distill.output_dir(config)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    rows_per_s = record["rows_per_s"]

    # The data path alone: the same plan, the same prefetch, nothing consuming but a counter.
    cfg = config.distill
    train, _ = splits(config)
    needs = build_student_method(cfg.method, cfg.method_options, train.num_classes).teacher_input
    # One pass takes a fraction of a second: fresh sources (untimed) and a timed pass, again
    # until a second has been timed, so each pass pays what the training epoch paid (the store's
    # view loaded into RAM on the first window, the prefetch thread started).
    rows = 0
    data_s = 0.0
    for _ in range(DATA_PASSES):
        src = build_sources(config, train, needs, device, out, distill.config_key(config))
        try:
            start = time.perf_counter()
            depth = src.prefetch_depth(cfg.prefetch, device)
            for batch in ToDevice(device)(original(src.batches(0), depth)):
                rows += len(batch.indices)
            if cuda:
                torch.cuda.synchronize(device)
            data_s += time.perf_counter() - start
        finally:
            if src.store is not None:
                src.store.close()
        if data_s >= DATA_SECONDS:
            break
    loop_s = len(train) / rows_per_s
    distill.prefetch = _one_batch(original, math.ceil(len(train) / cfg.batch_size))
    try:  # the step alone: a fresh student trained one epoch on one batch, repeated
        alone = load_config(TINY, [*spec["sets"], f"distill.name={out.name}-step"])
        distill.train_student(alone, progress=False)
    finally:
        distill.prefetch = original
    record = json.loads((distill.output_dir(alone) / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "step_rows_per_s": record["rows_per_s"],
        "rows_per_s": rows_per_s,
        "wait_frac": clock["wait"] / loop_s,
        "first_wait_s": clock["first"] or 0.0,
        "rss_peak_mb": rss_peak,
        "rss_growth_mb": rss_peak - rss_before,
        "cuda_peak_mb": cuda_peak,
        "data_rows_per_s": rows / data_s,
    }


def _one_batch(original: Callable, steps: int) -> Callable:
    """A ``prefetch`` that yields the epoch's first batch ``steps`` times, made once by the real
    data path (read, replayed, pinned): the training loop then runs with nothing of the data path
    beside it but the batch's copy to the device."""

    def batches(source: Iterator, depth: int) -> Iterator:
        it = original(source, 0)
        try:
            first = next(it)
        finally:
            it.close()
        for _ in range(steps):
            yield first

    return batches


def _run_mode(spec: dict) -> dict:
    """``_worker`` in a subprocess (fresh RSS peak, fresh allocator, no warm caches of Python)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        spec = {**spec, "result": result.name}
        proc = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.bench_distill", "--worker", json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"mode {spec['mode']} failed (exit status {proc.returncode})")
        return json.loads(Path(result.name).read_text())


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="training rows (default by device)")
    parser.add_argument("--student", default=None, help="default: resnet8x4 (CUDA), small_cnn")
    parser.add_argument("--teacher", default=None, help="default: resnet32x4 (CUDA), vgg8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--memory-budget-mb",
        type=int,
        default=None,
        help="distill.memory_budget_mb (1: stream the store chunk by chunk instead of in RAM)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(_worker(spec)))
        return 0

    import torch

    from pipeline.__main__ import main as cli
    from pipeline.models import build_model, save_checkpoint
    from pipeline.ort import available_cores

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    rows, student, teacher = DEFAULTS[device]
    rows, student, teacher = args.rows or rows, args.student or student, args.teacher or teacher
    load_start = os.getloadavg()

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        ckpt = run / "given.pt"
        kwargs = {"num_classes": CLASSES, "in_channels": 3, "image_size": (32, 32)}
        torch.manual_seed(0)
        save_checkpoint(
            ckpt, build_model(teacher, **kwargs), model_name=teacher, model_kwargs=kwargs
        )
        data = _write_data(run / "data.npz", rows)
        sets = [
            f"run_dir={run}",
            "data.kind=array",
            f"data.path={run / 'data.npz'}",
            f"data.options={json.dumps(data)}",
            "augment.views=1",
            "augment.identity_view0=false",
            f"teacher.checkpoint={ckpt}",
            "precompute.batch_size=256",
            "precompute.encoding=float16",
            "precompute.chunk_rows=null",
            "precompute.provider=auto",  # untimed setup: a CPU-only onnxruntime will do
            f"distill.student={student}",
            "distill.epochs=1",
            f"distill.batch_size={args.batch}",
            f"distill.device={device}",
            "distill.eval_batch_size=256",
        ]
        if args.memory_budget_mb is not None:
            sets.append(f"distill.memory_budget_mb={args.memory_budget_mb}")
        cli_args = [a for s in sets for a in ("--set", s)]
        setup = time.perf_counter()
        for stage in ("export", "precompute"):
            status = cli([stage, "--config", str(TINY), *cli_args, "--quiet"])
            if status != 0:
                print(f"error: {stage} failed (exit status {status})", file=sys.stderr)
                return 1
        setup_s = time.perf_counter() - setup
        for r in range(args.repeats):
            for mode in MODES:
                name = f"distill.name={mode}-r{r}"
                started = time.perf_counter()
                result = _run_mode({"mode": mode, "sets": [*sets, *MODE_SETS[mode], name]})
                results[mode].append(result)
                # each run's figures as they come: a later mode that fails (or a time limit)
                # must not lose them
                took = time.perf_counter() - started
                print(f"{mode} r{r} ({took:.0f} s): {json.dumps(result)}", flush=True)
    load_end = os.getloadavg()

    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in results[mode]]
        return None if None in values else statistics.median(values)

    ratio = {
        m: statistics.median(
            a["rows_per_s"] / c["rows_per_s"] for a, c in zip(results[m], results["ce"])
        )
        for m in MODES
    }
    step_ratio = {
        m: statistics.median(
            a["step_rows_per_s"] / c["step_rows_per_s"] for a, c in zip(results[m], results["ce"])
        )
        for m in MODES
    }
    budget = args.memory_budget_mb if args.memory_budget_mb is not None else 1024
    in_ram = rows * CLASSES * 4 <= budget << 20
    if device == "cuda":
        where = f"cuda ({torch.cuda.get_device_name()})"
    else:
        where = f"cpu, {torch.get_num_threads()} torch thread(s)"
    print(
        f"\ndistill throughput: student {student}, batch {args.batch}, {rows} rows 3x32x32 -> "
        f"{CLASSES} classes, 1 epoch per mode, {args.repeats} repeat(s) interleaved, {where}"
    )
    print(
        f"teacher {teacher} (random weights); store float16, 1 view, "
        f"{'held in RAM' if in_ram else 'streamed by chunk windows'}; "
        f"export + precompute {setup_s:.0f} s (untimed setup)"
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {available_cores()} core(s), {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, torch {torch.__version__}; load average "
        f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end"
    )
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    cuda_col = device == "cuda"
    head = ["mode", "rows/s", "× CE", "peak RSS MB", "RSS growth MB"]
    head += ["CUDA peak MB"] if cuda_col else []
    head += ["waiting-for-data %", "data path alone rows/s", "data / step %"]
    head += ["step alone rows/s", "step alone × CE", "loop / step alone %"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for m in MODES:
        rps, data = med(m, "rows_per_s"), med(m, "data_rows_per_s")
        cells = [
            LABELS[m],
            _fmt(rps),
            f"{ratio[m]:.2f}",
            _fmt(med(m, "rss_peak_mb")),
            _fmt(med(m, "rss_growth_mb")),
        ]
        cells += [_fmt(med(m, "cuda_peak_mb"), ",.1f")] if cuda_col else []
        cells += [f"{100 * med(m, 'wait_frac'):.1f}", _fmt(data), f"{100 * rps / data:.1f}"]
        alone = med(m, "step_rows_per_s")
        cells += [_fmt(alone), f"{step_ratio[m]:.2f}", f"{100 * rps / alone:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print("per repeat, rows/s (waiting-for-data %; first batch wait s):")
    for m in MODES:
        each = ", ".join(
            f"{r['rows_per_s']:,.0f} ({100 * r['wait_frac']:.1f}%; {r['first_wait_s']:.2f})"
            for r in results[m]
        )
        print(f"  {LABELS[m]}: {each}")
    print(
        "per repeat, step alone rows/s: "
        + "; ".join(
            f"{LABELS[m]} " + ", ".join(f"{r['step_rows_per_s']:,.0f}" for r in results[m])
            for m in MODES
        )
    )
    met = ratio["offline"] >= TARGET
    print(
        f"target offline >= {TARGET:.2f}x CE: {'met' if met else 'NOT met'} "
        f"({ratio['offline']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
