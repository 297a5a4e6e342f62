"""A bounded schemathesis run over the ASGI app: requests are signed by a registered key (so most reach the
handlers), no response is a 5xx, every response matches docs/openapi.json, and a refused request stores nothing."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sle_events.api import create_app
from sle_events.client import sign_request
from sle_events.domain.study import Study
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

from conftest import clean_postgres_url, count_rows

ROLES = ("auditor", "coordinator", "lab")
MAX_EXAMPLES = 15  # per operation: bounded for CI


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_world(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('schemathesis') / 'study.db'}"
    else:
        url = clean_postgres_url()
    record = StudyRecord(url)
    now = datetime.now(UTC)
    admin = Signer.generate("admin", "admin")
    signers = {role: Signer.generate(f"{role}.user", role) for role in ROLES}
    study = Study.create("ALLOMSC-SLE", "AlloMSC", admin.actor, admin.public_key_b64, now)
    for s in signers.values():
        study.register_key(s.actor, s.role, s.public_key_b64, now)
    record.record(study, signer=admin)
    app = create_app(record=record)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield {"url": url, "study": str(study.id), "signers": signers, "http": http, "app": app}
    record.engine.dispose()


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation of our own document is readable
        operations.append(result.ok())
    return operations


@pytest.mark.storage
def test_no_input_yields_a_5xx_and_a_refusal_stores_nothing(api_world):
    for operation in _operations(api_world["app"]):

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            check_case(case, api_world)

        run()


def check_case(case, api_world) -> None:
    if "study" in (case.path_parameters or {}):
        case.path_parameters["study"] = api_world["study"]  # a real study, so the handlers run
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    http = api_world["http"]
    request = http.build_request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers={k: str(v) for k, v in (kwargs.get("headers") or {}).items()},
        content=kwargs.get("content") if "content" in kwargs else kwargs.get("data"),
        json=kwargs.get("json"),
    )
    signer = api_world["signers"][ROLES[hash(case.id) % len(ROLES)]]
    if request.method == "POST":
        request.headers.setdefault("Idempotency-Key", case.id)
    sign_request(request, signer)
    before = count_rows(api_world["url"])
    response = http.send(request)
    assert response.status_code < 500, response.text
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    if response.status_code >= 400:
        assert count_rows(api_world["url"]) == before
