"""docs/openapi.json is what the app serves: regenerate with `python -m sle_events.api.openapi docs/openapi.json`."""

from __future__ import annotations

import json
from pathlib import Path

from sle_events.api.openapi import document

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_the_checked_in_openapi_document_matches_the_app():
    assert json.loads(CHECKED_IN.read_text(encoding="utf-8")) == document(), (
        "the API changed: run `python -m sle_events.api.openapi docs/openapi.json` and commit the file"
    )
