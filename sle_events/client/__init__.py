"""A service's HTTP client: seals envelopes with the service's own key and signs every request (RFC 9421).

    client = Client("http://127.0.0.1:8000", signer, study_id)
    client.append([seal(envelope, signer)])        # 201, or raises ApiProblem (problem+json)

The private key never leaves the process: requests are prepared by `http-message-signatures` and signed by
`Signer.sign`. Only `signing` and `domain` are used here; nothing of the server. Requests go out on the standard
library's keep-alive connections (`connections`), or through the httpx client given (a test client bound to the
app, a proxy, client certificates); a proxy in the environment is used through httpx.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from http_message_signatures import HTTPMessageSigner, algorithms

from sle_events.client.connections import Connections, proxied
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.signing.requests import READ_COMPONENTS, WRITE_COMPONENTS

__all__ = ["ApiProblem", "Client", "seal", "sign_request", "signature_headers"]

_SIGNER = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)


class ApiProblem(Exception):
    """A refusal from the server: its problem+json (`type`, `title`, `status`, `detail`, ...)."""

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.status = int(problem.get("status", 0))
        self.type = str(problem.get("type", ""))
        self.kind = self.type.rsplit(":", 1)[-1]
        super().__init__(f"{self.status} {problem.get('title', '')}: {problem.get('detail', '')}")


class _Covered:
    """The parts of a request its signature covers, as `http-message-signatures` reads a message: the library
    then goes through these few headers only, not every header the request will carry."""

    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = headers


def signature_headers(
    method: str,
    url: str,
    body: bytes | None,
    signer: Signer,
    *,
    content_type: str = "application/json",
    created: datetime | None = None,
) -> dict[str, str]:
    """The headers that sign a request to `url` with `signer` (keyid = its registered key id) and a fresh nonce:
    `Signature-Input` and `Signature`, and with a body its `Content-Type` and RFC 9530 `Content-Digest`."""
    message = _Covered(method, url, {"Content-Type": content_type} if body else {})
    prepared = _SIGNER.prepare(
        message,
        key_id=signer.key_id,
        created=created or datetime.now(UTC),
        nonce=secrets.token_urlsafe(18),
        label="sle",
        covered_component_ids=WRITE_COMPONENTS if body else READ_COMPONENTS,
        body=body or None,
    )
    _SIGNER.apply(message, prepared, signer.sign(prepared.signature_base))
    return message.headers


def sign_request(request: httpx.Request, signer: Signer, *, created: datetime | None = None) -> httpx.Request:
    """Sign an httpx `request` in place with `signer` (`signature_headers`)."""
    body = request.content
    content_type = request.headers.get("content-type")
    if body and content_type is None:
        raise ValueError("a request with a body needs its Content-Type, which the signature covers")
    request.headers.update(
        signature_headers(
            request.method, str(request.url), body, signer, content_type=content_type or "", created=created
        )
    )
    return request


class Client:
    """Talks to `sle serve` for one study as one registered key."""

    def __init__(
        self,
        base_url: str,
        signer: Signer,
        study: str | uuid.UUID,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
    ) -> None:
        """`http`: an httpx client to send through (a test client bound to the app, a proxy, client
        certificates); else the standard library's connections, or httpx if a proxy applies to `base_url`."""
        self.signer = signer
        self.study = str(study)
        if http is None and proxied(base_url):
            http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self.http = http
        self._connections = Connections(base_url, timeout) if http is None else None

    def close(self) -> None:
        if self._connections is not None:
            self._connections.close()
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A signed request; returns the response as it came (no raising; a failure to reach the server is
        httpx's `HTTPError`, whichever way it was sent)."""
        all_headers = dict(headers or {})
        content_type = next((v for k, v in all_headers.items() if k.lower() == "content-type"), None)
        if body is not None and content_type is None:
            all_headers["Content-Type"] = content_type = "application/json"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if self._connections is None:
            assert self.http is not None
            request = self.http.build_request(method, path, params=query, content=body, headers=all_headers)
            sign_request(request, self.signer)
            return self.http.send(request)
        target = f"{path}?{urlencode(query)}" if query else path
        url = self._connections.url(target)

        def signed() -> dict[str, str]:  # signed again should the request be sent again (a new nonce)
            signature = signature_headers(method, url, body, self.signer, content_type=content_type or "")
            signature.pop("Content-Type", None)  # the request's own, as given
            return {**all_headers, **signature}

        return self._connections.send(method, target, body, signed)

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"status": response.status_code, "title": response.reason_phrase, "detail": response.text}
            raise ApiProblem(problem)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._json(self.request("GET", f"/v1/studies/{self.study}{path}", params=params))

    # --- writing ---------------------------------------------------------------------------------------
    def append(self, events: Sequence[SealedEvent], *, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """Send sealed events (one request, all or nothing); returns stream, version, position, hash of each.
        Retrying with the same `idempotency_key` is safe: the first answer comes back, nothing is stored twice."""
        # sealed bytes are JSON already: sent as they are, never parsed and written again
        body = events[0].sealed if len(events) == 1 else b'{"events":[' + b",".join(e.sealed for e in events) + b"]}"
        key = idempotency_key or str(uuid.uuid4())
        response = self.request("POST", f"/v1/studies/{self.study}/events", body=body, headers={"Idempotency-Key": key})
        return list(self._json(response)["events"])

    def seal(self, envelope: dict[str, Any]) -> SealedEvent:
        """Sign an envelope with this client's key (actor, role and key id are filled in)."""
        return seal(envelope, self.signer)

    # --- reading ---------------------------------------------------------------------------------------
    def head(self, stream: str | uuid.UUID) -> tuple[int, str]:
        """The stream's current (version, hash); (0, genesis) for a stream with no events yet."""
        try:
            page = self.get(f"/streams/{stream}", limit=1)
        except ApiProblem as exc:
            if exc.status == 404:
                return 0, GENESIS
            raise
        return int(page["version"]), str(page["hash"])

    def stream(self, stream: str | uuid.UUID) -> list[dict[str, Any]]:
        """Every sealed event of a stream ({"position", "envelope", "signature"}), following the cursor."""
        items: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.get(f"/streams/{stream}", after=after, limit=1000)
            items.extend(page["items"])
            if page["next"] is None:
                return items
            after = page["next"]
