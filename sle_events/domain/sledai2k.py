"""The SLEDAI-2K descriptor table (``sledai2k.csv``, shipped as package data).

Descriptors are identified by their code (``SLED2K01`` … ``SLED2K24``); the weight is the
points a descriptor adds when present. The total is computed in
:func:`sle_events.domain.formulas.sledai2k_total`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from sle_events.domain.errors import UnknownDescriptor
from sle_events.domain.labs import read_data_file

__all__ = ["Descriptor", "DESCRIPTORS", "load_descriptors", "get_descriptor", "MAX_TOTAL"]


@dataclass(frozen=True, slots=True)
class Descriptor:
    item: int
    code: str
    descriptor: str
    weight: int
    organ_system: str
    definition: str
    lab_rule: str | None


def load_descriptors(path: str | Path | None = None) -> dict[str, Descriptor]:
    """Parse sledai2k.csv (the packaged copy unless ``path`` is given) into ``{code: Descriptor}``."""
    raw = Path(path).read_bytes() if path is not None else read_data_file("sledai2k.csv")
    table: dict[str, Descriptor] = {}
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        code = row["code"].strip()
        if code in table:
            raise ValueError(f"sledai2k.csv: duplicate descriptor code {code!r}")
        weight = int(row["weight"])
        if weight <= 0:
            raise ValueError(f"sledai2k.csv: {code} has non-positive weight {weight}")
        table[code] = Descriptor(
            item=int(row["item"]),
            code=code,
            descriptor=row["descriptor"].strip(),
            weight=weight,
            organ_system=row["organ_system"].strip(),
            definition=row["definition"].strip(),
            lab_rule=(row.get("lab_rule") or "").strip() or None,
        )
    return table


#: Descriptor table from the packaged sledai2k.csv (read-only).
DESCRIPTORS: Mapping[str, Descriptor] = MappingProxyType(load_descriptors())

#: Highest possible total (every descriptor present): 105 with the published weights.
MAX_TOTAL: int = sum(d.weight for d in DESCRIPTORS.values())


def get_descriptor(code: str) -> Descriptor:
    """The descriptor with ``code``; :class:`UnknownDescriptor` otherwise (codes are exact)."""
    try:
        return DESCRIPTORS[code]
    except (KeyError, TypeError):
        raise UnknownDescriptor(str(code)) from None
