"""Loader for the transparency-log test vectors copied into ``tests/ledger/vectors``.

The JSON files are verbatim copies of ``shared/tlog-vectors`` (see vectors/README.md for
their sources and licenses).  ``TLOG_VECTORS_DIR`` overrides the directory.
"""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

LOCAL_DIR = Path(__file__).resolve().parent / "vectors"
FILES = (
    "merkle_inclusion.json",
    "merkle_consistency.json",
    "merkle_reference_tree.json",
    "signed_note.json",
    "checkpoint_and_tlog_proof.json",
)


def vectors_dir() -> Path:
    return Path(os.environ.get("TLOG_VECTORS_DIR", LOCAL_DIR))


@cache
def load(name: str) -> Any:
    with open(vectors_dir() / name, encoding="utf-8") as f:
        return json.load(f)


def b64(s: str | None) -> bytes:
    return base64.b64decode(s, validate=True) if s else b""


def b64_list(items: list[str] | None) -> list[bytes]:
    return [b64(x) for x in (items or [])]
