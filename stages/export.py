"""`export`: the teacher to one ONNX file, parity-checked against PyTorch on real batches."""

from __future__ import annotations

import argparse

from stages.common import add_config_arguments, config_from_args

PARITY_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


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
        provenance={"checkpoint_sha256": sha256_file(config.teacher_checkpoint)},
    )
    print(
        f"export: {config.onnx_path} (max |ORT - torch| {record['max_abs_diff']:.2e}, top-1 "
        f"agreement {record['top1_agreement']:.4f} on {record['rows']} rows)"
    )
    return 0
