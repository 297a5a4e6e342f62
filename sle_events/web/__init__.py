"""The read-only web view for monitors and auditors (`create_web_app`); `sle web link` signs people in.

Importing the package stays light (`sle_events.schema` reads its tables): the web stack loads with the app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette


def create_web_app(db_url: str, **options: Any) -> Starlette:
    """The web view of the record at `db_url` as an ASGI app (see `sle_events.web.app.create_web_app`)."""
    from sle_events.web.app import create_web_app as make

    return make(db_url, **options)


__all__ = ["create_web_app"]
