"""The sign-off check of `sle verify`: does the data each investigator signed off still hash to what they signed?

A sign-off (`Casebook.SignedOff`) names the events it covers and their content hash
(`sle_events.domain.casebook.content_hash`). Signed-over data altered, replaced or deleted by SQL after the
sign-off no longer give that hash: a `signed_content_changed` finding at the sign-off, naming the signer and
what it covered (the altered event itself is reported where it lies, e.g. `bad_signature`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from sle_events.audit.findings import Finding
from sle_events.domain.casebook import CONTENT_HASH_METHOD, CoveredStream
from sle_events.domain.event_types import stored_topics
from sle_events.signing.envelope import open_stored
from sle_events.store.casebook import recompute_content_hash

__all__ = ["check_signoffs"]


def check_signoffs(conn: Any, table: Any) -> list[Finding]:
    findings: list[Finding] = []
    rows = conn.execute(
        select(table.c.id, table.c.originator_id, table.c.originator_version, table.c.state)
        .where(table.c.topic.in_(stored_topics("Casebook.SignedOff")))
        .order_by(table.c.id)
    ).all()
    for position, stream, version, state in rows:
        where = (str(stream), version)
        try:
            env = open_stored(bytes(state)).envelope
            payload = env["payload"]
            covers = [CoveredStream.model_validate(c) for c in payload["covers"]]
            signed, method = payload["content_hash"], payload["hash_method"]
        except Exception as exc:  # an unreadable sign-off is a finding of the record check already
            findings.append(Finding(*where, "signed_content_changed", f"the sign-off cannot be read: {exc}", position))
            continue
        if method != CONTENT_HASH_METHOD:
            findings.append(
                Finding(*where, "signed_content_changed", f"unknown content hash method {method!r}", position)
            )
            continue
        digest, missing = recompute_content_hash(conn, table, covers)
        if digest == signed:
            continue
        what = ", ".join(
            f"{c.stream} v1–v{c.through_version}" if c.versions is None else f"{c.stream} v{list(c.versions)}"
            for c in covers
        )
        why = (
            f"covered events are gone: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            if missing
            else f"they hash to {(digest or '')[:16]}…, not the signed {signed[:16]}…"
        )
        findings.append(
            Finding(
                *where,
                "signed_content_changed",
                f"data signed off ({payload.get('meaning')}) by {payload.get('printed_name')} ({env['actor']}) at "
                f"{env['occurred_at']} were altered after the sign-off: {what}; {why}",
                position,
            )
        )
    return findings
