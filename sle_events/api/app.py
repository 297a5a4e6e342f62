"""The HTTP API: `create_app(url)` builds the FastAPI application `sle serve` runs.

Writes take envelopes their signers sealed (the server never holds a user's key) and hand them to
`StudyRecord.append`, which checks them exactly as it checks any caller's. Every request is signed (`auth`);
every refusal is problem+json (`problems`) and stores nothing. Other ASGI apps (the web view) mount under a
prefix of their own: `create_app(url, mounts={"/web": web_app})` or `mount_sub_app(app, "/web", web_app)`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from sle_events.api import idempotency as idem
from sle_events.api.auth import (
    Caller,
    Signed,
    admit_reader,
    admitted,
    forget_expired_nonces,
    replay_problem,
    require_role,
    require_write,
    verify_request,
)
from sle_events.api.problems import PROBLEM_JSON, PROBLEMS, Problem, from_rejection
from sle_events.domain.event_types import UnknownEventName, stored_topics, type_name
from sle_events.domain.study import Study
from sle_events.schema import api_metadata
from sle_events.signing.canonical import NotCanonicalisable, loads_strict
from sle_events.signing.envelope import MalformedEnvelope, SealedEvent, open_stored, sealed_from_json
from sle_events.store.errors import AppendRejected, ChainBroken, VersionConflict
from sle_events.store.record import StudyRecord
from sle_events.store.text import storable

API_VERSION = "1"
MAX_BODY = 16 << 20  # a 100-event batch of lab results is ~150 KiB
MAX_BATCH = 1000
PAGE = 100
DEMO_CLOCK_SKEW = timedelta(days=365 * 100)
MAX_PAGE = 1000

_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "stream": {"type": "string"},
        "version": {"type": "integer"},
        "current_version": {"type": "integer"},
        "current_hash": {"type": "string"},
        "field": {"type": "string"},
        "code": {"type": "string"},
    },
}
_SEALED_SCHEMA = {
    "type": "object",
    "required": ["envelope", "signature"],
    "properties": {"envelope": {"type": "object"}, "signature": {"type": "string"}},
}
_APPEND_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _SEALED_SCHEMA,
                    {
                        "type": "object",
                        "required": ["events"],
                        "properties": {"events": {"type": "array", "items": _SEALED_SCHEMA, "maxItems": MAX_BATCH}},
                    },
                ]
            }
        }
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        s: {"description": "problem details (RFC 9457)", "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}}
        for s in statuses
    }


_AUTH_ERRORS = (400, 401, 403, 404, 413, 415, 422)
_PAGE_SCHEMA = {
    "type": "object",
    "required": ["items", "next"],
    "properties": {"items": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["integer", "null"]}},
}


def _ok(schema: dict[str, Any] | None = None, status: int = 200) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": "OK", "content": {"application/json": {"schema": schema or {"type": "object"}}}},
        **_errors(*_AUTH_ERRORS),
    }


def prepare_database(engine: sa.Engine) -> None:
    """The API's own tables and their indexes (revisions 0012 and 0018 create them too; an index is added to a
    table made before it). Several workers starting at once may race to create them: whoever loses finds them
    there."""

    def create() -> None:
        api_metadata.create_all(engine, checkfirst=True)
        for table in api_metadata.sorted_tables:
            for index in table.indexes:
                index.create(engine, checkfirst=True)

    try:
        create()
    except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
        create()


class Api:
    """What the routes share: the study record, the read models, the ledger."""

    def __init__(self, url: str | None, record: StudyRecord | None = None) -> None:
        self.record = record or StudyRecord(url)
        self.url = self.record.url
        self.engine = self.record.engine
        prepare_database(self.engine)
        self.bookkeeping = idem.bookkeeping_engine(self.engine)
        self._reader: Any = None
        self._studies: dict[str, Study] = {}  # study id -> its registry at its stream's version
        self._reader_lock = threading.Lock()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self.bookkeeping is not self.engine:
            self.bookkeeping.dispose()
        self.record.close()

    # --- studies and callers -------------------------------------------------------------------------
    def study(self, study_id: str, conn: sa.Connection | None = None) -> Study:
        """The study's registry as the database holds it now: another process (a worker, `sle study
        revoke-key`) may have changed it, so its stream's version is asked each time and the study rebuilt when it
        moved (a revoked key is refused from the next request on)."""
        try:
            stream = UUID(study_id)
        except ValueError:
            raise Problem("not_found", f"there is no study {study_id} here") from None
        with nullcontext(conn) if conn is not None else self.bookkeeping.connect() as c:
            version = c.execute(self.record.stream_version_query, {"b_stream": stream}).scalar()
        cached = self._studies.get(study_id)
        if cached is not None and cached.version == version:
            return cached
        try:
            study = self.record.get(stream)
        except Exception:  # the library's AggregateNotFound, or a stream that is no study
            study = None
        if not isinstance(study, Study):
            raise Problem("not_found", f"there is no study {study_id} here")
        self._studies[study_id] = study
        return study

    def other_studies(self, study_id: str) -> list[Study]:
        t = self.record.table
        with self.engine.connect() as conn:
            ids = conn.execute(
                sa.select(t.c.originator_id).where(
                    t.c.topic.in_(stored_topics("Study.Created")), t.c.originator_version == 1
                )
            ).scalars()
            others = [str(i) for i in ids if str(i) != study_id]
        return [self.study(i) for i in others]

    def caller(self, request: Request, study_id: str, body: bytes) -> tuple[Caller, Study]:
        """Who reads: the key that signed the request, by the study's registry as it is now."""
        with self.bookkeeping.connect() as conn:
            study = self.study(study_id, conn)
            return admit_reader(conn, self._signed(request, study_id, body, study), study), study

    def _writer(
        self, conn: sa.Connection, request: Request, study_id: str, body: bytes, key: str | None
    ) -> tuple[Caller, Study, tuple[int, bytes] | None]:
        """Who writes, and the Idempotency-Key's stored answer if it has one. The signature is checked against
        the registry this worker last saw; the nonce, the claim and the study's version then take one round
        trip (`idem.admit`). Should the study's stream have moved meanwhile (a key revoked elsewhere), the caller
        is judged again by the registry as it is now."""
        study = self._studies.get(study_id) or self._written_study(study_id, body, conn)
        signed = self._signed(request, study_id, body, study)
        key = idem.check_key(key)
        digest = idem.request_hash(request.method, request.url.path, request.url.query, body)
        now = datetime.now(UTC)
        admission = idem.admit(
            conn,
            self.record.table,
            self.record.stream_version_query,
            key_id=signed.caller.key_id,
            nonce=signed.nonce,
            created=signed.created,
            key=key,
            digest=digest,
            study=UUID(study_id),
            now=now,
        )
        if not admission.fresh_nonce:
            raise replay_problem(signed.caller.key_id, signed.nonce)
        forget_expired_nonces(conn, signed.created, now)
        idem.forget_expired_keys(conn, signed.created, now)
        try:
            if admission.study_version != study.version:  # judged again, by the registry as it is now
                study = self._written_study(study_id, body, conn)
                signed = self._signed(request, study_id, body, study)
            caller = admitted(signed, study)
        except Exception:
            if admission.claimed:  # a refused request leaves its Idempotency-Key free
                idem.release(conn, signed.caller.key_id, key)
            raise
        if admission.claimed:
            return caller, study, None
        return caller, study, idem.claim(conn, caller.key_id, key, digest, lambda: self._in_record(study, caller, body))

    def _written_study(self, study_id: str, body: bytes, conn: sa.Connection) -> Study:
        """The study as stored now, or the one the batch creates: a new study's first batch is signed by its own
        trust root, which no registry holds yet."""
        try:
            return self.study(study_id, conn)
        except Problem:
            created = self._created_in(study_id, body)
            if created is None:
                raise
            return created

    def _signed(self, request: Request, study_id: str, body: bytes, study: Study) -> Signed:
        return verify_request(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            body=body,
            study=study,
            others=lambda: self.other_studies(study_id),
        )

    def _created_in(self, study_id: str, body: bytes) -> Study | None:
        """The study as the batch's first event (its `Study.Created`, version 1) creates it, if it does; append
        then checks that creation like any other (signature, approval by an existing study's admin)."""
        from sle_events.store.codec import domain_event_from

        try:
            first = self._sealed_events(body)[0]
            env = first.envelope
            if (type_name(env["type"]), env["stream"], env["study"], env["version"]) != (
                "Study.Created",
                study_id,
                study_id,
                1,
            ):
                return None
            study = domain_event_from(first).mutate(None)
        except (Problem, UnknownEventName, ValueError, TypeError, KeyError):
            return None
        return study if isinstance(study, Study) else None

    def log_reader(self, request: Request, body: bytes) -> Caller:
        """Entry bundles hold every study's events: only a database of one study serves them, to its readers."""
        studies = self.other_studies("")
        if len(studies) != 1:
            raise Problem("forbidden", "this database holds several studies: its entry bundles are not served")
        caller, _ = self.caller(request, str(studies[0].id), body)
        require_role(caller, "ledger")
        return caller

    # --- writing ---------------------------------------------------------------------------------------
    def write(self, request: Request, study_id: str, body: bytes, idempotency_key: str | None) -> tuple[int, bytes]:
        """A POST of events, whole: who calls, the Idempotency-Key, the append; (status, response body). One
        thread-pool hop per request; the bookkeeping autocommits, outside the append's transaction."""
        with self.bookkeeping.connect() as conn:
            caller, study, stored = self._writer(conn, request, study_id, body, idempotency_key)
        if stored is not None:
            return stored
        assert idempotency_key is not None  # `_writer` refuses a write without one
        try:
            return 201, self.append(study, caller, body)
        except Problem as p:
            status, data = p.status, json.dumps(p.body(request.url.path)).encode()
        except BaseException:
            with self.bookkeeping.connect() as conn:
                idem.release(conn, caller.key_id, idempotency_key)
            raise
        # Only a refusal is stored with its key. A stored batch is its own answer (`_in_record`): nothing to
        # write after the commit, and nothing to lose should the process die right after it.
        with self.bookkeeping.connect() as conn:
            idem.finish(conn, caller.key_id, idempotency_key, status, data)
        return status, data

    def _in_record(self, study: Study, caller: Caller, body: bytes) -> tuple[int, bytes] | None:
        """The 201 of a request whose batch the record holds, as it was first answered: the same events at the
        same positions. None if the batch is not stored (still running, or died before its commit), or if this
        caller may not send it (its claim is then taken over in time, and the request refused as at first)."""
        try:
            events = self._sendable(study, caller, body)
        except Problem:
            return None
        positions = self.record.stored_positions(events)
        return None if positions is None else (201, self._created(events, positions))

    def append(self, study: Study, caller: Caller, body: bytes) -> bytes:
        """The 201 response to a batch, once stored."""
        events = self._sendable(study, caller, body)
        try:
            positions = self.record.append(events)
        except (VersionConflict, ChainBroken) as exc:
            version, digest = self.head(UUID(exc.stream)) if exc.stream else (None, None)
            raise from_rejection(exc, current_version=version, current_hash=digest) from None
        except AppendRejected as exc:
            raise from_rejection(exc) from None
        return self._created(events, positions)

    def _sendable(self, study: Study, caller: Caller, body: bytes) -> list[SealedEvent]:
        """The body's sealed events, if they are this study's, of known types, and this caller may send them."""
        events = self._sealed_events(body)
        names = []
        for e in events:
            if e.envelope["study"] != str(study.id):
                raise Problem(
                    "wrong_study",
                    f"the event names study {e.envelope['study']}; this is study {study.id}",
                    stream=e.envelope["stream"],
                    version=e.envelope["version"],
                )
            try:
                names.append((type_name(e.topic), e.key))
            except UnknownEventName as exc:
                raise Problem(
                    "unknown_event_type", str(exc), stream=e.envelope["stream"], version=e.envelope["version"]
                ) from None
        require_write(caller, study, names)
        return events

    @staticmethod
    def _created(events: list[SealedEvent], positions: list[int]) -> bytes:
        """The 201 body: where each event of the batch now stands."""
        return json.dumps(
            {
                "events": [
                    {"stream": e.envelope["stream"], "version": e.version, "position": p, "hash": e.hash}
                    for e, p in zip(events, positions, strict=True)
                ]
            }
        ).encode()

    @staticmethod
    def _sealed_events(body: bytes) -> list[SealedEvent]:
        try:
            data = loads_strict(body)
        except (ValueError, NotCanonicalisable, UnicodeDecodeError, RecursionError) as exc:
            raise Problem("malformed", f"the body is not JSON without floats: {exc}") from None
        if isinstance(data, dict) and "envelope" in data:
            items = [data]
        elif isinstance(data, dict) and set(data) == {"events"} and isinstance(data["events"], list):
            items = data["events"]
        else:
            raise Problem(
                "validation", 'send one sealed event {"envelope", "signature"} or {"events": [...]}', field="body"
            )
        if not 1 <= len(items) <= MAX_BATCH:
            raise Problem("validation", f"a batch holds 1 to {MAX_BATCH} events, not {len(items)}", field="events")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(sealed_from_json(item))
            except (MalformedEnvelope, RecursionError) as exc:
                raise Problem("malformed", f"event {i}: {exc}", field=f"events[{i}]") from None
        return out

    def head(self, stream: UUID) -> tuple[int, str]:
        """The stream's stored head: (version, hash), (0, genesis) for none."""
        last = self.record.recorder.select_events(stream, desc=True, limit=1)
        if not last:
            return 0, "0" * 64
        return last[0].originator_version, hashlib.sha256(last[0].state).hexdigest()

    # --- reading ---------------------------------------------------------------------------------------
    def reader(self) -> Any:
        """The read models, caught up to the record's newest event (one reader per process, one catch-up at a
        time)."""
        from projections.read import StudyReader

        with self._reader_lock:
            if self._reader is None:
                self._reader = StudyReader(self.url, catch_up=False)
            self._reader.runner.catch_up()
            return self._reader

    def stream_page(self, study_id: str, stream: str, after: int, limit: int) -> dict[str, Any]:
        try:
            stream_id = UUID(stream)
        except ValueError:
            raise Problem("not_found", f"there is no stream {stream}") from None
        t = self.record.table
        with self.engine.connect() as conn:
            first = conn.execute(
                sa.select(t.c.state).where(t.c.originator_id == stream_id, t.c.originator_version == 1)
            ).scalar()
            if first is None or open_stored(bytes(first)).envelope["study"] != study_id:
                raise Problem("not_found", f"study {study_id} has no stream {stream}")
            rows = conn.execute(
                sa.select(t.c.id, t.c.state)
                .where(t.c.originator_id == stream_id, t.c.id > after)
                .order_by(t.c.id)
                .limit(limit + 1)
            ).all()
        version, digest = self.head(stream_id)
        items = [{"position": r.id, **json.loads(bytes(r.state))} for r in rows[:limit]]
        return {
            "stream": stream,
            "version": version,
            "hash": digest,
            "items": items,
            "next": rows[limit - 1].id if len(rows) > limit else None,
        }

    def study_subject(self, study_id: str, subject: str | None) -> str | None:
        """A subject of this study (screening number or id) as its stream id; `not_found` for one it lacks (never
        naming another study's subjects)."""
        if subject is None:
            return None
        from projections.schema import patient_state as ps

        with self.reader().engine.connect() as conn:
            found = conn.execute(
                sa.select(ps.c.subject).where(
                    ps.c.study == study_id, (ps.c.screening_number == subject) | (ps.c.subject == subject)
                )
            ).scalar()
        if found is None:
            raise Problem("not_found", f"study {study_id} has no subject {subject}")
        return str(found)

    def acts(self, fn: Callable[..., Any], **kw: Any) -> Any:
        """A read of the regulated acts' read models (projections.casebook / projections.review)."""
        with self.reader().engine.connect() as conn:
            return _jsonable(fn(conn, **kw))

    def keys(self, study: Study) -> dict[str, Any]:
        return {
            "study": str(study.id),
            "items": [{**entry, "key": kid} for kid, entry in sorted(study.keys.items())],
        }


def _page(rows: list[dict[str, Any]], after: int, limit: int, key: str = "position") -> dict[str, Any]:
    """Rows after log position `after`, at most `limit` whole positions' worth (a position's rows stay together)."""
    rows = [r for r in rows if (r.get(key) or 0) > after]
    out: list[dict[str, Any]] = []
    positions: list[int] = []
    for r in rows:
        p = r.get(key) or 0
        if not positions or positions[-1] != p:
            if len(positions) == limit:
                return {"items": _jsonable(out), "next": positions[-1]}
            positions.append(p)
        out.append(r)
    return {"items": _jsonable(out), "next": None}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(problem.body(instance), status_code=problem.status, media_type=PROBLEM_JSON)


def mount_sub_app(app: FastAPI, prefix: str, sub_app: ASGIApp) -> None:
    """Mount another ASGI app (e.g. the web view) under `prefix`; the API's routes stay under /v1."""
    if not prefix.startswith("/") or prefix.startswith("/v1"):
        raise ValueError(f"mount prefix {prefix!r} must start with / and not be the API's /v1")
    app.mount(prefix, sub_app)
    # A mounted app's own lifespan is not run: one that offers `state.close` (the web view) is closed with the API.
    close = getattr(getattr(sub_app, "state", None), "close", None)
    if callable(close):
        app.router.add_event_handler("shutdown", close)


def create_app(
    url: str | None = None,
    *,
    record: StudyRecord | None = None,
    max_body: int = MAX_BODY,
    mounts: Mapping[str, ASGIApp] | None = None,
    demo_clock: bool = False,
) -> FastAPI:
    """The API over the study record at `url` (or an open `record`).

    `demo_clock`: accept any `recorded_at` (the demo records years of a simulated trial in minutes). Never for a
    real study: it switches off the store's backdating check."""
    api = Api(url, record)
    if demo_clock:
        api.record.clock_skew = DEMO_CLOCK_SKEW
    app = FastAPI(
        title="sle-events study record API",
        version=API_VERSION,
        description="Signed study events over HTTP: RFC 9421 request signatures, problem+json errors. See docs/api.md.",
    )
    app.state.api = api
    app.router.add_event_handler("shutdown", api.close)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return _problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(x) for x in first.get("loc", ()))
        return _problem_response(Problem("validation", f"{field}: {first.get('msg', 'invalid')}", field=field))

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.TimeoutError)
    async def _busy(request: Request, exc: Exception) -> JSONResponse:
        # The database refused a connection or the pool stayed full: load, not the request. Append is one
        # transaction, and a retry with the same Idempotency-Key is safe (a stored batch gets its positions back).
        response = _problem_response(
            Problem("unavailable", f"the database is busy or unreachable ({type(exc).__name__})")
        )
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A defect, never the caller's input (the schemathesis run checks that): still problem+json.
        return _problem_response(
            Problem(
                "internal",
                f"{type(exc).__name__}: the server failed (a defect); retrying with the same Idempotency-Key is safe",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 413: "payload_too_large", 415: "unsupported_media_type"}.get(exc.status_code)
        if kind is None:
            body = {
                "type": "about:blank",
                "title": str(exc.detail),
                "status": exc.status_code,
                "detail": str(exc.detail),
            }
            return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON)
        return _problem_response(Problem(kind, str(exc.detail)))

    async def body_of(request: Request, *, write: bool) -> bytes:
        if not storable(request.url.path, request.query_params.multi_items()):
            raise Problem("validation", "a path or query holds a NUL character", field="query")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise Problem("payload_too_large", f"the body has {int(declared):,} bytes; the limit is {max_body:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise Problem("payload_too_large", f"the body exceeds the limit of {max_body:,} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if write and media != "application/json":
            raise Problem("unsupported_media_type", f"send application/json, not {media or 'no content type'}")
        if not write and body:
            raise Problem("validation", "a read takes no body", field="body")
        return body

    async def read_caller(request: Request, study: str, endpoint: str) -> tuple[Caller, Study]:
        body = await body_of(request, write=False)
        caller, s = await run_in_threadpool(api.caller, request, study, body)
        require_role(caller, endpoint)
        return caller, s

    # --------------------------------------------------------------------------------------------- writes
    @app.post(
        "/v1/studies/{study}/events",
        status_code=201,
        responses={
            **_ok({"type": "object", "required": ["events"], "properties": {"events": {"type": "array"}}}, 201),
            **_errors(409, 422),
        },
        openapi_extra={"requestBody": _APPEND_BODY},
        summary="Append one sealed event or a batch (all or nothing)",
    )
    async def append_events(
        study: str,
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Response:
        body = await body_of(request, write=True)
        status, data = await run_in_threadpool(api.write, request, study, body, idempotency_key)
        return Response(data, status_code=status, media_type="application/json" if status < 400 else PROBLEM_JSON)

    # --------------------------------------------------------------------------------------------- reads
    After = Query(0, ge=0, le=2**62, description="cursor: the log position after which to start")
    Limit = Query(PAGE, ge=1, le=MAX_PAGE)

    @app.get("/v1/studies/{study}/streams/{stream}", responses=_ok(), summary="A stream's sealed events")
    async def stream_events(study: str, stream: str, request: Request, after: int = After, limit: int = Limit) -> Any:
        await read_caller(request, study, "stream")
        return await run_in_threadpool(api.stream_page, study, stream, after, limit)

    @app.get("/v1/studies/{study}/keys", responses=_ok(), summary="The study's key registry")
    async def keys(study: str, request: Request) -> Any:
        _, s = await read_caller(request, study, "keys")
        return api.keys(s)

    def _reading(fn: Callable[[Any], Any]) -> Any:
        from projections.read import UnknownFilter
        from projections.replay import SubjectNotFound

        try:
            return _jsonable(fn(api.reader()))
        except UnknownFilter as exc:
            raise Problem("unknown_filter", str(exc)) from None
        except SubjectNotFound as exc:
            raise Problem("not_found", str(exc)) from None
        except ValueError as exc:  # a time that is not ISO 8601 with an offset, and the like
            raise Problem("validation", str(exc)) from None

    @app.get("/v1/studies/{study}/patients", responses=_ok(_PAGE_SCHEMA), summary="Every subject's patient state")
    async def patients(study: str, request: Request, status: str | None = None) -> Any:
        await read_caller(request, study, "patients")
        rows = await run_in_threadpool(_reading, lambda r: r.patients(status=status))
        return {"items": [r for r in rows if r.get("study") in (None, study)], "next": None}

    @app.get("/v1/studies/{study}/patients/{subject}", responses=_ok(), summary="One subject's patient state")
    async def patient(study: str, subject: str, request: Request) -> Any:
        await read_caller(request, study, "patients")
        row = await run_in_threadpool(_reading, lambda r: r.patient(subject))
        if row.get("study") not in (None, study):
            raise Problem("not_found", f"study {study} has no subject {subject}")
        return row

    @app.get("/v1/studies/{study}/dashboard", responses=_ok(), summary="The study dashboard")
    async def dashboard(study: str, request: Request) -> Any:
        await read_caller(request, study, "dashboard")
        return await run_in_threadpool(_reading, lambda r: r.dashboard())

    @app.get("/v1/studies/{study}/patients/{subject}/as-of", responses=_ok(), summary="As-of replay")
    async def replay(
        study: str,
        subject: str,
        request: Request,
        recorded: str | None = Query(None, description="as the record stood at this instant (ISO 8601)"),
        occurred: str | None = Query(None, description="as true in the clinic at this instant (ISO 8601)"),
    ) -> Any:
        await read_caller(request, study, "replay")
        state = await run_in_threadpool(_reading, lambda r: r.replay(subject, as_of=recorded, occurred_as_of=occurred))
        if state.get("study") not in (None, study):
            raise Problem("not_found", f"study {study} has no subject {subject}")
        return state

    @app.get("/v1/studies/{study}/audit-trail", responses=_ok(_PAGE_SCHEMA), summary="The audit trail")
    async def audit_trail(
        study: str,
        request: Request,
        subject: str | None = None,
        stream: str | None = None,
        user: str | None = None,
        event_type: str | None = None,
        since: str | None = None,
        until: str | None = None,
        change: str | None = None,
        after: int = After,
        limit: int = Limit,
    ) -> Any:
        await read_caller(request, study, "audit_trail")
        rows = await run_in_threadpool(
            _reading,
            lambda r: r.audit_trail(
                subject=subject,
                stream=stream,
                user=user,
                event_type=event_type,
                since=since,
                until=until,
                change=change,
            ),
        )
        return _page([r for r in rows if r.get("study") in (None, study)], after, limit)

    @app.get("/v1/studies/{study}/verification", responses=_ok(), summary="The last verification result")
    async def verification(study: str, request: Request) -> Any:
        await read_caller(request, study, "verification")
        return await run_in_threadpool(_last_verification, api)

    @app.get(
        "/v1/studies/{study}/ledger/checkpoint",
        responses={**_ok(), **_errors(409)},
        summary="The latest signed checkpoint",
    )
    async def checkpoint(study: str, request: Request) -> Any:
        await read_caller(request, study, "ledger")
        return await run_in_threadpool(_ledger, api, lambda lg: _checkpoint(lg))

    @app.get(
        "/v1/studies/{study}/ledger/inclusion",
        responses={**_ok(), **_errors(409)},
        summary="Inclusion proof for an event",
    )
    async def inclusion(
        study: str,
        request: Request,
        position: int | None = Query(None, ge=1, le=2**62),
        stream: str | None = None,
        version: int | None = Query(None, ge=1, le=2**31),
    ) -> Any:
        await read_caller(request, study, "ledger")
        return await run_in_threadpool(_ledger, api, lambda lg: _inclusion(lg, study, position, stream, version))

    @app.get("/v1/studies/{study}/ledger/consistency", responses={**_ok(), **_errors(409)}, summary="Consistency proof")
    async def consistency(
        study: str,
        request: Request,
        old_size: int = Query(..., ge=1, le=2**62),
        new_size: int | None = Query(None, ge=1, le=2**62),
    ) -> Any:
        await read_caller(request, study, "ledger")
        return await run_in_threadpool(
            _ledger,
            api,
            lambda lg: {
                "old_size": old_size,
                "new_size": new_size or lg.size,
                "hashes": [_b64(h) for h in lg.consistency_proof(old_size, new_size)],
            },
        )

    # ------------------------------------------------------------------- the regulated acts (docs/regulated-acts.md)
    @app.get("/v1/studies/{study}/casebook", responses=_ok(_PAGE_SCHEMA), summary="Sign-off and lock state by subject")
    async def casebook_state(study: str, request: Request, subject: str | None = None) -> Any:
        from projections.casebook import casebook_rows, lock_rows

        await read_caller(request, study, "casebook")
        stream = await run_in_threadpool(api.study_subject, study, subject)
        rows = await run_in_threadpool(partial(api.acts, casebook_rows, subject=stream))
        locks = await run_in_threadpool(partial(api.acts, lock_rows))
        return {
            "items": [r for r in rows if r.get("study") == study],
            "study_locks": [x for x in locks if x["study"] == study and x["subject"] is None],  # whole-study acts
            "next": None,
        }

    @app.get("/v1/studies/{study}/casebook/{subject}", responses=_ok(), summary="A subject's sign-offs and locks")
    async def casebook_subject(study: str, subject: str, request: Request) -> Any:
        from projections.casebook import casebook_rows, lock_rows, signoff_rows

        await read_caller(request, study, "casebook")
        stream = await run_in_threadpool(api.study_subject, study, subject)
        state = await run_in_threadpool(partial(api.acts, casebook_rows, subject=stream))
        signoffs = await run_in_threadpool(partial(api.acts, signoff_rows, subject=stream))
        locks = await run_in_threadpool(partial(api.acts, lock_rows, subject=stream))
        return {"state": state[0] if state else None, "signoffs": signoffs, "locks": locks}

    @app.get("/v1/studies/{study}/sdv", responses=_ok(_PAGE_SCHEMA), summary="Source data verification by fact")
    async def sdv_facts(
        study: str,
        request: Request,
        subject: str | None = None,
        pending: bool = Query(False, description="only facts not VERIFIED (the monitor's work list)"),
    ) -> Any:
        from projections.review import sdv_facts_status

        await read_caller(request, study, "sdv")
        stream = await run_in_threadpool(api.study_subject, study, subject)
        rows = await run_in_threadpool(partial(api.acts, sdv_facts_status, study=study, subject=stream))
        return {"items": [r for r in rows if not pending or r["status"] != "VERIFIED"], "next": None}

    @app.get("/v1/studies/{study}/sdv/progress", responses=_ok(_PAGE_SCHEMA), summary="SDV progress")
    async def sdv_progress(
        study: str,
        request: Request,
        by: str = Query("subject", description="subject, visit or site"),
        subject: str | None = None,
    ) -> Any:
        from projections.review import SDV_GROUPS, sdv_facts_status
        from projections.review import sdv_progress as progress

        await read_caller(request, study, "sdv")
        if by not in SDV_GROUPS:
            raise Problem("unknown_filter", f"SDV progress is by {', '.join(SDV_GROUPS)}, not {by!r}", field="by")
        stream = await run_in_threadpool(api.study_subject, study, subject)
        rows = await run_in_threadpool(partial(api.acts, sdv_facts_status, study=study, subject=stream))
        return {"items": progress(rows, by), "next": None}

    @app.get("/v1/studies/{study}/queries", responses=_ok(_PAGE_SCHEMA), summary="Queries (open or all)")
    async def queries(
        study: str,
        request: Request,
        subject: str | None = None,
        status: str | None = Query(None, description="OPEN, ANSWERED or CLOSED"),
        open: bool = Query(False, description="only queries not closed (OPEN or ANSWERED): what blocks a lock"),
    ) -> Any:
        from projections.review import QUERY_STATUSES
        from projections.review import queries as query_rows

        await read_caller(request, study, "queries")
        if status is not None and status not in QUERY_STATUSES:
            raise Problem("unknown_filter", f"a query's status is one of {', '.join(QUERY_STATUSES)}", field="status")
        stream = await run_in_threadpool(api.study_subject, study, subject)
        rows = await run_in_threadpool(
            partial(api.acts, query_rows, study=study, subject=stream, status=status, open_only=open)
        )
        return {"items": rows, "next": None}

    # ---------------------------------------------------------------- exports (docs/exports.md: the caller signs)
    @app.get(
        "/v1/studies/{study}/exports/{kind}",
        responses={**_ok(), **_errors(409)},
        summary="An export's files and the checkpoint they were built from (the caller signs the manifest)",
    )
    async def export(
        study: str,
        kind: str,
        request: Request,
        subject: str | None = None,
        site: str | None = None,
        recorded_from: str | None = Query(None, description="events recorded at or after (ISO 8601 with offset)"),
        recorded_to: str | None = Query(None, description="events recorded before (ISO 8601 with offset)"),
    ) -> Any:
        from sle_events.exports.remote import EXPORT_KINDS

        caller, s = await read_caller(request, study, "export")
        if kind not in EXPORT_KINDS:
            raise Problem("not_found", f"there is no export {kind!r}; there are {', '.join(EXPORT_KINDS)}")
        entry = s.keys[caller.key_id]
        return await run_in_threadpool(_export, api, study, kind, (subject, site, recorded_from, recorded_to), entry)

    # ------------------------------------------------------------------- the log as C2SP tlog-tiles (one per database)
    @app.get(
        "/v1/log/checkpoint",
        responses={
            200: {"description": "the latest signed checkpoint", "content": {"text/plain": {}}},
            **_errors(404, 500),
        },
        summary="tlog-tiles: the latest checkpoint (no signature needed: hashes only)",
    )
    async def log_checkpoint() -> Response:
        return await run_in_threadpool(_tile, api, None)

    @app.get(
        "/v1/log/tile/{path:path}",
        responses={
            200: {"description": "a hash tile or entry bundle", "content": {"application/octet-stream": {}}},
            **_errors(401, 403, 404, 500),
        },
        summary="tlog-tiles: hash tiles (open) and entry bundles (signed request: the events themselves)",
    )
    async def log_tile(path: str, request: Request) -> Response:
        if path.startswith("entries/"):
            body = await body_of(request, write=False)
            await run_in_threadpool(api.log_reader, request, body)
        return await run_in_threadpool(_tile, api, f"tile/{path}")

    for prefix, sub_app in (mounts or {}).items():
        mount_sub_app(app, prefix, sub_app)
    return app


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _ledger(api: Api, fn: Callable[[Any], Any]) -> Any:
    from sle_events.ledger.log import Ledger, LedgerError

    try:
        return fn(Ledger(engine=api.engine, create=False))
    except LedgerError as exc:
        raise Problem("ledger", str(exc)) from None
    except sa.exc.OperationalError:
        raise Problem("ledger", "this database has no ledger: run `sle ledger init`") from None


def _tile(api: Api, path: str | None) -> Response:
    from sle_events.ledger.log import Ledger, LedgerError
    from sle_events.ledger.tiles import TileError, serve_checkpoint, serve_tile

    try:
        ledger = Ledger(engine=api.engine, create=False)
        served = serve_checkpoint(ledger) if path is None else serve_tile(ledger, path)
    except TileError as exc:
        raise Problem("not_found", str(exc)) from None
    except LedgerError as exc:
        if "no ledger" in str(exc):
            raise Problem("not_found", str(exc)) from None
        raise Problem("ledger_damaged", str(exc)) from None
    return Response(served.body, headers=served.headers, media_type=served.media_type)


def _checkpoint(ledger: Any) -> dict[str, Any]:
    from sle_events.ledger.log import LedgerError

    latest = ledger.latest_checkpoint()
    if latest is None:
        raise LedgerError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
    return {"size": latest.size, "root": _b64(latest.root), "note": latest.note, "issued_at": str(latest.issued_at)}


def _inclusion(ledger: Any, study: str, position: int | None, stream: str | None, version: int | None) -> Any:
    if (position is None) == (stream is None or version is None):
        raise Problem("validation", "give position, or stream and version", field="position")
    if position is None:
        try:
            position = ledger.position_of(stream, version)
        except ValueError:
            raise Problem("validation", f"stream {stream!r} is not a UUID", field="stream") from None
    proof = ledger.inclusion_proof(position)
    leaf = proof.leaf_bytes or b""
    if leaf and open_stored(leaf).envelope["study"] != study:
        raise Problem("not_found", f"study {study} has no event at log position {position}")
    return {
        "index": proof.index,
        "position": proof.position,
        "size": proof.size,
        "hashes": [_b64(h) for h in proof.hashes],
        "checkpoint": proof.checkpoint,
        "proof": proof.text,
        "leaf": _b64(leaf),
    }


def _export(api: Api, study: str, kind: str, asked: tuple[str | None, ...], entry: dict[str, Any]) -> dict[str, Any]:
    """Build the export for the caller whose registry `entry` is given (sle_events.exports.remote)."""
    from datetime import datetime

    from sle_events.exports.manifest import ExportError
    from sle_events.exports.odm import OdmExportError
    from sle_events.exports.remote import build_export
    from sle_events.exports.scope import ExportScope, ExportScopeError
    from sle_events.exports.sdtm import SdtmRefused

    subject, site, recorded_from, recorded_to = asked
    try:
        times = [None if t is None else datetime.fromisoformat(t) for t in (recorded_from, recorded_to)]
        scope = ExportScope(subject, site, times[0], times[1], study=study).resolve(api.url)
    except (ValueError, ExportScopeError) as exc:  # ExportScopeError is a ValueError too
        raise Problem("validation", str(exc)) from None
    try:
        return build_export(
            api.url, kind, scope, public_key=entry["public_key"], printed_name=entry.get("printed_name")
        )
    except ExportError as exc:
        raise Problem("export_refused", str(exc)) from None
    except (OdmExportError, SdtmRefused) as exc:  # a builder's own check failed: nothing was served
        raise Problem("export_refused", f"{type(exc).__name__}: {exc}") from None


def _last_verification(api: Api) -> dict[str, Any]:
    from projections.audit_trail import last_verification

    try:
        with api.engine.connect() as conn:
            last = last_verification(conn)
    except sa.exc.SQLAlchemyError:
        last = None
    if last is None:
        return {"run_at": None, "ok": None, "findings": 0, "unverifiable": None}
    findings = sum(len(v) for v in last["findings_by_position"].values())
    return {"run_at": last["run_at"], "ok": last["ok"], "findings": findings, "unverifiable": last["unverifiable"]}


assert all(k in PROBLEMS for k in ("malformed", "wrong_study", "unknown_event_type"))
