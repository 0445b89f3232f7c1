"""Registers per thread of the fused kernels at their default tiles, compiled for sm_90 here.

No GPU is needed: triton compiles a kernel for a CUDA target on any machine (its wheel carries
ptxas), and ``cuobjdump -res-usage`` reads the cubin's register count. That count bounds how many
warps an SM keeps resident, which for these memory-bound kernels is what hides load latency: an
H100/H200 SM has 65,536 registers and at most 64 warps.

    python -m tests.kernels.registers          # the table, for BENCHMARKS.md
    python -m tests.kernels.registers --json   # the same rows as JSON (the test reads them)

Must run without TRITON_INTERPRET=1 (interpreted kernels do not compile): tests run it in a child
process (tests/kernels/test_registers.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLASSES = (10, 100, 1000, 32768)
TARGET = (90, 32)  # sm_90 (H100, H200), warp size 32


@dataclass(frozen=True)
class Variant:
    name: str
    module: str
    kernel: str
    flags: dict
    plain: bool
    """A method's everyday form (float16 teacher, no temperature gradient, no z-score)."""


VARIANTS = (
    Variant(
        "kd fwd",
        "triton_kd",
        "_kd_rows_fwd",
        {"HAS_SCALE": False, "ZSCORE": False, "NEED_T_STATS": False, "WITH_CE": False},
        True,
    ),
    Variant(
        "kd+ce fwd",
        "triton_kd",
        "_kd_rows_fwd",
        {"HAS_SCALE": False, "ZSCORE": False, "NEED_T_STATS": False, "WITH_CE": True},
        True,
    ),
    Variant(
        "kd+ce bwd",
        "triton_kd",
        "_kd_rows_bwd",
        {"HAS_SCALE": False, "ZSCORE": False, "WRITE_GS": True, "NEED_T_GRAD": False}
        | {"SPLIT": False, "WITH_CE": True, "EXTRA_GRADS": False},
        True,
    ),
    Variant(
        "kd bwd",
        "triton_kd",
        "_kd_rows_bwd",
        {
            "HAS_SCALE": False,
            "ZSCORE": False,
            "WRITE_GS": True,
            "NEED_T_GRAD": False,
            "SPLIT": False,
            "WITH_CE": False,
            "EXTRA_GRADS": False,
        },
        True,
    ),
    Variant(
        "kd split fwd",
        "triton_kd",
        "_kd_split_fwd",
        {"HAS_SCALE": False, "NEED_T_STATS": False},
        True,
    ),
    Variant(
        "ctkd split bwd",
        "triton_kd",
        "_kd_rows_bwd",
        {"HAS_SCALE": False, "ZSCORE": False, "WRITE_GS": True, "NEED_T_GRAD": True, "SPLIT": True}
        | {"WITH_CE": False, "EXTRA_GRADS": False},
        False,
    ),
    Variant(
        "dkd fwd",
        "triton_dkd",
        "_dkd_rows_fwd",
        {"HAS_SCALE": False, "ZSCORE": False, "NEED_T_STATS": False, "WITH_CE": False},
        True,
    ),
    Variant(
        "dkd bwd",
        "triton_dkd",
        "_dkd_rows_bwd",
        {"HAS_SCALE": False, "ZSCORE": False, "WRITE_GS": True, "NEED_T_GRAD": False}
        | {"WITH_CE": False, "EXTRA_GRADS": False},
        True,
    ),
    Variant(
        "dkd+ce fwd",
        "triton_dkd",
        "_dkd_rows_fwd",
        {"HAS_SCALE": False, "ZSCORE": False, "NEED_T_STATS": False, "WITH_CE": True},
        True,
    ),
    Variant(
        "dkd+ce bwd",
        "triton_dkd",
        "_dkd_rows_bwd",
        {"HAS_SCALE": False, "ZSCORE": False, "WRITE_GS": True, "NEED_T_GRAD": False}
        | {"WITH_CE": True, "EXTRA_GRADS": False},
        True,
    ),
    Variant("ats fwd", "triton_ats", "_ats_rows_fwd", {"HAS_SCALE": False, "WITH_CE": False}, True),
    Variant(
        "ats bwd",
        "triton_ats",
        "_ats_rows_bwd",
        {"HAS_SCALE": False, "WITH_CE": False, "EXTRA_GRADS": False},
        True,
    ),
    Variant(
        "ats+ce fwd", "triton_ats", "_ats_rows_fwd", {"HAS_SCALE": False, "WITH_CE": True}, True
    ),
    Variant(
        "ats+ce bwd",
        "triton_ats",
        "_ats_rows_bwd",
        {"HAS_SCALE": False, "WITH_CE": True, "EXTRA_GRADS": False},
        True,
    ),
    Variant("decode int8", "triton_decode", "_decode_kernel", {"HAS_SCALE": True}, True),
    Variant(
        "kd+ls fwd",
        "triton_kd",
        "_kd_rows_fwd",
        {"HAS_SCALE": False, "ZSCORE": True, "NEED_T_STATS": True, "WITH_CE": True},  # ls+kd's
        False,
    ),
    Variant(
        "ctkd+ls int8 bwd",
        "triton_kd",
        "_kd_rows_bwd",
        {"HAS_SCALE": True, "ZSCORE": True, "WRITE_GS": True, "NEED_T_GRAD": True, "SPLIT": False}
        | {"WITH_CE": True, "EXTRA_GRADS": False},  # as training launches it (with its CE)
        False,
    ),
    Variant(
        "ctkd+dkd+ls int8 bwd",
        "triton_dkd",
        "_dkd_rows_bwd",
        {"HAS_SCALE": True, "ZSCORE": True, "WRITE_GS": True, "NEED_T_GRAD": True}
        | {"WITH_CE": True, "EXTRA_GRADS": False},  # as training launches it (with its CE)
        False,
    ),
)


def _arg_type(name: str, int8: bool) -> str:
    if name == "t_ptr":
        return "*i8" if int8 else "*fp16"
    if name in ("target_ptr", "y_ptr"):
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32"
    return "fp32" if name in ("eps", "ce_w", "kd_w", "w_t", "w_n", "ats_w", "inv_b") else "i32"


def usage(variant: Variant, rows: int, block: int, num_warps: int) -> tuple[int, int]:
    """(registers per thread, bytes of local memory per thread) of one compiled tile."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"pipeline.kernels.{variant.module}"), variant.kernel)
    consts = {**variant.flags, "ROWS": rows, "BLOCK": block}
    int8 = bool(variant.flags.get("HAS_SCALE"))
    signature = {n: "constexpr" if n in consts else _arg_type(n, int8) for n in fn.arg_names}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
    )
    target = GPUTarget("cuda", *TARGET)
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    registers, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    if registers is None or local is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/LOCAL line: {out!r}")
    return int(registers.group(1)), int(local.group(1))


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps an sm_90 SM keeps resident for this register count (256-register allocation units
    per warp, 65,536 registers, at most 64 warps and 32 programs)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 64 // num_warps, 32) * num_warps


def table(batch_elements: int = 2**24) -> list[dict]:
    """One row per (variant, C): the default tile for B = batch_elements / C and its usage."""
    from pipeline.kernels.triton_common import launch_config

    rows = []
    for variant in VARIANTS:
        for classes in CLASSES:
            launch = launch_config(batch_elements // classes, classes)
            registers, local = usage(variant, launch.rows, launch.block, launch.num_warps)
            rows.append(
                {
                    "variant": variant.name,
                    "plain": variant.plain,
                    "classes": classes,
                    "tile": f"{launch.rows}x{launch.block}",
                    "warps": launch.num_warps,
                    "registers": registers,
                    "local": local,
                    "resident_warps": resident_warps(registers, launch.num_warps),
                }
            )
    return rows


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels do not compile")
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(table()))
        return
    print("| kernel | C | tile (rows x block) | warps | registers | spilled bytes | warps/SM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table():
        print(
            f"| {r['variant']} | {r['classes']} | {r['tile']} | {r['warps']} | {r['registers']} "
            f"| {r['local']} | {r['resident_warps']} |"
        )


if __name__ == "__main__":
    main()
