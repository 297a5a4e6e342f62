"""What the lock rule costs at append (sle_events/domain/casebook.py): single signed lab results appended with
`StudyRecord._check_casebook_locks` (one indexed read of the subject's and the study's casebook streams inside the
write transaction) against the same appends with the check switched off, alternating rounds on one database.

    python -m bench.bench_lock_check [N]      # N appends per round (default 300), 3 rounds per side, both engines
"""

from __future__ import annotations

import sys
from functools import partial
from statistics import median
from typing import Any

from bench.common import SignedWorkload, engines, machine, rate
from sle_events.store.record import StudyRecord


def measure(url: str, n: int, rounds: int = 3) -> tuple[float, float, list[float]]:
    record = StudyRecord(url)
    work = SignedWorkload(record)
    checked = record._check_casebook_locks

    def unchecked(*args: Any) -> None:
        return None

    def append_each(events: list[Any]) -> None:
        for e in events:
            record.append([e])

    ratios, on_rates, off_rates = [], [], []
    try:
        for _ in range(rounds):
            rates = {}
            for side in ("off", "on"):
                events = work.sign(n)
                switch: Any = checked if side == "on" else unchecked
                record._check_casebook_locks = switch  # type: ignore[method-assign]  # the A/B switch
                rates[side] = rate(n, partial(append_each, events))
            on_rates.append(rates["on"])
            off_rates.append(rates["off"])
            ratios.append(rates["on"] / rates["off"])
    finally:
        record._check_casebook_locks = checked  # type: ignore[method-assign]  # restored
        record.close()
    return median(on_rates), median(off_rates), sorted(ratios)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(machine())
    for name, url in engines():
        on, off, ratios = measure(url, n)
        print(
            f"{name}: with the lock check {on:,.0f}/s, without {off:,.0f}/s; ratio median {median(ratios):.2f} "
            f"(spread {ratios[0]:.2f}–{ratios[-1]:.2f}, {len(ratios)} alternating rounds of {n})"
        )


if __name__ == "__main__":
    main()
