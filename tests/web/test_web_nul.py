"""A NUL in a page's path or filters is refused as not understood, on both engines: PostgreSQL text cannot hold
one, and a query carrying it failed with a 500 (found in the API by schemathesis; the web view had the same)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.storage


@pytest.fixture
def signed_in(client, web_study):
    assert client.post("/signin", data={"token": web_study.token("auditor")}).status_code == 303
    return client


@pytest.mark.parametrize(
    "path, params",
    [
        ("/audit", {"subject": "\x00NJ01"}),
        ("/audit", {"user": "nurse\x00li", "item": "CREAT"}),
        ("/subjects/NJ01%00-0007", {}),
        ("/", {"as_of\x00": "x"}),
    ],
)
def test_a_nul_in_a_page_path_or_filter_is_a_400(signed_in, path, params):
    response = signed_in.get(path, params=params)
    assert response.status_code == 400, response.text[:300]
    assert "Not understood" in response.text


def test_a_nul_in_a_sign_in_token_is_refused_not_a_500(client):
    assert client.post("/signin", data={"token": "abc\x00def"}).status_code == 403
    assert client.get("/signin", params={"token": "abc\x00def"}).status_code in (200, 400)
