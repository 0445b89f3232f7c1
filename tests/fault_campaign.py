"""The fault campaign: SIGKILL ``precompute`` and ``distill`` at random moments, resume, compare.

    python -m tests.fault_campaign --kills 20 [--stage precompute|distill|both] [--seed S]
                                   [--backend zarr|hdf5] [--methods kd,pskd] [--workdir DIR]

On the tiny config (a teacher trained and exported once into a temporary folder) each stage first
runs uninterrupted, through the real command line, while a watcher records when its files change
(store shards and marks, state and checkpoint files): the reference run and its timeline. Then,
for each of K rounds, the same command starts in a fresh run folder and is SIGKILLed at a moment
drawn from a seeded RNG over that timeline — spread over start-up, the writing phase, the moments
files are written (shards, ``done`` marks, ``state.pt``, PS-KD's self-teacher store) and the very
end — then rerun to completion (every third round is killed a second time while resuming). The
result must equal the reference: every array of the store bit for bit (logits, stats, view_params,
labels, done and whatever else the store holds, plus its attributes but the creation time), and
for distill the student's tensors, method state and metrics history (timing fields aside), the
PS-KD self-teacher store left behind, and the files of the output folder.

A kill that comes after the process already exited is not counted as a kill: the table reports
it. Runs use the CPU with one thread (``OMP_NUM_THREADS=1``), the setting in which distill is
bit-exact. The exit status is 1 on any mismatch or failed resume.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "stages" / "configs" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# 1024 rows in 32-row chunks, 2 chunks per shard: 16 shards per view, so a kill can land between
# many shard writes; 3 epochs of 32 batches each for distill.
SETTINGS = (
    "data.options={num_samples: 1024, num_test: 128, image_size: 16, channels: 1, "
    "num_classes: 10, seed: 0}",
    "teacher.epochs=1",
    "teacher.milestones=[]",
    "precompute.chunks_per_shard=2",
    "distill.device=cpu",
    "distill.epochs=3",
    "distill.milestones=[2]",
)
TEACHER_FILES = ("teacher.pt", "teacher.onnx", "teacher.onnx.parity.json")
TIMING = ("rows_per_s", "seconds")
"""Metrics fields that measure time, not what was computed."""
PHASES = ("start-up", "writing", "at a file write", "near the end")


@dataclass
class Timeline:
    """What the reference run showed: its duration and when its files changed (seconds)."""

    duration: float
    events: list[float]

    def __str__(self) -> str:
        at = ", ".join(f"{t:.2f}" for t in self.events[:6])
        more = f" ... {self.events[-1]:.2f}" if len(self.events) > 6 else ""
        return f"{self.duration:.2f} s; files changed at {at}{more} s"

    def moment(self, phase: str, rng: random.Random) -> tuple[bool, float]:
        """A kill moment in ``phase``: (whether it counts from the run's first file write rather
        than from its start, seconds). Start-up time varies most between runs (imports on a
        busy machine), so moments after it are kept relative to the first write."""
        first = self.events[0] if self.events else self.duration / 2
        last = self.events[-1] if self.events else self.duration
        if phase == "start-up":
            return False, rng.uniform(0.05, 0.95 * first)
        if phase == "writing":
            return True, rng.uniform(0, last - first)
        if phase == "at a file write":
            return True, max(0.0, rng.choice(self.events) - first + rng.uniform(-0.03, 0.01))
        return True, rng.uniform(0.9 * (last - first), self.duration - first + 0.05)


class Watcher:
    """Records the times (since ``t0``) at which anything under ``folder`` changes: files
    appearing, growing, being replaced. Resolved-config YAML files, written at start-up, aside."""

    def __init__(self, folder: Path, t0: float, every: float = 0.005) -> None:
        self.folder, self.t0, self.every = folder, t0, every
        self.events: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _snapshot(self) -> frozenset:
        out = []
        for root, _, files in os.walk(self.folder):
            for name in files:
                if name.endswith(".yaml") or name in TEACHER_FILES:
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                out.append((root, name, st.st_size, st.st_mtime_ns, st.st_ino))
        return frozenset(out)

    def _run(self) -> None:
        before = self._snapshot()
        while not self._stop.is_set():
            now = self._snapshot()
            if now != before:
                self.events.append(time.monotonic() - self.t0)
                before = now
            time.sleep(self.every)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.events

    def first(self, proc: subprocess.Popen) -> float | None:
        """The time of the first change, waiting for it; None if ``proc`` ends before it."""
        while not self.events and proc.poll() is None:
            time.sleep(0.001)
        self.stop()
        return self.events[0] if self.events else None


@dataclass
class Kill:
    phase: str
    after_write: bool
    """Whether ``delay`` counts from the run's first file write (else from its start)."""
    delay: float
    at: float = 0.0
    """Seconds after the start of the process when the kill came."""
    landed: bool = False
    """The process was still running when the kill came."""
    progress: str = ""
    """What the killed run had left on disk."""


@dataclass
class Round:
    stage: str
    label: str
    kills: list[Kill] = field(default_factory=list)
    resumed: bool = False
    problems: list[str] = field(default_factory=list)
    junk: list[str] = field(default_factory=list)
    """Temporary files a kill left behind (harmless to the result, but disk space)."""
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return self.resumed and not self.problems


class Campaign:
    """The runs of one campaign, each in its own folder under ``work``."""

    def __init__(self, work: Path, backend: str) -> None:
        self.work = work
        self.backend = backend
        self.store_name = "store.zarr" if backend == "zarr" else "store.h5"
        self.teacher = work / "teacher"
        self.ref_store = work / "ref" / self.store_name
        self.timeout = 900.0

    # ---- commands --------------------------------------------------------------------------
    def argv(self, stage: str, run_dir: Path, method: str | None = None) -> list[str]:
        sets = [f"run_dir={run_dir}", *SETTINGS, f"precompute.backend={self.backend}"]
        if stage == "distill":
            sets += [f"distill.method={method}", f"distill.store={self.ref_store}"]
        args = [sys.executable, "-m", "pipeline", stage, "--config", str(TINY), "--quiet"]
        return args + [a for s in sets for a in ("--set", s)]

    def run(
        self, argv: list[str], *, kill: Kill | None = None, run_dir: Path | None = None
    ) -> tuple[int | None, str]:
        """(exit status, stderr tail) of one command, SIGKILLed as ``kill`` says (which records
        when the kill came and whether the process was still running then)."""
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group: the kill reaches every child
            )
            if kill is not None:
                start = 0.0
                if kill.after_write:
                    start = Watcher(run_dir, t0, every=0.002).first(proc)
                if start is not None:  # else it ended before writing anything
                    try:
                        proc.wait(timeout=max(0.0, start + kill.delay - (time.monotonic() - t0)))
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        kill.landed = True
                kill.at = time.monotonic() - t0
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None, f"timed out after {self.timeout:.0f} s"
            if kill is not None and kill.landed and proc.returncode != -signal.SIGKILL:
                kill.landed = False  # it ended on its own in the same instant
            err.seek(0)
            tail = " | ".join(err.read().strip().splitlines()[-3:])
        return proc.returncode, tail

    # ---- set-up and reference runs ---------------------------------------------------------
    def prepare(self, teacher: Path | None = None) -> None:
        """Train and export the teacher, or copy the files of one already exported."""
        self.teacher.mkdir(parents=True, exist_ok=True)
        if teacher is not None:
            for file in TEACHER_FILES:
                shutil.copy2(teacher / file, self.teacher / file)
            return
        for stage in ("teacher", "export"):
            rc, err = self.run(self.argv(stage, self.teacher))
            if rc != 0:
                raise RuntimeError(f"{stage} failed (exit {rc}): {err}")

    def fresh(self, name: str) -> Path:
        run_dir = self.work / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        for file in TEACHER_FILES:
            shutil.copy2(self.teacher / file, run_dir / file)
        return run_dir

    def reference(self, stage: str, method: str | None = None) -> Timeline:
        run_dir = self.work / "ref" if stage == "distill" else self.fresh("ref")
        t0 = time.monotonic()
        watcher = Watcher(run_dir, t0)
        rc, err = self.run(self.argv(stage, run_dir, method))
        duration = time.monotonic() - t0
        events = watcher.stop()
        if rc != 0:
            raise RuntimeError(f"the reference {stage} run failed (exit {rc}): {err}")
        return Timeline(duration, events)

    # ---- one round -------------------------------------------------------------------------
    def round(
        self,
        stage: str,
        index: int,
        timeline: Timeline,
        phases: list[str],
        rng: random.Random,
        method: str | None = None,
    ) -> Round:
        label = stage if method is None else f"{stage} {method}"
        result = Round(stage, label)
        run_dir = self.fresh(f"{stage}-{index:03d}")
        argv = self.argv(stage, run_dir, method)
        self.timeout = 20 * timeline.duration + 120
        t0 = time.monotonic()
        for phase in phases:
            kill = Kill(phase, *timeline.moment(phase, rng))
            rc, err = self.run(argv, kill=kill, run_dir=run_dir)
            kill.progress = progress(stage, run_dir, self.store_name, method)
            result.kills.append(kill)
            if not kill.landed and rc != 0:
                result.problems.append(f"run ended with exit {rc} before its kill: {err}")
                result.seconds = time.monotonic() - t0
                return result
        rc, err = self.run(argv)
        result.seconds = time.monotonic() - t0
        if rc != 0:
            result.problems.append(f"resume failed (exit {rc}): {err}")
            return result
        result.resumed = True
        result.junk = leftovers(run_dir)
        if result.junk:  # a finished rerun must have cleared what the kills left
            result.problems.append(f"temporary file(s) left: {', '.join(result.junk)}")
        if stage == "precompute":
            result.problems += compare_stores(self.ref_store, run_dir / self.store_name)
        else:
            result.problems += compare_students(
                student_dir(self.work / "ref", method), student_dir(run_dir, method)
            )
        return result


def student_dir(run_dir: Path, method: str) -> Path:
    return run_dir / "distill" / f"small_cnn-{method}-s0"


def progress(stage: str, run_dir: Path, store_name: str, method: str | None) -> str:
    """What a killed run left on disk, in a few words."""
    if stage == "precompute":
        path = run_dir / store_name
        if not path.exists():
            return "no store yet"
        try:
            done = read_arrays(path, ["done"])["done"]
        except Exception as exc:  # a half-created store: say so and go on
            return f"store not readable yet ({type(exc).__name__})"
        return f"{int(done.sum())}/{done.size} chunks done"
    out = student_dir(run_dir, method)
    if (out / "student.pt").exists():
        return "student.pt written" + (" (state.pt left)" if (out / "state.pt").exists() else "")
    if not (out / "state.pt").exists():
        return "no epoch finished"
    import torch

    state = torch.load(out / "state.pt", weights_only=True)
    return f"{int(state['epoch']) + 1} epoch(s) finished"


# ---- comparisons -------------------------------------------------------------------------------
def read_arrays(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every array of a store (or ``names``), read with plain zarr or h5py."""
    if path.is_dir():
        import zarr

        with warnings.catch_warnings():  # the writer's lock file is no zarr node
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(path), mode="r")
            return {n: group[n][...] for n in names or sorted(group.array_keys())}
    import h5py

    with h5py.File(path, "r", swmr=True) as f:
        return {n: f[n][...] for n in names or sorted(f.keys())}


def read_attrs(path: Path) -> dict:
    if path.is_dir():
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(zarr.open_group(str(path), mode="r").attrs)
    import h5py

    with h5py.File(path, "r", swmr=True) as f:
        return {k: str(v) for k, v in f.attrs.items()}


def compare_stores(ref: Path, other: Path) -> list[str]:
    """Differences between two stores: arrays bit for bit, attributes but ``created``."""
    if not other.exists():
        return [f"{other} is missing"]
    a, b = read_arrays(ref), read_arrays(other)
    problems = []
    if a.keys() != b.keys():
        problems.append(f"arrays {sorted(a)} vs {sorted(b)}")
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        elif x.tobytes() != y.tobytes():
            rows = np.flatnonzero((x != y).reshape(x.shape[0], -1).any(axis=1) if x.ndim else [0])
            problems.append(f"{name} differs (first index {rows[:3].tolist()})")
    ta, tb = read_attrs(ref), read_attrs(other)
    for key in sorted((ta.keys() | tb.keys()) - {"created"}):
        if ta.get(key) != tb.get(key):
            problems.append(f"attribute {key}: {ta.get(key)!r} vs {tb.get(key)!r}")
    return problems


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def compare_students(ref: Path, other: Path) -> list[str]:
    """Differences between two distill outputs: weights and method state bit for bit, history
    and metrics apart from timing, the PS-KD store left behind, the files in the folder."""
    import torch

    from pipeline.models import read_checkpoint

    if not (other / "student.pt").is_file():
        return [f"{other}/student.pt is missing"]
    a, b = read_checkpoint(ref / "student.pt"), read_checkpoint(other / "student.pt")
    problems = []
    if a.state_dict.keys() != b.state_dict.keys():
        problems.append("student.pt holds other tensors")
    for key in sorted(a.state_dict.keys() & b.state_dict.keys()):
        x, y = a.state_dict[key], b.state_dict[key]
        if x.dtype != y.dtype or not torch.equal(x, y):
            problems.append(f"student.pt tensor {key} differs")
    ea, eb = dict(a.extra), dict(b.extra)
    ma, mb = ea.pop("method_state", {}), eb.pop("method_state", {})
    if ma.keys() != mb.keys() or any(not torch.equal(ma[k], mb[k]) for k in ma):
        problems.append("method state differs")
    ha, hb = json.loads(ea.pop("history", "[]")), json.loads(eb.pop("history", "[]"))
    if without_timing(ha) != without_timing(hb):
        problems.append("metrics history differs")
    # The resolved config differs in run_dir only (each round runs in its own folder).
    ca, cb = (json.loads(e.pop("config", "{}")) for e in (ea, eb))
    ca.pop("run_dir", None), cb.pop("run_dir", None)
    if ca != cb:
        problems.append("student.pt config differs")
    for key in sorted(ea.keys() | eb.keys()):
        if ea.get(key) != eb.get(key):
            problems.append(f"student.pt {key}: {ea.get(key)!r:.60} vs {eb.get(key)!r:.60}")
    lines = [
        without_timing([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])
        for d in (ref, other)
    ]
    if lines[0] != lines[1]:
        problems.append("metrics.jsonl differs")
    fa, fb = listing(ref), listing(other)
    if fa != fb:
        problems.append(f"files {sorted(fa ^ fb)} in only one of the output folders")
    for name in sorted(fa & fb):
        if name.startswith("pskd/") and name.count("/") == 1:
            problems += [f"{name}: {p}" for p in compare_stores(ref / name, other / name)]
    return problems


def listing(folder: Path) -> set[str]:
    """The output folder's files (and PS-KD stores), as relative paths, temporary files aside;
    inside stores only the top level, whose arrays compare_stores checks."""
    out = set()
    for path in folder.iterdir():
        if path.name == "pskd" and path.is_dir():
            out |= {f"pskd/{p.name}" for p in path.iterdir()}
        elif not is_temporary(path.name):
            out.add(path.name)
    return out


def is_temporary(name: str) -> bool:
    """An atomic write's temporary file (``.NAME.XXXX.tmp``, a shard's ``NAME.HEX.partial``, a
    store being created, ``NAME.creating-HEX``)."""
    return name.endswith((".tmp", ".partial")) or ".creating-" in name


def leftovers(folder: Path) -> list[str]:
    """Temporary files under ``folder``: what a kill in the middle of an atomic write leaves."""
    return sorted(
        str(Path(root, n).relative_to(folder))
        for root, dirs, files in os.walk(folder)
        for n in [*dirs, *files]
        if is_temporary(n)
    )


# ---- the campaign ------------------------------------------------------------------------------
def phase_plan(kills: int, rng: random.Random) -> list[list[str]]:
    """Per round, the phases of its kills: every phase about equally often, in a shuffled
    order, and every third round killed twice (the second time while resuming)."""
    flat = [PHASES[i % len(PHASES)] for i in range(kills)]
    rng.shuffle(flat)
    rounds: list[list[str]] = []
    while flat:
        take = 2 if len(rounds) % 3 == 1 and len(flat) >= 2 else 1
        rounds.append(flat[:take])
        flat = flat[take:]
    return rounds


def run_campaign(
    work: Path,
    *,
    kills: int = 20,
    stages: tuple[str, ...] = ("precompute", "distill"),
    seed: int = 0,
    backend: str = "zarr",
    methods: tuple[str, ...] = ("kd", "pskd"),
    teacher: Path | None = None,
    log=print,
) -> list[Round]:
    """The whole campaign in ``work``; ``teacher``: a folder with an exported teacher of
    :data:`SETTINGS` to reuse (else one is trained and exported first)."""
    rng = random.Random(seed)
    camp = Campaign(work, backend)
    t = time.monotonic()
    camp.prepare(teacher)
    log(f"teacher ready in {time.monotonic() - t:.1f} s ({work})")
    pre = camp.reference("precompute")
    log(f"reference precompute: {pre.duration:.2f} s, {pre}")
    rounds: list[Round] = []
    if "precompute" in stages:
        for i, phases in enumerate(phase_plan(kills, rng)):
            rounds.append(camp.round("precompute", i, pre, phases, rng))
            log(describe(rounds[-1]))
    if "distill" in stages:
        refs = {}
        for method in methods:
            refs[method] = camp.reference("distill", method)
            log(f"reference distill {method}: {refs[method]}")
        for i, phases in enumerate(phase_plan(kills, rng)):
            method = methods[i % len(methods)]
            rounds.append(camp.round("distill", i, refs[method], phases, rng, method))
            log(describe(rounds[-1]))
    return rounds


def describe(r: Round) -> str:
    kills = "; ".join(
        f"{k.phase} @ {k.at:.2f} s: "
        + (f"killed, left {k.progress}" if k.landed else "came after exit")
        for k in r.kills
    )
    verdict = "identical" if r.identical else "PROBLEM: " + " / ".join(r.problems)
    junk = f"; temporary file(s) left: {', '.join(r.junk)}" if r.junk else ""
    return f"  {r.label:<16} {kills} -> {verdict}{junk} ({r.seconds:.1f} s)"


def table(rounds: list[Round], backend: str) -> str:
    head = (
        "| stage | backend | rounds | kills | killed while running | came after exit "
        "| rounds killed twice | resumed OK | identical | temp files left | seconds |"
    )
    lines = [head, "|" + " --- |" * 11]
    for stage in dict.fromkeys(r.stage for r in rounds):
        rs = [r for r in rounds if r.stage == stage]
        ks = [k for r in rs for k in r.kills]
        landed = sum(k.landed for k in ks)
        twice = sum(sum(k.landed for k in r.kills) >= 2 for r in rs)
        lines.append(
            f"| {stage} | {backend} | {len(rs)} | {len(ks)} | {landed} | {len(ks) - landed} "
            f"| {twice} | {sum(r.resumed for r in rs)}/{len(rs)} "
            f"| {sum(r.identical for r in rs)}/{len(rs)} | {sum(len(r.junk) for r in rs)} "
            f"| {sum(r.seconds for r in rs):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_campaign", description=__doc__)
    parser.add_argument("--kills", type=int, default=20, help="kill moments per stage")
    parser.add_argument("--stage", choices=("precompute", "distill", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("zarr", "hdf5"), default="zarr")
    parser.add_argument("--methods", default="kd,pskd", help="distill methods, comma-separated")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    stages = ("precompute", "distill") if args.stage == "both" else (args.stage,)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        t0 = time.monotonic()
        rounds = run_campaign(
            work,
            kills=args.kills,
            stages=stages,
            seed=args.seed,
            backend=args.backend,
            methods=methods,
            log=lambda line: print(line, flush=True),
        )
    print()
    print(table(rounds, args.backend))
    bad = [r for r in rounds if not r.identical]
    print(
        f"\n{len(rounds) - len(bad)}/{len(rounds)} rounds resumed to a bit-identical result "
        f"in {time.monotonic() - t0:.0f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
