"""Fixtures of the web view's tests (the record's engines come from tests/conftest.py: SQLite and PostgreSQL)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from sle_events.web import create_web_app
from web.webkit import WebStudy, make_web_study


@pytest.fixture
def web_study(db_url: str) -> WebStudy:
    return make_web_study(db_url)


@pytest.fixture
def client(web_study: WebStudy) -> Iterator[object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's note that its TestClient will move to httpx2
        from starlette.testclient import TestClient

    with TestClient(create_web_app(web_study.url), follow_redirects=False) as c:
        yield c
