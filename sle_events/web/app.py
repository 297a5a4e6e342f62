"""The read-only web view: an ASGI application (Starlette) to run alone or mount inside the HTTP API.

    from sle_events.web import create_web_app
    api.mount("/web", create_web_app("postgresql+psycopg://…/study"))     # or: uvicorn --factory …

Every page needs a session (`sessions.py`), shows only the signed-in key's study, and is a GET; the only other
requests are the sign-in (POST of a token that `sle web link` signed) and the sign-out. Templates are Jinja2
with autoescape; the stylesheet is served from the package; there is no script and no third-party asset.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from projections.base import ProjectionHalted
from projections.read import UnknownFilter, display_value
from sle_events.store.record import StudyRecord
from sle_events.store.text import storable
from sle_events.web.data import LAB_NAMES, STATUS_KINDS, AsOf, NotFound, WebData, parse_as_of
from sle_events.web.sessions import DEFAULT_SESSION_TTL, NotSignedIn, Session, SessionStore
from sle_events.web.signin import BadToken
from sle_events.web.svg import trend_svg

HERE = Path(__file__).resolve().parent
PATH_PARAMS = {"subject": ("subject",), "event": ("position",), "proof": ("position",)}
COOKIE = "sle_web_session"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a sign-in link's token never leaves in a Referer
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def create_web_app(
    db_url: str,
    *,
    session_ttl: timedelta = DEFAULT_SESSION_TTL,
    secure_cookies: bool | None = None,
    catch_up: bool = False,
) -> Starlette:
    """The web view of the study record at `db_url`. `secure_cookies` (default: when the request came over
    https) marks the session cookie Secure. The view reads the read models that `sle projections run` keeps
    up to date and says how far behind they are; `catch_up=True` (a demo, a test) brings them up to date itself
    when the record has moved on."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.globals["lab_names"] = LAB_NAMES
    env.globals["dose"] = lambda value: display_value("MSCDOSE", value) if value else ""
    state: dict[str, Any] = {}

    def close() -> None:
        """Close the database connections (a mounted app's lifespan is not run: the host app calls this)."""
        for name in ("data", "record"):
            held = state.pop(name, None)
            if held is not None:
                held.close()
        state.pop("sessions", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        close()

    def data() -> WebData:
        if "data" not in state:
            state["data"] = WebData(db_url, catch_up=catch_up)
        return state["data"]

    def sessions() -> SessionStore:
        if "sessions" not in state:
            state["record"] = StudyRecord(db_url)
            state["sessions"] = SessionStore(state["record"], ttl=session_ttl)
        return state["sessions"]

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        def link(route: str, **params: Any) -> str:
            """A page's URL with the current as-of carried along (and the given query parameters)."""
            path_params = {k: params.pop(k) for k in PATH_PARAMS.get(route, ())}
            query = {k: v for k, v in params.items() if v not in (None, "")}
            for k in ("as_of", "axis"):
                if k not in query and request.query_params.get(k) and route != "signin":
                    query[k] = request.query_params[k]
            url = str(request.url_for(route, **path_params).path)
            return url + ("?" + urlencode(query) if query else "")

        html = env.get_template(name).render(
            request=request,
            link=link,
            static=lambda path: str(request.url_for("static", path=path).path),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def page(template: str, build: Callable[[Request, Session, AsOf], dict[str, Any]]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            try:
                session = await run_in_threadpool(sessions().current, request.cookies.get(COOKIE))
            except NotSignedIn as e:
                response = render(request, "signin.html", 401, reason=str(e), token="", session=None)
                response.delete_cookie(COOKIE, path=_cookie_path(request))
                return response
            if not storable(request.url.path, request.query_params.multi_items()):
                return render(
                    request,
                    "error.html",
                    400,
                    session=session,
                    as_of=AsOf(),
                    title="Not understood",
                    message="The address holds a NUL character.",
                )
            try:
                as_of = parse_as_of(request.query_params.get("as_of"), request.query_params.get("axis"))
                behind = await run_in_threadpool(data().fresh)
                context = await run_in_threadpool(build, request, session, as_of)
                context["behind"] = behind
            except UnknownFilter as e:
                return render(
                    request, "error.html", 400, session=session, as_of=AsOf(), title="Not understood", message=str(e)
                )
            except NotFound as e:
                return render(
                    request, "error.html", 404, session=session, as_of=AsOf(), title="Not found", message=str(e)
                )
            except ProjectionHalted as e:
                return render(
                    request,
                    "error.html",
                    503,
                    session=session,
                    as_of=AsOf(),
                    title="The read models are halted",
                    message=f"{e} — nothing is shown until the record is repaired (`sle verify`).",
                )
            return render(request, template, session=session, as_of=as_of, **context)

        return endpoint

    # ------------------------------------------------------------------------------------------ pages
    def dashboard(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        d = data()
        return {"d": d.dashboard(session.study, as_of), "v": d.verification(), "title": "Study dashboard"}

    def subjects(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        d = data()
        if as_of.when is None:
            rows = d.subject_rows(session.study)
        else:
            rows = [s for s, _ in d.summaries_as_of(session.study, as_of)]
        return {"rows": rows, "title": "Subjects"}

    def subject(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        s = data().subject(
            session.study,
            request.path_params["subject"],
            as_of,
            all_events=request.query_params.get("events") == "all",
        )
        plots = [
            (
                code,
                trend_svg(
                    LAB_NAMES.get(code, code),
                    points[-1][2],
                    points,
                    transplant=s["tx_date"],
                    visits=s["visits"],
                    plot_id=f"plot-{code.lower()}",
                ),
            )
            for code, points in s["series"].items()
        ]
        return {
            "s": s,
            "plots": plots,
            "kinds": list(STATUS_KINDS),
            "title": f"Subject {s['state']['screening_number']}",
        }

    def audit(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        names = (
            "subject",
            "item",
            "user",
            "type",
            "change",
            "recorded_from",
            "recorded_to",
            "occurred_from",
            "occurred_to",
            "after",
            "before",
        )
        filters = {n: request.query_params.get(n, "").strip() for n in names}
        d = data()
        page_data = d.audit(session.study, filters, as_of)
        shown = {k: v for k, v in filters.items() if k not in ("after", "before")}
        return {"a": page_data, "f": shown, "choices": d.filter_choices(session.study), "title": "Audit trail"}

    def event(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        e = data().event(session.study, request.path_params["position"])
        return {"e": e, "title": f"Event at log position {e['position']}"}

    def verification(request: Request, session: Session, as_of: AsOf) -> dict[str, Any]:
        return {"v": data().verification(), "title": "Verification"}

    async def proof(request: Request) -> Response:
        try:
            session = await run_in_threadpool(sessions().current, request.cookies.get(COOKIE))
            text = await run_in_threadpool(data().proof_text, session.study, request.path_params["position"])
        except NotSignedIn as e:
            return PlainTextResponse(f"not signed in: {e}\n", 401, headers=SECURITY_HEADERS)
        except NotFound as e:
            return PlainTextResponse(f"{e}\n", 404, headers=SECURITY_HEADERS)
        headers = dict(SECURITY_HEADERS)
        headers["Content-Disposition"] = f'attachment; filename="event-{request.path_params["position"]}.proof"'
        return PlainTextResponse(text, headers=headers)

    # ------------------------------------------------------------------------------------------ sign in/out
    async def signin_form(request: Request) -> Response:
        """The page a sign-in link opens: the token in a form, signed in only when the person presses the button
        (a link preview or prefetch never uses up the one-use token)."""
        token = request.query_params.get("token", "")
        return render(request, "signin.html", reason=None, token=token, session=None)

    async def signin(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", ""))
        try:
            cookie, _session = await run_in_threadpool(sessions().sign_in, token)
        except BadToken as e:
            return render(request, "signin.html", 403, reason=f"Not signed in: {e}", token="", session=None)
        response = RedirectResponse(str(request.url_for("dashboard").path), status_code=303)
        secure = request.url.scheme == "https" if secure_cookies is None else secure_cookies
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=int(session_ttl.total_seconds()),
            path=_cookie_path(request),
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def signout(request: Request) -> Response:
        await run_in_threadpool(sessions().sign_out, request.cookies.get(COOKIE))
        response = render(request, "signin.html", reason="Signed out.", token="", session=None)
        response.delete_cookie(COOKIE, path=_cookie_path(request))
        return response

    routes = [
        Route("/", page("dashboard.html", dashboard), name="dashboard"),
        Route("/subjects", page("subjects.html", subjects), name="subjects"),
        Route("/subjects/{subject}", page("subject.html", subject), name="subject"),
        Route("/audit", page("audit.html", audit), name="audit"),
        Route("/events/{position:int}", page("event.html", event), name="event"),
        Route("/events/{position:int}/proof", proof, name="proof"),
        Route("/verification", page("verification.html", verification), name="verification"),
        Route("/signin", signin_form, methods=["GET"], name="signin"),
        Route("/signin", signin, methods=["POST"], name="signin_post"),
        Route("/signout", signout, methods=["POST"], name="signout"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.web_data = data
    app.state.sessions = sessions
    app.state.close = close
    return app


def _cookie_path(request: Request) -> str:
    return (request.scope.get("root_path") or "") + "/"


def app_from_env() -> Starlette:
    """`uvicorn --factory sle_events.web.app:app_from_env`: the database of $SLE_DATABASE_URL."""
    from sle_events.store.record import database_url

    return create_web_app(database_url(None))
