"""The auditor's side: one verifier built from an explicit trust root, above the store and the ledger.

* :mod:`.trust` -- `TrustRoot` (admin keys, the log's vkey, saved checkpoints), `load_vkey`
* :mod:`.verifier` -- `Verifier` (its checks numbered in the order they run), `verify_record`
* :mod:`.record_check` -- signatures, keys, roles and chains of every event
* :mod:`.ledger_check` -- the Merkle tree recomputed from the events against the ledger's tables and checkpoints
* :mod:`.offline` -- proof and checkpoint files checked with the vkey alone
* :mod:`.results` -- verification results signed by the verifier, checked where they are shown
* :mod:`.findings`, :mod:`.errors` -- `Finding`/`Report`; the error tree and the exit codes

Names are loaded on first use, so `offline` and `trust` never pull in the database code.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Finding": "findings",
    "Report": "findings",
    "AuditError": "errors",
    "UnusableInput": "errors",
    "ProofRejected": "errors",
    "exit_code": "errors",
    "TrustRoot": "trust",
    "load_vkey": "trust",
    "Verifier": "verifier",
    "verify_record": "verifier",
    "verify_ledger": "ledger_check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
