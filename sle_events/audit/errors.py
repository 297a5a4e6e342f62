"""One error tree for the auditor's tools, and the one place that maps outcomes to exit codes.

Exit codes of `sle verify` and `sle ledger verify-proof`: 0 verified, 1 findings (or a proof that does not
verify), 2 unusable input (bad vkey, saved checkpoint of another log, no record at the URL), 3 the tool itself
failed (a bug or an unreachable database): never confused with findings.
"""

from __future__ import annotations

from typing import Any

OK, FINDINGS, UNUSABLE_INPUT, TOOL_FAILED = 0, 1, 2, 3


class AuditError(Exception):
    """Base of the auditor's errors; each says what to do about itself (`diagnostics`)."""

    exit_code = TOOL_FAILED

    def diagnostics(self) -> str:
        return str(self)


class UnusableInput(AuditError, ValueError):
    """The auditor's input cannot be used: a malformed vkey, a saved checkpoint that does not verify with it or
    comes from another log, no study record at the URL. Nothing was checked."""

    exit_code = UNUSABLE_INPUT


class ProofRejected(AuditError):
    """An offline proof (inclusion or consistency) does not verify: the reason is the message."""

    exit_code = FINDINGS


def exit_code(outcome: Any) -> int:
    """0/1 for a report (findings or none), the error's own code for an `AuditError`, 3 for anything else."""
    if isinstance(outcome, BaseException):
        return outcome.exit_code if isinstance(outcome, AuditError) else TOOL_FAILED
    return OK if outcome.ok else FINDINGS
