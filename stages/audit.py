"""`audit`: bytes per row and KD-loss error of every encoding, on a sample of a store's rows."""

from __future__ import annotations

import argparse

from storage import open_store
from storage.audit import audit_logits, format_audit, sample_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="path of the store to sample")
    parser.add_argument("--rows", type=int, default=4096, help="rows to sample (default 4096)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import UserError

    if args.rows < 2:
        raise UserError(f"--rows must be at least 2 (rows to sample), got {args.rows}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    with open_store(args.store) as store:
        teacher = sample_rows(store, args.rows, args.seed)
        table = audit_logits(teacher, args.seed, store.layout.topk or None)
        print(format_audit(table, len(teacher), store.encoding))
    return 0
