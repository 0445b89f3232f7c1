"""Security: nothing read from a file runs code or decides which files logitbank touches.

- No free unpickling: a scan of the project's source, and malicious pickles (a ``__reduce__``
  that would create a marker file) as the teacher checkpoint, a student's resume state and a
  finished ``student.pt`` — each refused with one line (or, for the report, never loaded), and
  the marker never created.
- A store's attributes (zarr and HDF5) holding paths ("../../", absolute) are compared, shown or
  refused, never opened; an HDF5 store whose data lives in other files is refused.
- An ONNX file with external data outside its folder is refused before ONNX Runtime or
  ``onnx.load`` opens that data; ``metadata_props`` are never used.

File opens are watched with an audit hook (``sys.addaudithook``), so "never opened" is checked,
not assumed.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.errors import UserError
from storage import create_store, open_store
from storage.errors import StoreError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "stages" / "configs" / "tiny.yaml"
SOURCES = ("pipeline", "stages", "storage")

# ---- watching file opens -------------------------------------------------------------------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def watching_opens() -> Iterator[list[str]]:
    """Every path this process opens inside the block (Python's ``open`` audit event)."""
    global _OPENED
    _OPENED = opened = []
    try:
        yield opened
    finally:
        _OPENED = None


def _touched(opened: list[str], outside: Path) -> list[str]:
    root = outside.resolve()
    return [p for p in opened if Path(p).resolve().is_relative_to(root)]


# ---- the source: nothing that unpickles or evaluates file content ---------------------------
def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "?"
    return None


def _unsafe(path: Path, root: Path = REPO) -> list[str]:
    """Calls in ``path`` that could unpickle or evaluate what a file holds."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for name, call in _calls(tree):
        where = f"{path.relative_to(root)}:{call.lineno} {name}"
        short = name.rsplit(".", 1)[-1]
        if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "eval",
                    "exec", "shelve.open", "dill.load", "dill.loads", "joblib.load",
                    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                    "torch.jit.load", "pickle.Unpickler"):  # fmt: skip
            found.append(where)
        elif name == "torch.load" and _keyword(call, "weights_only") is not True:
            found.append(f"{where} without weights_only=True")
        elif (
            short == "load"
            and name.startswith(("np.", "numpy."))
            and _keyword(call, "allow_pickle") not in (None, False)
        ):
            found.append(f"{where} with allow_pickle")
    # An Unpickler subclass is allowed only when it overrides find_class (a restricted one).
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            ast.unparse(b).endswith("Unpickler") for b in node.bases
        ):
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(f"{path.relative_to(root)}:{node.lineno} unrestricted Unpickler")
    return found


def _sources() -> list[Path]:
    return sorted(p for d in SOURCES for p in (REPO / d).rglob("*.py"))


def test_the_source_never_unpickles_or_evaluates_file_content() -> None:
    assert len(_sources()) > 40  # the scan sees the project
    found = [hit for path in _sources() for hit in _unsafe(path)]
    assert not found, found


def test_the_scan_catches_what_it_is_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, numpy as np, yaml\n"
        "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "np.load('x', allow_pickle=True)\nyaml.load('x')\neval('1')\n"
        "class U(pickle.Unpickler):\n    pass\n"
    )
    assert len(_unsafe(bad, tmp_path)) == 7, _unsafe(bad, tmp_path)


def test_onnx_metadata_is_never_read() -> None:
    for path in _sources():
        tree = ast.parse(path.read_text())
        used = [n for n in ast.walk(tree) if getattr(n, "attr", None) == "metadata_props"]
        assert not used, f"{path} reads an ONNX model's metadata_props"


# ---- malicious pickles -----------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _argv(stage: str, run: Path, *sets: str) -> list[str]:
    argv = [stage, "--config", str(TINY), "--quiet"]
    for item in (f"run_dir={run}", "distill.device=cpu", "distill.name=s", *sets):
        argv += ["--set", item]
    return argv


def _refused(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("stage", "name", "fix"),
    [
        ("export", "teacher.pt", "re-create it"),
        ("distill", "distill/s/state.pt", "delete it to train this student afresh"),
        ("distill", "distill/s/student.pt", "delete it to train the student again"),
    ],
    ids=["teacher-checkpoint", "resume-state", "student-checkpoint"],
)
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, stage, name, fix):
    import torch

    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "state_dict": Payload(marker)}, path)
    # CE reads no teacher store: with none here, a store-reading method would stop on that first.
    argv = _argv(stage, tmp_path, "distill.method=ce")
    _refused(capsys, argv, str(path), "pickled Python objects", fix)
    assert not marker.exists()
    # A bare pickle (not a torch.save archive) is not even handed to the unpickler.
    path.write_bytes(__import__("pickle").dumps(Payload(marker)))
    _refused(capsys, argv, "is not a PyTorch checkpoint", fix)
    assert not marker.exists()


def test_the_report_never_loads_a_student_checkpoint(tmp_path, capsys) -> None:
    import torch

    marker = tmp_path / "PWNED"
    folder = tmp_path / "distill" / "small_cnn-kd-s0"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 50.0}) + "\n")
    (folder / "config.yaml").write_text("distill: {student: small_cnn, method: kd, seed: 0}\n")
    torch.save({"format": "logitbank-checkpoint", "x": Payload(marker)}, folder / "student.pt")
    torch.save({"format": "logitbank-checkpoint", "x": Payload(marker)}, tmp_path / "teacher.pt")
    with watching_opens() as opened:
        assert main(_argv("report", tmp_path)) == 0
    capsys.readouterr()
    assert not marker.exists()
    assert str(folder / "student.pt") not in opened  # finished = the file exists; never read
    assert (tmp_path / "report" / "results.md").is_file()


# ---- stores whose attributes hold paths ------------------------------------------------------
def _store(tmp_path: Path, backend: str) -> tuple[Path, Path]:
    """A store whose fingerprint and extra attributes name files outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not logits\n")
    path = tmp_path / "run" / ("store.zarr" if backend == "zarr" else "store.h5")
    path.parent.mkdir()
    paths = {"dataset": "../outside/secret", "onnx_sha256": str(outside / "secret")}
    with create_store(
        path, 100, 10, 2, chunk_rows=32, backend=backend, fingerprint=paths,
        labels=np.arange(100) % 10,  # a store whose fingerprint names a dataset holds its labels
        attrs={"location": "../../outside/secret", "created": str(outside / "secret")},
    ) as store:  # fmt: skip
        for view in range(2):
            store.write(view, 0, np.random.default_rng(view).standard_normal((100, 10)))
    return path, outside


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_paths_in_store_attributes_are_never_opened(tmp_path, capsys, backend) -> None:
    path, outside = _store(tmp_path, backend)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with watching_opens() as opened:
        with open_store(path) as store:
            assert store.fingerprint["dataset"] == "../outside/secret"  # shown, not followed
            assert store.read([0, 99], view=1).shape == (2, 10)
        assert main(["verify", str(path)]) == 0
        assert main(["audit", str(path), "--rows", "50"]) == 0
        with open_store(path, mode="a") as store:
            assert store.complete
    capsys.readouterr()
    assert not _touched(opened, outside), _touched(opened, outside)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (outside / "secret").read_text() == "not logits\n"


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.parametrize("key", ["num_views", "chunk_rows", "chunks_per_shard"])
def test_a_path_where_a_store_wants_a_number_is_refused(tmp_path, capsys, backend, key) -> None:
    path, outside = _store(tmp_path, backend)
    if backend == "zarr":
        meta = path / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"][key] = "../../outside/secret"
        meta.write_text(json.dumps(doc))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f.attrs[key] = "../../outside/secret"
    with watching_opens() as opened:
        with pytest.raises(StoreError, match=f"{key} must be an integer"):
            open_store(path)
        _refused(capsys, ["verify", str(path)], f"{key} must be an integer")
    assert not _touched(opened, outside)


@pytest.mark.parametrize("how", ["external-storage", "external-link", "virtual"])
def test_an_hdf5_store_with_data_in_other_files_is_refused(tmp_path, capsys, how) -> None:
    import h5py

    path, outside = _store(tmp_path, "hdf5")
    victim = outside / "victim.h5"
    with h5py.File(victim, "w") as f:
        f["labels"] = np.arange(100, dtype=np.int64)
    original = victim.read_bytes()
    with h5py.File(path, "r+", libver="latest") as f:
        del f["labels"]
        if how == "external-storage":  # raw bytes of another file, "../outside/victim.h5"
            f.create_dataset("labels", (100,), "int64", external=[("../outside/victim.h5", 0, 800)])
        elif how == "external-link":
            f["labels"] = h5py.ExternalLink(str(victim), "/labels")
        else:
            layout = h5py.VirtualLayout((100,), "int64")
            layout[:] = h5py.VirtualSource(str(victim), "labels", shape=(100,))
            f.create_virtual_dataset("labels", layout)
    with watching_opens() as opened:
        for mode in ("r", "a"):
            with pytest.raises(StoreError, match="points to data outside the file"):
                open_store(path, mode=mode)
        _refused(capsys, ["verify", str(path)], "'labels' points to data outside the file")
    assert victim.read_bytes() == original
    assert not _touched(opened, outside)
    # The writer lock was released on refusal: a fresh writer is not told someone is writing.
    with pytest.raises(StoreError, match="points to data outside"):
        open_store(path, mode="a")


# ---- ONNX files ---------------------------------------------------------------------------
def _onnx_model(folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """A tiny teacher (flatten, matmul: (B, 1, 4, 4) → (B, 10)); its weight stored externally
    at ``location`` (relative to ``folder`` unless absolute) when given."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32), "weight"
    )
    if location is not None:
        target = Path(location) if Path(location).is_absolute() else folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(weight.raw_data)
        set_external_data(weight, location=location)
        weight.data_location = TensorProto.EXTERNAL
        weight.ClearField("raw_data")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "teacher",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {"location": "../../outside/secret", "path": "/etc/passwd"})
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_next_to_the_model_runs(tmp_path: Path) -> None:
    from pipeline.ort import Runner, check_io, make_session

    path = _onnx_model(tmp_path / "model", location="weights.bin")
    session = make_session(path, provider="cpu", threads=1)
    check_io(session, 10, (1, 4, 4))
    assert Runner(session, 10).run(np.ones((3, 1, 4, 4), np.float32)).shape == (3, 10)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "deep"])
def test_external_data_outside_the_models_folder_is_refused_unread(tmp_path, where) -> None:
    from pipeline.ort import make_session

    outside = tmp_path / "outside"
    folder = tmp_path / "model"
    if where == "symlink":  # a name inside the folder that leads out of it
        path = _onnx_model(folder, location="link.bin")
        (outside / "secret.bin").parent.mkdir(parents=True)
        os.replace(folder / "link.bin", outside / "secret.bin")
        (folder / "link.bin").symlink_to(outside / "secret.bin")
    else:
        location = {
            "parent": "../outside/secret.bin",
            "absolute": str(outside / "secret.bin"),
            "deep": "sub/../../outside/secret.bin",
        }[where]
        path = _onnx_model(folder, location=location)
    with watching_opens() as opened:
        with pytest.raises(UserError, match="outside the model's folder; refused unread"):
            make_session(path, provider="cpu", threads=1)
        with pytest.raises(UserError, match="outside the model's folder"):
            make_session(path, provider="cpu", threads=1, fp16=True)
    assert not _touched(opened, outside), _touched(opened, outside)


def test_onnx_metadata_naming_paths_is_ignored(tmp_path: Path) -> None:
    import onnx

    from pipeline.ort import Runner, make_session

    outside = tmp_path / "outside"
    outside.mkdir()
    path = _onnx_model(tmp_path / "model")
    assert {p.key for p in onnx.load(str(path)).metadata_props} == {"location", "path"}
    with watching_opens() as opened:
        session = make_session(path, provider="cpu", threads=1)
        Runner(session, 10).run(np.ones((2, 1, 4, 4), np.float32))
    assert not _touched(opened, outside)
    assert not any(p.endswith("passwd") for p in opened)
