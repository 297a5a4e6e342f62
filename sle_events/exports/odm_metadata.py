"""The ODM 1.3.2 metadata of the trial: study events (the visit schedule), forms, item groups, items, code lists,
units, and the AdminData (users, locations, signature definitions), as the record stood at a checkpoint.

Forms come from the event registry, not from a hand-kept list: every ``Subject.*`` fact (and a product lot's
release and infusion) is a form with one repeating item group, whose items are the fact's payload fields (from
the event class's annotations) plus ``OCCURRED_AT``. A new fact type (sign-off, SDV, queries...) therefore gets
its form without a change here. Lab results are the exception that makes the file useful to a monitor: the value
of each analyte is its own item (``I.LB.CREAT``, its LOINC as ``Alias Context="LOINC"``, its UCUM unit), and
``I.LB.CREAT.STD`` the value in the canonical unit.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal
from xml.sax.saxutils import escape as _escape

from sle_events.domain.event_types import EVENT_TYPES
from sle_events.domain.labs import ANALYTES, accepted_units
from sle_events.domain.payloads import Relatedness

__all__ = [
    "ODM_NS",
    "Form",
    "Item",
    "CodeList",
    "Visit",
    "User",
    "Location",
    "SignatureDef",
    "OdmMetadata",
    "attr",
    "text",
    "lab_item_oid",
    "CHANGE_TYPES",
    "LOG",
    "UNSCHEDULED",
]

ODM_NS = "http://www.cdisc.org/ns/odm/v1.3"
LOG = "SE.LOG"  # subject-level logs (AEs, medications, deviations, disposition): a Common study event
UNSCHEDULED = "SE.UNS"
CHANGE_TYPES = frozenset({"Subject.Corrected", "Subject.Voided"})  # changes to a record, not records
LOT_TYPES = ("ProductLot.ReleaseTested", "ProductLot.Infused")  # a lot's facts, filed under its subject
_SKIP_FIELDS = frozenset({"originator_id_type", "originator_topic", "originator_id", "originator_version", "timestamp"})

_CONTROL = {i: f"\\u{i:04x}" for i in range(32) if i not in (9, 10, 13)}


_SPECIAL = re.compile(r'[&<>"\x00-\x1f]')  # most values need no escaping: the fast path skips it


def text(value: str) -> str:
    """Element text: escaped, with the control characters XML 1.0 cannot carry written as ``\\uXXXX``."""
    if not _SPECIAL.search(value):
        return value
    return _escape(value.translate(_CONTROL))


def attr(value: str) -> str:
    """A double-quoted attribute value (tabs and line ends kept as character references)."""
    if not _SPECIAL.search(value):
        return '"' + value + '"'
    return '"' + _escape(value.translate(_CONTROL), {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}) + '"'


def lab_item_oid(code: str, standard: bool = False) -> str:
    return f"I.LB.{code}.STD" if standard else f"I.LB.{code}"


# The unit of a field that carries it in its name (UCUM).
FIELD_UNITS = {
    "height_cm": "cm",
    "weight_kg": "kg",
    "temperature_c": "Cel",
    "systolic_bp": "mm[Hg]",
    "diastolic_bp": "mm[Hg]",
    "heart_rate": "/min",
    "prescribed_mg_per_m2": "mg/m2",
    "bsa_m2": "m2",
    "calculated_mg": "mg",
    "administered_mg": "mg",
    "dose_1e6_per_kg": "10*6/kg",
    "cyc_to_msc_hours": "h",
    "volume_ml": "mL",
    "treg_pct": "%",
    "cd4_per_ul": "/uL",
    "viability_pct": "%",
    "endotoxin_eu_per_kg": "[EU]/kg",
    "length_of_stay_days": "d",
}

# Code lists the annotations cannot name (fields typed `Any`, or integers with a fixed scale).
_CTCAE = ("1", "2", "3", "4", "5")
FIELD_CODELISTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "grade": ("CL.CTCAEGRADE", _CTCAE, "integer"),
    "grade_proposal": ("CL.CTCAEGRADE", _CTCAE, "integer"),
    "relatedness_cyc": ("CL.Relatedness", tuple(m.value for m in Relatedness), "text"),
    "relatedness_msc": ("CL.Relatedness", tuple(m.value for m in Relatedness), "text"),
}
_CODELIST_NAMES = {"CL.CTCAEGRADE": "CTCAE v5 grade"}


@dataclass
class CodeList:
    oid: str
    name: str
    data_type: str  # text | integer | float
    values: tuple[str, ...]


@dataclass
class Item:
    oid: str
    name: str
    data_type: str
    question: str
    unit: str | None = None  # UCUM symbol of a MeasurementUnitRef
    codelist: str | None = None
    loinc: str | None = None


@dataclass
class Form:
    """One fact type: its form, its (repeating) item group, and the items of its payload fields."""

    type_name: str  # Subject.LabResultRecorded
    oid: str  # F.LabResultRecorded
    group_oid: str  # IG.LabResultRecorded
    name: str
    items: dict[str, Item]  # payload field (or OCCURRED_AT) -> item

    def item_oid(self, field_name: str, payload: dict[str, Any]) -> str:
        """The item a field's value goes to; a lab result's value is the analyte's own item."""
        if (
            field_name in ("value", "canonical_value")
            and payload.get("code") in ANALYTES
            and self.type_name in ("Subject.LabResultRecorded", "Subject.DerivedResultRecorded")
        ):
            return lab_item_oid(payload["code"], standard=field_name == "canonical_value")
        return self.items[field_name].oid


@dataclass
class Visit:
    oid: str
    code: str
    name: str
    kind: str  # Scheduled | Unscheduled | Common
    repeating: bool = False


@dataclass
class User:
    oid: str
    actor: str
    printed_name: str | None
    roles: list[str] = field(default_factory=list)


@dataclass
class Location:
    oid: str
    site: str
    name: str
    effective: date


@dataclass
class SignatureDef:
    oid: str
    meaning: str
    legal_reason: str
    methodology: str = "Electronic"


# SignatureDefs ready for the regulated acts (investigator sign-off, SDV, lock): referenced by Signature
# elements once those facts exist.
SIGNATURE_DEFS = (
    SignatureDef(
        "SD.INVESTIGATOR-SIGNOFF",
        "Investigator's signature: I have reviewed the data of this casebook and attest that it is complete "
        "and accurate",
        "21 CFR 11.50, 11.70 and 11.100: electronic signature linked to its record (Ed25519 key of the signer)",
    ),
    SignatureDef(
        "SD.MONITOR-SDV",
        "Monitor's signature: the data were verified against the source documents",
        "ICH E6(R3) 3.11.4 source data verification; 21 CFR 11.50",
    ),
    SignatureDef(
        "SD.DATA-MANAGER-LOCK",
        "Data manager's signature: the data are locked for analysis",
        "21 CFR 11.10(e) and 11.50",
    ),
)


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return hint


def _humanise(name: str) -> str:
    words = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            words.append(" ")
        words.append(ch)
    return "".join(words).replace("_", " ").strip().capitalize()


def form_fields(cls: type) -> dict[str, Any]:
    """A fact's payload fields and their types, from its event class."""
    hints = typing.get_type_hints(cls)
    return {k: _unwrap(v) for k, v in hints.items() if k not in _SKIP_FIELDS and k != "occurred_at"}


class OdmMetadata:
    """Everything the ODM header needs; built once per export (see `build`)."""

    def __init__(
        self,
        *,
        study_oid: str,
        study_code: str,
        study_title: str,
        visits: list[Visit],
        users: dict[str, User],
        locations: dict[str, Location],
        extra_signature_defs: Iterable[SignatureDef] = (),
        extra_codelists: Iterable[CodeList] = (),
    ) -> None:
        self.study_oid = study_oid
        self.study_code = study_code
        self.study_title = study_title
        self.mdv_oid = "MDV.1"
        self.visits = visits
        self.users = users
        self.locations = locations
        self.signature_defs = [*SIGNATURE_DEFS, *extra_signature_defs]
        self.codelists: dict[str, CodeList] = {}
        self.units: dict[str, str] = {}  # UCUM symbol -> MeasurementUnit OID
        self.forms: dict[str, Form] = {}
        self.lab_items: dict[str, Item] = {}
        self._build_forms()
        for cl in extra_codelists:
            self.codelists.setdefault(cl.oid, cl)

    # --- building -------------------------------------------------------------------------------------
    def _unit(self, symbol: str) -> str:
        if symbol not in self.units:
            self.units[symbol] = f"MU.{len(self.units) + 1}"
        return symbol

    def _codelist(self, oid: str, values: tuple[str, ...], data_type: str, name: str | None = None) -> str:
        self.codelists.setdefault(oid, CodeList(oid, name or _CODELIST_NAMES.get(oid, oid[3:]), data_type, values))
        return oid

    def _item(self, short: str, name: str, hint: Any) -> Item:
        oid = f"I.{short}.{name}"
        question = _humanise(name)
        if name in FIELD_CODELISTS:
            cl, values, dt = FIELD_CODELISTS[name]
            return Item(oid, name, dt, question, codelist=self._codelist(cl, values, dt))
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            cl = self._codelist(f"CL.{hint.__name__}", tuple(str(m.value) for m in hint), "text")
            return Item(oid, name, "text", question, codelist=cl)
        if typing.get_origin(hint) is Literal:
            values = tuple(str(v) for v in typing.get_args(hint))
            cl = self._codelist(f"CL.{short}.{name}", values, "text", f"{_humanise(short)}: {name}")
            return Item(oid, name, "text", question, codelist=cl)
        data_type = "text"
        if hint is bool:
            data_type = "boolean"
        elif hint is int:
            data_type = "integer"
        elif hint is Decimal:
            data_type = "float"
        elif hint is datetime:
            data_type = "datetime"
        elif hint is date:
            data_type = "date"
        unit = self._unit(FIELD_UNITS[name]) if name in FIELD_UNITS else None
        return Item(oid, name, data_type, question, unit=unit)

    def _build_forms(self) -> None:
        names = [n for n in EVENT_TYPES if n.startswith("Subject.") and n not in CHANGE_TYPES] + list(LOT_TYPES)
        for type_name in names:
            short = type_name.split(".", 1)[1]
            items = {"OCCURRED_AT": Item(f"I.{short}.OCCURRED_AT", "OCCURRED_AT", "datetime", "When it occurred")}
            for fname, hint in form_fields(EVENT_TYPES[type_name]).items():
                items[fname] = self._item(short, fname, hint)
            self.forms[type_name] = Form(type_name, f"F.{short}", f"IG.{short}", _humanise(short), items)
        for code, analyte in ANALYTES.items():
            unit = self._unit(analyte.ucum_unit)
            for other in accepted_units(code):
                self._unit(other)
            self.lab_items[lab_item_oid(code)] = Item(
                lab_item_oid(code), f"{code}", "float", f"{analyte.name} (as reported)", loinc=analyte.loinc
            )
            self.lab_items[lab_item_oid(code, True)] = Item(
                lab_item_oid(code, True), f"{code}.STD", "float", f"{analyte.name} ({unit})", unit=unit,
                loinc=analyte.loinc,
            )  # fmt: skip
        for fname in ("unit", "canonical_unit"):  # lab units as a code list of UCUM symbols
            lab = self.forms["Subject.LabResultRecorded"].items[fname]
            lab.codelist = self._codelist("CL.UCUM", tuple(self.units), "text", "UCUM units")

    # --- questions ------------------------------------------------------------------------------------
    def unit_oid(self, symbol: str | None) -> str | None:
        return self.units.get(symbol) if symbol else None

    def defined_oids(self) -> dict[str, set[str]]:
        """Every OID the header defines, by kind (for the cross-reference check)."""
        items = {i.oid for f in self.forms.values() for i in f.items.values()} | set(self.lab_items)
        return {
            "StudyEventOID": {v.oid for v in self.visits},
            "FormOID": {f.oid for f in self.forms.values()},
            "ItemGroupOID": {f.group_oid for f in self.forms.values()},
            "ItemOID": items,
            "UserOID": {u.oid for u in self.users.values()},
            "LocationOID": {loc.oid for loc in self.locations.values()},
            "SignatureOID": {s.oid for s in self.signature_defs},
            "MeasurementUnitOID": set(self.units.values()),
            "CodeListOID": set(self.codelists),
        }

    # --- writing --------------------------------------------------------------------------------------
    def study_xml(self) -> Iterator[str]:
        yield f"<Study OID={attr(self.study_oid)}>\n<GlobalVariables>"
        yield f"<StudyName>{text(self.study_code)}</StudyName>"
        yield f"<StudyDescription>{text(self.study_title)}</StudyDescription>"
        yield f"<ProtocolName>{text(self.study_code)}</ProtocolName></GlobalVariables>\n<BasicDefinitions>\n"
        for symbol, oid in self.units.items():
            yield (
                f'<MeasurementUnit OID="{oid}" Name={attr(symbol)}><Symbol><TranslatedText xml:lang="en">'
                f'{text(symbol)}</TranslatedText></Symbol><Alias Context="UCUM" Name={attr(symbol)}/>'
                "</MeasurementUnit>\n"
            )
        yield (
            f'</BasicDefinitions>\n<MetaDataVersion OID="{self.mdv_oid}" Name="AlloMSC-SLE metadata" '
            'Description="Forms generated from the signed event types of the study record">\n<Protocol>\n'
        )
        for n, v in enumerate(self.visits, 1):
            mandatory = "Yes" if v.kind == "Scheduled" else "No"
            yield f'<StudyEventRef StudyEventOID={attr(v.oid)} OrderNumber="{n}" Mandatory="{mandatory}"/>\n'
        yield "</Protocol>\n"
        form_refs = "".join(
            f'<FormRef FormOID={attr(f.oid)} OrderNumber="{n}" Mandatory="No"/>'
            for n, f in enumerate(self.forms.values(), 1)
        )
        for v in self.visits:
            yield (
                f"<StudyEventDef OID={attr(v.oid)} Name={attr(v.name)} "
                f'Repeating="{"Yes" if v.repeating else "No"}" Type="{v.kind}">{form_refs}'
                f'<Alias Context="VISIT" Name={attr(v.code)}/></StudyEventDef>\n'
            )
        for f in self.forms.values():
            yield (
                f'<FormDef OID={attr(f.oid)} Name={attr(f.name)} Repeating="No">'
                f'<ItemGroupRef ItemGroupOID={attr(f.group_oid)} Mandatory="No"/>'
                f'<Alias Context="SLE-EVENT" Name={attr(f.type_name)}/></FormDef>\n'
            )
        for f in self.forms.values():
            oids = [i.oid for i in f.items.values()]
            if f.type_name in ("Subject.LabResultRecorded", "Subject.DerivedResultRecorded"):
                oids += list(self.lab_items)
            refs = "".join(
                f'<ItemRef ItemOID={attr(oid)} OrderNumber="{n}" Mandatory="No"/>' for n, oid in enumerate(oids, 1)
            )
            yield (
                f'<ItemGroupDef OID={attr(f.group_oid)} Name={attr(f.name)} Repeating="Yes">{refs}'
                f'<Alias Context="SLE-EVENT" Name={attr(f.type_name)}/></ItemGroupDef>\n'
            )
        for item in [*(i for f in self.forms.values() for i in f.items.values()), *self.lab_items.values()]:
            yield self._item_def(item)
        for cl in self.codelists.values():
            entries = "".join(
                f'<CodeListItem CodedValue={attr(v)}><Decode><TranslatedText xml:lang="en">{text(v)}'
                "</TranslatedText></Decode></CodeListItem>"
                for v in cl.values
            )
            yield (
                f"<CodeList OID={attr(cl.oid)} Name={attr(cl.name)} DataType={attr(cl.data_type)}>{entries}"
                "</CodeList>\n"
            )
        yield "</MetaDataVersion>\n</Study>\n"

    def _item_def(self, item: Item) -> str:
        parts = [
            f"<ItemDef OID={attr(item.oid)} Name={attr(item.name)} DataType={attr(item.data_type)}>",
            f'<Question><TranslatedText xml:lang="en">{text(item.question)}</TranslatedText></Question>',
        ]
        if item.unit:
            parts.append(f'<MeasurementUnitRef MeasurementUnitOID="{self.units[item.unit]}"/>')
        if item.codelist:
            parts.append(f"<CodeListRef CodeListOID={attr(item.codelist)}/>")
        if item.loinc:
            parts.append(f'<Alias Context="LOINC" Name={attr(item.loinc)}/>')
        parts.append("</ItemDef>\n")
        return "".join(parts)

    def admin_xml(self) -> Iterator[str]:
        yield f"<AdminData StudyOID={attr(self.study_oid)}>\n"
        for u in self.users.values():
            kind = (
                "Investigator"
                if "investigator" in u.roles
                else "Lab"
                if "lab" in u.roles
                else "Sponsor"
                if "sponsor" in u.roles
                else "Other"
            )
            shown = f"{u.printed_name or u.actor} ({', '.join(u.roles)})"
            full = f"<FullName>{text(u.printed_name)}</FullName>" if u.printed_name else ""
            yield (
                f'<User OID={attr(u.oid)} UserType="{kind}"><LoginName>{text(u.actor)}</LoginName>'
                f"<DisplayName>{text(shown)}</DisplayName>{full}</User>\n"
            )
        for loc in self.locations.values():
            yield (
                f'<Location OID={attr(loc.oid)} Name={attr(loc.name)} LocationType="Site">'
                f'<MetaDataVersionRef StudyOID={attr(self.study_oid)} MetaDataVersionOID="{self.mdv_oid}" '
                f'EffectiveDate="{loc.effective.isoformat()}"/></Location>\n'
            )
        for sd in self.signature_defs:
            yield (
                f'<SignatureDef OID={attr(sd.oid)} Methodology="{sd.methodology}"><Meaning>{text(sd.meaning)}'
                f"</Meaning><LegalReason>{text(sd.legal_reason)}</LegalReason></SignatureDef>\n"
            )
        yield "</AdminData>\n"


def value_text(value: Any) -> str:
    """A payload value as ItemData text: strings as they are, booleans true/false, structures as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
