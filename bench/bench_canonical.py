"""Canonicalisation can cost as much as signing: RFC 8785 reference vs our fast path, vs Ed25519 sign/verify."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import rfc8785

from bench.common import SignedWorkload, fresh, machine
from sle_events.signing.canonical import canonical_json
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord


def _rate(n: int, fn) -> float:
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def run(n: int = 20000) -> dict[str, float]:
    record = StudyRecord(fresh("sqlite"))
    env = SignedWorkload(record, subjects=1).sign(1)[0].envelope
    record.close()
    assert canonical_json(env) == rfc8785.dumps(env)
    signer = Signer.generate("bench", "lab")
    msg = canonical_json(env)
    sig = signer.sign(msg)
    pub = signer._private_key.public_key()
    return {
        "fields": len(env) + len(env["payload"]),
        "rfc8785": _rate(n, lambda: rfc8785.dumps(env)),
        "fast_path": _rate(n, lambda: canonical_json(env)),
        "sign": _rate(n // 4, lambda: signer.sign(msg)),
        "verify": _rate(n // 4, lambda: pub.verify(sig, msg)),
    }


def main() -> None:
    r = run()
    print(f"# canonicalisation — {machine()} — {datetime.now(UTC):%Y-%m-%d}")
    print(
        f"envelope of {r['fields']} fields: rfc8785.dumps {r['rfc8785']:.0f}/s, fast path {r['fast_path']:.0f}/s "
        f"({r['fast_path'] / r['rfc8785']:.1f}× the reference); Ed25519 sign {r['sign']:.0f}/s, "
        f"verify {r['verify']:.0f}/s per core"
    )


if __name__ == "__main__":
    main()
