"""Image folders: ``<root>/<split>/<class>/<image>``, what ImageNet-style datasets ship as.

Classes are the training split's subfolder names, sorted, numbered from 0 (torchvision's
ImageFolder convention). Files are decoded with Pillow per batch, never all at once; with
``image_size`` every image is resized (bilinear) to it, otherwise all must share one size.
Hidden files (``.*``, e.g. macOS's ``._x.png``) are not images. 16-bit grey images are scaled
to 8 bits; 32-bit integer and float ones are refused, their range being unknown.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.base import ImageDataset, LazyImages, check_split
from pipeline.datasets.digests import file_digests
from pipeline.errors import DatasetError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # ImageNet's, averaged over channels
#: 16-bit grey modes: scaled to 8 bits over their full range (Pillow's convert would clip them).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
MAX_SIDE = 65536


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode: OSError (UnidentifiedImageError),
    ValueError (corrupt TIFF dimensions), SyntaxError, EOFError, IndexError and struct.error
    (plugins reading damaged headers), and a decompression bomb (a header claiming gigapixels)."""
    from PIL import Image

    return (
        OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
        Image.DecompressionBombError,
    )  # fmt: skip


def _image_size(value: Any) -> tuple[int, int]:
    """``image_size`` as (height, width): an int >= 1, or a list of two."""
    hw = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(hw) != 2 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in hw
    ):
        raise DatasetError(
            f"image_folder: image_size must be an int in [1, {MAX_SIDE}] or [height, width] of "
            f"such ints, got {value!r}; fix data.options"
        )
    return int(hw[0]), int(hw[1])


def _as_8bit(im: Any, path: Path) -> Any:
    """``im`` with 8-bit samples: 16-bit grey scaled down; 32-bit int and float refused (their
    range is not fixed by the format, and Pillow's convert would clip them to 255)."""
    from PIL import Image

    # Pillow < 11 opens a 16-bit grey PNG as mode I (a PNG holds no 32-bit samples).
    if im.mode in WIDE_MODES or (im.mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")  # v / 257
    if im.mode in ("I", "F") or im.mode.startswith(("I;", "F;")):
        raise DatasetError(
            f"{path}: mode {im.mode} (32-bit integer or float pixels) has no fixed 8-bit scale; "
            "convert it to an 8- or 16-bit image"
        )
    return im


def _split_dir(root: Path, split: str) -> Path:
    for name in (split, "val") if split == "test" else (split,):
        if (root / name).is_dir():
            return root / name
    raise DatasetError(
        f"image_folder: no {split} folder in {root}; expected {root}/{split}/<class>/"
    )


def _classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"image_folder: no class subfolders in {folder}; expected <class>/<image>"
        )
    return classes


class ImageFolderDataset(ImageDataset):
    """Images decoded lazily from files; ``files[i]`` is the path of row i."""

    def __init__(
        self, name: str, files: list[Path], labels: np.ndarray, classes: list[str],
        size: tuple[int, int], channels: int, mean: tuple[float, ...], std: tuple[float, ...],
        resize: bool,
    ) -> None:  # fmt: skip
        self.files, self.classes, self._resize = files, classes, resize
        self._mode = {1: "L", 3: "RGB"}[channels]
        lazy = LazyImages((len(files), size[0], size[1], channels), self._decode)
        super().__init__(name, lazy, labels, len(classes), mean, std)

    def _decode(self, idx: np.ndarray) -> np.ndarray:
        from PIL import Image

        _, h, w, c = self.images.shape
        out = np.empty((len(idx), h, w, c), dtype=np.uint8)
        for k, i in enumerate(idx):
            path = self.files[i]
            try:
                with Image.open(path) as im:
                    im = _as_8bit(im, path).convert(self._mode)
                    if self._resize and im.size != (w, h):
                        im = im.resize((w, h), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except _decode_errors() as e:
                raise DatasetError(
                    f"{path}: cannot decode image ({type(e).__name__}: {e}); remove or replace it"
                ) from e
            if a.shape[:2] != (h, w):
                raise DatasetError(
                    f"{path}: {a.shape[1]}×{a.shape[0]} differs from {w}×{h}; set image_size"
                )
            out[k] = a.reshape(h, w, c)
        return out

    def content_blocks(self) -> Iterator[bytes]:
        """The encoded files (name, then their sha256) and the decoding options: no full decode
        needed, and a file read again only when it changed (``pipeline.datasets.digests``)."""
        yield f"{self._mode} {self.images.shape} resize={self._resize}\n".encode()
        root = self.files[0].parent.parent
        for path, digest in zip(self.files, file_digests(root, self.files)):
            # The name's bytes as on disk: UTF-8 names hash as they always have, and a name that
            # is not UTF-8 (Python holds its bytes as surrogates) hashes as its raw bytes.
            name = f"{path.parent.name}/{path.name}\n".encode("utf-8", "surrogateescape")
            yield name + digest


def image_folder(
    split: str,
    path: str | None = None,
    image_size: int | list[int] | None = None,
    channels: int = 3,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ImageFolderDataset:
    """The ``split`` folder of ``path``; ``image_size``: an int or [height, width] to resize to."""
    check_split(split, "image_folder")
    if not path:
        raise DatasetError("image_folder: set the data path to the folder holding train/ and test/")
    if channels not in (1, 3):
        raise DatasetError(f"image_folder: channels must be 1 or 3, got {channels}")
    size = _image_size(image_size) if image_size is not None else None
    root = Path(path)
    folder = _split_dir(root, split)
    classes = _classes(root / "train" if (root / "train").is_dir() else folder)
    index = {c: k for k, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for sub in _classes(folder):
        if sub not in index:
            raise DatasetError(f"image_folder: class {sub!r} of {folder} is not a training class")
        # Hidden files are no images: macOS's AppleDouble ``._x.png`` beside each copied file.
        found = sorted(
            p for p in (folder / sub).iterdir()
            if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
        )  # fmt: skip
        files += found
        labels += [index[sub]] * len(found)
    if not files:
        raise DatasetError(f"image_folder: no images ({', '.join(EXTENSIONS)}) under {folder}")
    if size is None:
        from PIL import Image

        try:
            with Image.open(files[0]) as im:
                size = (im.size[1], im.size[0])
        except _decode_errors() as e:
            raise DatasetError(
                f"{files[0]}: cannot decode image ({type(e).__name__}: {e}); remove or replace it"
            ) from e
    default_mean, default_std = (
        (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    )
    return ImageFolderDataset(
        f"image_folder/{split}", files, np.asarray(labels, dtype=np.int64), classes, size, channels,
        tuple(mean or default_mean), tuple(std or default_std), resize=image_size is not None,
    )  # fmt: skip
