"""The API's OpenAPI document, as checked in at docs/openapi.json (`python -m sle_events.api.openapi`)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def document() -> dict[str, Any]:
    """The OpenAPI document of `create_app` (built over a throwaway SQLite database: the routes need one)."""
    from sle_events.api.app import create_app

    with tempfile.TemporaryDirectory() as folder:
        app = create_app(f"sqlite:///{Path(folder) / 'openapi.db'}")
        try:
            return app.openapi()
        finally:
            app.state.api.close()
            app.state.api.engine.dispose()


def text() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if target is None:
        sys.stdout.write(text())
    else:
        target.write_text(text(), encoding="utf-8")
