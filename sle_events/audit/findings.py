"""What `sle verify` answers: findings (what, where, why) and the report that gathers them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One thing that does not hold: which stream and version, what kind of problem, and why."""

    stream: str | None
    version: int | None
    kind: str
    detail: str
    position: int | None = None  # the event's place in the log (notification id)


@dataclass
class Report:
    events: int = 0
    streams: int = 0
    studies: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    ledger: dict[str, Any] | None = None  # what the ledger check covered (None: the record has no ledger)
    since: dict[str, Any] | None = None  # incremental verification: the checkpoint it started from

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "ok": self.ok,
            "events": self.events,
            "streams": self.streams,
            "studies": self.studies,
            "seconds": round(self.seconds, 3),
            "findings": [asdict(f) for f in self.findings],
        }
        if self.ledger is not None:
            doc["ledger"] = self.ledger
        if self.since is not None:
            doc["since"] = self.since
        return doc
