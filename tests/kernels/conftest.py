"""The fused kernels run on CPU tensors through triton's interpreter in these tests.

triton decides interpreter or compiler when a kernel is decorated, i.e. when
``pipeline.kernels.triton_*`` is first imported, so the variable is set here, before any test
module of this directory imports them. Tests that need the interpreter skip (with the reason)
when triton is missing or the kernels were already built for a GPU by an earlier import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
