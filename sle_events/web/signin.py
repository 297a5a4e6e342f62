"""Sign-in tokens for the web view: a short-lived, one-use statement signed with a person's registered key.

`sle web link --key FILE` builds one and prints it inside a URL; the web view checks it against the study's key
registry (`sessions.py`). The token is two base64url parts joined by a dot: the RFC 8785 canonical JSON of

    {"purpose": "sle-web-signin", "key": <key id>, "study": <study id or code, or null>,
     "issued_at": <UTC ISO 8601>, "expires_at": <UTC ISO 8601>, "nonce": <32 hex digits>}

and the Ed25519 signature of exactly those bytes. The purpose string keeps a token from being mistaken for any
other signed thing (an event envelope is canonical JSON too, but never has this purpose). Pure: no database.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sle_events.signing.canonical import canonical_json, loads_strict
from sle_events.signing.keys import Signer

PURPOSE = "sle-web-signin"
DEFAULT_LIFETIME = timedelta(minutes=5)
MAX_LIFETIME = timedelta(minutes=15)  # a sign-in link is for now, not a standing credential
MAX_TOKEN_CHARS = 2048
_FIELDS = {"purpose", "key", "study", "issued_at", "expires_at", "nonce"}
_NONCE = re.compile(r"[0-9a-f]{32}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class BadToken(ValueError):
    """A sign-in token that is not one (form), or whose claims cannot be accepted (the message says which)."""


@dataclass(frozen=True)
class SigninClaims:
    key: str
    study: str | None
    issued_at: datetime
    expires_at: datetime
    nonce: str
    message: bytes  # the signed bytes
    signature: bytes


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadToken(f"the token's {what} is not base64url") from None


def make_token(
    signer: Signer,
    study: str | None,
    *,
    lifetime: timedelta = DEFAULT_LIFETIME,
    now: datetime | None = None,
) -> str:
    """A sign-in token for `signer`'s key, valid for `lifetime` (at most MAX_LIFETIME), usable once."""
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"a sign-in token lives more than 0 s and at most {int(MAX_LIFETIME.total_seconds())} s")
    issued = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    claims: dict[str, Any] = {
        "purpose": PURPOSE,
        "key": signer.key_id,
        "study": study,
        "issued_at": issued.isoformat(),
        "expires_at": (issued + lifetime).isoformat(),
        "nonce": secrets.token_hex(16),
    }
    message = canonical_json(claims)
    return f"{_b64url(message)}.{_b64url(signer.sign(message))}"


def read_token(token: str) -> SigninClaims:
    """The claims of a token, checked for form only (the signature and the registry: `sessions.SessionStore`)."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise BadToken("not a sign-in token (expected two base64url parts joined by a dot)")
    head, sig = token.split(".")
    message, signature = _unb64url(head, "claims"), _unb64url(sig, "signature")
    if len(signature) != 64:
        raise BadToken("the token's signature is not an Ed25519 signature")
    try:
        claims = loads_strict(message)
    except Exception:
        raise BadToken("the token's claims are not JSON") from None
    if not isinstance(claims, dict) or set(claims) != _FIELDS or claims.get("purpose") != PURPOSE:
        raise BadToken("not a sign-in token (its claims are not those `sle web link` signs)")
    if canonical_json(claims) != message:
        raise BadToken("the token's claims are not in canonical form")
    key, study, nonce = claims["key"], claims["study"], claims["nonce"]
    if not isinstance(key, str) or not _KEY_ID.fullmatch(key):
        raise BadToken("the token's key is not a key id")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise BadToken("the token's nonce is not 32 hex digits")
    if study is not None and (not isinstance(study, str) or not 0 < len(study) <= 200):
        raise BadToken("the token's study is not a study id or code")
    times = []
    for name in ("issued_at", "expires_at"):
        try:
            when = datetime.fromisoformat(claims[name]) if isinstance(claims[name], str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise BadToken(f"the token's {name} is not an ISO 8601 time with its offset")
        times.append(when)
    return SigninClaims(key, study, times[0], times[1], nonce, message, signature)
