"""Which database: stdlib only, so commands that never touch one (offline proof checks) load no database code."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DB_FILE = "sle-study.db"


def database_url(url: str | None = None) -> str:
    """`--db`, else SLE_DATABASE_URL, else an SQLite file in the working directory."""
    url = url or os.environ.get("SLE_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_FILE}"
