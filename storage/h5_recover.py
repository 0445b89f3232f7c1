"""Reopening an HDF5 store whose writer was killed.

An HDF5 file written in SWMR mode keeps "open for write" flags in its superblock; after a crash they
stay set and HDF5 refuses to open the file for writing again (its `h5clear -s` tool clears them).
The writer lock tells us when no writer is alive, and then this clears the flags itself: it checks
the superblock's Jenkins lookup3 checksum before changing anything, so a file it does not
understand is left alone.
"""

from __future__ import annotations

import struct

from storage.errors import StoreError

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


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


def clear_status_flags(path: str) -> None:
    """Clear the superblock's write-access flags and extend its end-of-file address to the file's
    size (what ``h5clear -s --increment`` does). Only call this while
    holding the store's writer lock, which proves no writer is alive."""
    with open(path, "r+b") as f:
        head = f.read(12)
        if head[:8] != _SIGNATURE or head[8] not in (2, 3):
            raise StoreError(
                f"{path}: not an HDF5 file with a version 2/3 superblock; "
                f"run `h5clear -s {path}` to clear its write flags"
            )
        size = 12 + 4 * head[9]  # signature, version, sizes, flags, then four addresses
        f.seek(0)
        block = bytearray(f.read(size + 4))
        (stored,) = struct.unpack("<I", block[size:])
        if lookup3(bytes(block[:size])) != stored:
            raise StoreError(
                f"{path}: superblock checksum does not match; the file may be "
                f"damaged: run `h5clear -s {path}` or recompute the store"
            )
        block[11] = 0
        # The superblock's end-of-file address is only updated at a clean close: after a crash
        # it lags behind what was allocated since. Extend it to the file's real end (h5clear's
        # --increment does the same).
        width = head[9]
        at = 12 + 2 * width
        eoa = int.from_bytes(block[at : at + width], "little")
        f.seek(0, 2)
        block[at : at + width] = max(eoa, f.tell()).to_bytes(width, "little")
        block[size:] = struct.pack("<I", lookup3(bytes(block[:size])))
        f.seek(0)
        f.write(block)
