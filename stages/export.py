"""`export`: the teacher to one ONNX file, parity-checked against PyTorch on real batches."""

from __future__ import annotations

import argparse

from stages.common import add_config_arguments, config_from_args

PARITY_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def export_key(config, checkpoint_sha256: str, located: bool = False) -> str:
    """What the exported file and its parity check depend on: the checkpoint, the export
    settings, and the dataset (by its content hash, wherever the files lie; ``located``: by
    ``data.path``, the key of exports made before 2026-11-27) and views its parity batches
    come from."""
    from pipeline.config import to_dict
    from pipeline.data import dataset_sha256
    from pipeline.fingerprint import spec_hash

    d = to_dict(config)
    if not located:
        d["data"]["path"] = dataset_sha256(config.data)
    spec = {k: d[k] for k in ("export", "data", "augment")}
    return spec_hash({**spec, "checkpoint_sha256": checkpoint_sha256})


def export_keys(config, checkpoint_sha256: str) -> tuple[str, str]:
    """The key of this config's export, then that of one made before the key took the
    dataset's content (re-exporting it would give another ONNX file, and the store made from
    the old one would be refused)."""
    return export_key(config, checkpoint_sha256), export_key(config, checkpoint_sha256, True)


def finished_export(onnx_path, keys: tuple[str, ...]) -> dict | None:
    """The parity record of an earlier export of one of ``keys`` whose file is still the one
    checked, or None (nothing there, another checkpoint or setting, a file changed since)."""
    import json

    from pipeline.onnx_export import parity_path, sha256_file

    try:
        record = json.loads(parity_path(onnx_path).read_text())
        same = isinstance(record, dict) and record.get("export_key") in keys
        if same and record.get("passed") and record.get("onnx_sha256") == sha256_file(onnx_path):
            return record
    except (OSError, ValueError):
        pass
    return None


def made_with(config) -> bool:
    """Whether RUN_DIR/teacher.onnx is this config's export, parity-checked (the command line
    asks on Ctrl-C before it records the config beside it)."""
    from pipeline.onnx_export import sha256_file

    if not config.teacher_checkpoint.is_file():
        return False
    keys = export_keys(config, sha256_file(config.teacher_checkpoint))
    return finished_export(config.onnx_path, keys) is not None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.data import splits
    from pipeline.errors import ModelError
    from pipeline.fileio import remove_stale_temps
    from pipeline.models import load_model_from_checkpoint, read_checkpoint
    from pipeline.onnx_export import export_onnx, sha256_file

    config = config_from_args(args, "export")
    # The temporary files of an export killed mid-write (an ONNX file of a large teacher).
    remove_stale_temps(config.onnx_path.parent, (config.onnx_path.name,))
    model = load_model_from_checkpoint(config.teacher_checkpoint)
    train, _ = splits(config)
    built = read_checkpoint(config.teacher_checkpoint).model_kwargs
    size = built.get("image_size")
    size = (size, size) if isinstance(size, int) else None if size is None else tuple(size)
    have = (built.get("num_classes"), built.get("in_channels"), size)
    want = (train.num_classes, train.image_shape[0], tuple(train.image_shape[1:]))
    if have[2] is None:  # a checkpoint that does not say: any size it runs on
        want = (*want[:2], None)
    if have != want:
        raise ModelError(
            f"teacher {config.teacher_checkpoint} was built for {have[0]} classes, {have[1]} "
            f"input channel(s) and {have[2]} images; the dataset has {want[0]}, {want[1]} and "
            f"{want[2]}: train or give a teacher for this dataset"
        )
    checkpoint_sha256 = sha256_file(config.teacher_checkpoint)
    keys = export_keys(config, checkpoint_sha256)
    key = keys[0]
    done = finished_export(config.onnx_path, keys)
    if done is not None:
        diff = done["max_abs_diff"]
        print(
            f"export: {config.onnx_path} up to date (this checkpoint and these settings; max "
            f"|ORT - torch| {diff:.2e}): delete it to export again"
        )
        return 0
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(config.export.parity_batches):
        idx = np.sort(rng.choice(len(train), min(PARITY_BATCH, len(train)), replace=False))
        batches.append(train.batch(idx, view=1 if config.augment.views > 1 else None)[0])
    record = export_onnx(
        model,
        batches[0],
        config.onnx_path,
        opset=config.export.opset,
        parity_batches=batches,
        atol=config.export.atol,
        provenance={"checkpoint_sha256": checkpoint_sha256, "export_key": key},
    )
    print(
        f"export: {config.onnx_path} (max |ORT - torch| {record['max_abs_diff']:.2e}, top-1 "
        f"agreement {record['top1_agreement']:.4f} on {record['rows']} rows)"
    )
    return 0
