"""Provenance: what a logit store was made from, as hashes a distill run can check."""

from __future__ import annotations

import hashlib
import json


def spec_hash(spec: dict) -> str:
    """A stable hash of a JSON-able spec (sorted keys, no whitespace)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
