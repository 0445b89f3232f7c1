"""A store on S3: precompute on two dask workers writes it, distill reads it, verify finds damage
in it, and `verify --repair` + a rerun mend it.

The S3 here is moto's server (an S3-compatible HTTP endpoint, in a thread of this process), set
up the way a user points the AWS SDK at MinIO or another S3-compatible service: the variables
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, which the dask workers
(other processes) inherit. Everything goes through s3fs and zarr's FsspecStore as it would on AWS.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import main
from pipeline.models import read_checkpoint
from storage import open_store
from tests.stages.common import TINY, assert_same_store, build_tiny_run

BUCKET = "logitbank-test"
# float32 (bit-exact comparisons), 4 shards per view; one ONNX Runtime thread per process.
SETTINGS = ["precompute.encoding=float32", "precompute.chunks_per_shard=2", "precompute.threads=1"]


def _args(stage: str, run_dir: Path, *sets: str) -> list[str]:
    every = [f"run_dir={run_dir}", *SETTINGS, *sets]
    return [stage, "--config", str(TINY), "--quiet", *[a for s in every for a in ("--set", s)]]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint for this module's tests; yields an s3fs filesystem on it."""
    missing = [m for m in ("s3fs", "moto") if importlib.util.find_spec(m) is None]
    if missing:  # pure-Python test dependencies on every platform: a broken set-up, not a skip
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup` (the test extra)")
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            with contextlib.suppress(Exception):
                fs.rm(BUCKET, recursive=True)
            # fsspec keeps the S3FileSystem instances made here (bound to this endpoint) for the
            # process: clearing them would leave their aiohttp sessions to the garbage collector,
            # which warns "Unclosed client session" on stderr in the middle of a later test. No
            # later test reaches S3 in this process (the unreachable-endpoint bad input runs in
            # its own).
            server.stop()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Teacher, export, and the one-process store on a local path every S3 store must equal."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny"), _args)


@pytest.fixture(scope="module")
def s3_store(s3, run: Path) -> str:
    """The same store written to S3 by two dask worker processes."""
    url = f"s3://{BUCKET}/run/store.zarr"
    argv = _args("precompute", run, f"precompute.store={url}")
    assert main([*argv, "--workers", "2"]) == 0
    return url


def test_two_workers_write_to_s3_what_one_process_writes_locally(s3, run, s3_store) -> None:
    assert_same_store(s3_store, run / "store.zarr")
    keys = s3.find(f"{BUCKET}/run/store.zarr")
    assert any("/logits/c/" in k for k in keys), keys[:20]
    assert not [k for k in keys if k.endswith(".partial")]  # an object PUT is whole or absent
    # A rerun finds every shard done and writes nothing.
    before = {k: s3.info(k)["ETag"] for k in keys}
    assert main([*_args("precompute", run, f"precompute.store={s3_store}"), "--workers", "2"]) == 0
    assert {k: s3.info(k)["ETag"] for k in s3.find(f"{BUCKET}/run/store.zarr")} == before


def test_distill_from_s3_trains_the_same_student_as_from_a_local_path(run, s3_store) -> None:
    """The teacher's logits come over HTTP instead of from a file: same batches, same weights."""
    common = ["distill.epochs=1", "distill.milestones=[1]"]
    for name, store in (("from-s3", s3_store), ("from-disk", str(run / "store.zarr"))):
        argv = _args("distill", run, *common, f"distill.store={store}", f"distill.name={name}")
        assert main(argv) == 0, name
    a, b = (read_checkpoint(run / "distill" / n / "student.pt") for n in ("from-s3", "from-disk"))
    assert a.extra["teacher_store"] == s3_store
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key


def test_damage_on_s3_is_found_refused_and_repaired(s3, run, s3_store, capsys) -> None:
    """A shard object overwritten with other bytes and another deleted: verify names both,
    distill refuses the store, `verify --repair` marks them not done, a rerun recomputes them."""
    shards = sorted(k for k in s3.find(f"{BUCKET}/run/store.zarr/logits/c") if "/c/" in k)
    assert len(shards) >= 2, shards
    damaged, deleted = shards[0], shards[-1]
    data = bytearray(s3.cat(damaged))
    data[len(data) // 2] ^= 0xFF
    s3.pipe(damaged, bytes(data))
    s3.rm(deleted)
    capsys.readouterr()

    assert main(["verify", s3_store]) == 1
    out = capsys.readouterr().out
    assert out.count("damaged: view ") >= 2, out
    assert "FAILED" in out and s3_store in out, out

    argv = _args("distill", run, "distill.epochs=1", f"distill.store={s3_store}")
    assert main([*argv, "--set", "distill.name=damaged"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "damaged" in err or "corrupt" in err, err

    assert main(["verify", s3_store, "--repair"]) == 1  # repaired, not yet recomputed
    out = capsys.readouterr().out
    assert out.count("repaired: view ") == 2 and "rerun precompute" in out, out
    with open_store(s3_store) as store:
        assert not store.complete
    assert main(_args("precompute", run, f"precompute.store={s3_store}")) == 0
    assert_same_store(s3_store, run / "store.zarr")
    assert main(["verify", s3_store]) == 0


def test_a_bucket_that_does_not_exist_is_one_line(s3, run, capsys) -> None:
    """S3's NoSuchBucket (a FileNotFoundError from s3fs) is the service's answer: one line."""
    url = "s3://no-such-bucket/run/store.zarr"
    assert main(_args("precompute", run, f"precompute.store={url}")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: object storage said: The specified bucket does not exist (FileNotFoundError): "
        "check the store's URL (does the bucket exist?), the endpoint (AWS_ENDPOINT_URL for an "
        "S3-compatible service), the credentials and the network; finished work is kept and a "
        "rerun resumes"
    )
    assert not s3.exists("no-such-bucket")
