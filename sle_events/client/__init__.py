"""A service's HTTP client: seals envelopes with the service's own key and signs every request (RFC 9421).

    client = Client("http://127.0.0.1:8000", signer, study_id)
    client.append([seal(envelope, signer)])        # 201, or raises ApiProblem (problem+json)

The private key never leaves the process: requests are prepared by `http-message-signatures` and signed by
`Signer.sign`. Only `signing` and `domain` are used here; nothing of the server.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from http_message_signatures import HTTPMessageSigner, algorithms

from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.signing.requests import READ_COMPONENTS, WRITE_COMPONENTS

__all__ = ["ApiProblem", "Client", "seal", "sign_request"]


class ApiProblem(Exception):
    """A refusal from the server: its problem+json (`type`, `title`, `status`, `detail`, ...)."""

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.status = int(problem.get("status", 0))
        self.type = str(problem.get("type", ""))
        self.kind = self.type.rsplit(":", 1)[-1]
        super().__init__(f"{self.status} {problem.get('title', '')}: {problem.get('detail', '')}")


def sign_request(request: httpx.Request, signer: Signer, *, created: datetime | None = None) -> httpx.Request:
    """Sign `request` in place with `signer` (keyid = its registered key id) and a fresh nonce."""
    body = request.content
    hms = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)
    prepared = hms.prepare(
        request,
        key_id=signer.key_id,
        created=created or datetime.now(UTC),
        nonce=secrets.token_urlsafe(18),
        label="sle",
        covered_component_ids=WRITE_COMPONENTS if body else READ_COMPONENTS,
        body=body or None,
    )
    hms.apply(request, prepared, signer.sign(prepared.signature_base))
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
        """`http`: an httpx client to send through (e.g. a test client bound to the app), else a new one."""
        self.signer = signer
        self.study = str(study)
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
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
        """A signed request; returns the response as it came (no raising)."""
        all_headers = dict(headers or {})
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        query = {k: v for k, v in (params or {}).items() if v is not None}
        request = self.http.build_request(method, path, params=query, content=body, headers=all_headers)
        sign_request(request, self.signer)
        return self.http.send(request)

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
