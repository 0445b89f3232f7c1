"""Reopening an HDF5 store whose writer was killed.

An HDF5 file written in SWMR mode keeps "open for write" flags in its superblock; after a crash they
stay set and HDF5 refuses to open the file for writing again (its `h5clear -s` tool clears them).
The writer lock tells us when no writer is alive, and then this clears the flags itself: it checks
the superblock's Jenkins lookup3 checksum before changing anything, so a file it does not
understand is left alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from storage.errors import StoreError

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF
_HEAD = 12  # signature, version, sizes of offsets and of lengths, file consistency flags


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, as HDF5's H5_checksum_lookup3 computes it."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k : k + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[k + 4 : k + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[k + 8 : k + 12], "little")) & _MASK
        a = (a - c) & _MASK
        a ^= _rot(c, 4)
        c = (c + b) & _MASK
        b = (b - a) & _MASK
        b ^= _rot(a, 6)
        a = (a + c) & _MASK
        c = (c - b) & _MASK
        c ^= _rot(b, 8)
        b = (b + a) & _MASK
        a = (a - c) & _MASK
        a ^= _rot(c, 16)
        c = (c + b) & _MASK
        b = (b - a) & _MASK
        b ^= _rot(a, 19)
        a = (a + c) & _MASK
        c = (c - b) & _MASK
        c ^= _rot(b, 4)
        b = (b + a) & _MASK
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)  # the switch's fall-through adds the bytes present
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b
    c = (c - _rot(b, 14)) & _MASK
    a ^= c
    a = (a - _rot(c, 11)) & _MASK
    b ^= a
    b = (b - _rot(a, 25)) & _MASK
    c ^= b
    c = (c - _rot(b, 16)) & _MASK
    a ^= c
    a = (a - _rot(c, 4)) & _MASK
    b ^= a
    b = (b - _rot(a, 14)) & _MASK
    c ^= b
    c = (c - _rot(b, 24)) & _MASK
    return c


@dataclass(frozen=True)
class Superblock:
    """The superblock at the start of an HDF5 file, as far as it was read. Versions 2 and 3 (the
    only ones with a checksum; this backend writes 3) are the 12-byte head, four addresses of
    ``width`` bytes (base, superblock extension, end of file, root group) and the lookup3 checksum
    of all that; other versions are left to HDF5, so only their head is read."""

    raw: bytes  # the bytes read: through the checksum, fewer where the file ends first
    version: int | None  # None where the file ends before the 12-byte head
    width: int = 0  # bytes of an address ("size of offsets")
    flags: int = 0  # file consistency flags: a writer's write access (SWMR)
    eoa: int | None = None  # end-of-file address; None unless a whole version 2/3 superblock
    stored: int | None = None  # the checksum in the file; None unless a whole v2/3 superblock
    computed: int | None = None  # lookup3 of the bytes it covers; None as for ``stored``

    @property
    def size(self) -> int:
        """The bytes the checksum covers (the checksum's offset)."""
        return _HEAD + 4 * self.width

    @property
    def signed(self) -> bool:
        """Whether the file starts with HDF5's signature."""
        return self.raw[:8] == _SIGNATURE

    @property
    def intact(self) -> bool:
        """A whole version 2/3 superblock whose checksum matches."""
        return self.stored is not None and self.stored == self.computed

    def cleared(self, eoa: int) -> bytes:
        """This (intact) superblock with its write flags cleared, its end-of-file address set to
        ``eoa`` and its checksum recomputed: what ``h5clear -s --increment`` writes."""
        block = bytearray(self.raw)
        block[11] = 0
        at = _HEAD + 2 * self.width
        block[at : at + self.width] = eoa.to_bytes(self.width, "little")
        block[self.size :] = struct.pack("<I", lookup3(bytes(block[: self.size])))
        return bytes(block)


def read_superblock(fh: BinaryIO) -> Superblock:
    """The superblock of the binary file ``fh``, read from its current position (its start)."""
    raw = fh.read(_HEAD)
    if len(raw) < _HEAD:
        return Superblock(raw, None)
    version, width, flags = raw[8], raw[9], raw[11]
    if version not in (2, 3):
        return Superblock(raw, version, width, flags)
    size = _HEAD + 4 * width
    raw += fh.read(size + 4 - _HEAD)
    if len(raw) < size + 4:
        return Superblock(raw, version, width, flags)
    at = _HEAD + 2 * width
    return Superblock(
        raw,
        version,
        width,
        flags,
        eoa=int.from_bytes(raw[at : at + width], "little"),
        stored=struct.unpack("<I", raw[size:])[0],
        computed=lookup3(raw[:size]),
    )


def clear_status_flags(path: str) -> None:
    """Clear the superblock's write-access flags and extend its end-of-file address to the file's
    size (what ``h5clear -s --increment`` does). Only call this while
    holding the store's writer lock, which proves no writer is alive."""
    with open(path, "r+b") as f:
        sb = read_superblock(f)
        if not sb.signed or sb.version not in (2, 3):
            raise StoreError(
                f"{path}: not an HDF5 file with a version 2/3 superblock; "
                f"run `h5clear -s {path}` to clear its write flags"
            )
        if not sb.intact:
            raise StoreError(
                f"{path}: superblock checksum does not match; the file may be "
                f"damaged: run `h5clear -s {path}` or recompute the store"
            )
        # The superblock's end-of-file address is only updated at a clean close: after a crash
        # it lags behind what was allocated since. Extend it to the file's real end (h5clear's
        # --increment does the same).
        f.seek(0, 2)
        block = sb.cleared(max(sb.eoa, f.tell()))
        f.seek(0)
        f.write(block)
