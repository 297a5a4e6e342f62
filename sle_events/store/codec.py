"""Domain events <-> envelope payloads: the one codec between the domain and the signed record.

A domain event's attributes become the envelope's JSON payload: decimals as strings, times as ISO 8601 with
offset, UUIDs as strings, enums by value, pydantic models by their JSON form. Floats are refused. Reading back,
the event class's type hints say how each field is rebuilt, so aggregates get the same types they produced.
`originator_id`, `originator_version` and `timestamp` are not payload: they are the envelope's stream,
version and recorded_at, inside the signature.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from functools import cache
from typing import Any
from uuid import UUID

from eventsourcing.utils import get_topic
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from sle_events.domain.event_types import LEGACY_TOPICS, UnknownEventName, event_class, name_of
from sle_events.picklable import Picklable
from sle_events.signing.canonical import FloatNotAllowed, NotCanonicalisable
from sle_events.signing.envelope import MalformedEnvelope, SealedEvent, format_time, parse_time

# Kept in the envelope (stream, version, recorded_at, occurred_at), or never signed: `originator_topic` is the
# library's Python path of the aggregate class, which a signed record must not depend on (events signed before
# stable names carry it; it is checked and then ignored, never resolved).
OUTSIDE_PAYLOAD = ("originator_id", "originator_version", "timestamp", "occurred_at", "originator_topic")


_json_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def to_json_value(value: Any, path: str = "$") -> Any:
    """Encode one attribute value for a signed payload."""
    if value is None or (isinstance(value, (str, bool, int)) and not isinstance(value, Enum)):
        return value
    if isinstance(value, float):
        raise FloatNotAllowed(path, value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise NotCanonicalisable(path, f"{value} is not a finite decimal")
        return format(value, "f")
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Enum):
        return to_json_value(value.value, path)
    if isinstance(value, BaseModel):
        return to_json_value(value.model_dump(mode="python"), path)
    if isinstance(value, dict):
        return {str(k): to_json_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [to_json_value(v, f"{path}[{i}]") for i, v in enumerate(items)]
    raise NotCanonicalisable(path, f"{type(value).__name__} cannot go into a signed payload")


def _decoder_for(hint: Any) -> Callable[[Any], Any] | None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        member = _decoder_for(members[0]) if len(members) == 1 else None
        return (lambda v: None if v is None else member(v)) if member else None
    if origin in (tuple, list):
        items = typing.get_args(hint)
        item = _decoder_for(items[0]) if items else None
        if origin is tuple:
            return (lambda v: tuple(item(x) for x in v)) if item else tuple
        return (lambda v: [item(x) for x in v]) if item else None
    if hint is Decimal:
        return Decimal
    if hint is datetime:
        return lambda v: parse_time("field", v)
    if hint is date:
        return date.fromisoformat
    if hint is UUID:
        return UUID
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint.model_validate
    return None


@cache
def _decoders(cls: type) -> dict[str, Callable[[Any], Any]]:
    hints = typing.get_type_hints(cls)
    found = {}
    for name, hint in hints.items():
        decoder = _decoder_for(hint)
        if decoder is not None:
            found[name] = decoder
    return found


@cache
def _has_occurred_at(cls: type) -> bool:
    return "occurred_at" in typing.get_type_hints(cls)


def event_payload(domain_event: Any) -> dict[str, Any]:
    state = vars(domain_event)
    return {k: to_json_value(v, f"$.{k}") for k, v in state.items() if k not in OUTSIDE_PAYLOAD}


def envelope_for(domain_event: Any, *, study: UUID, prev: str, reason: str | None = None) -> dict[str, Any]:
    """The unsigned envelope of a domain event (actor, role and key are filled in by the signer).

    An event with a `reason` field (a correction, a withdrawal...) carries it into the envelope too."""
    cls = type(domain_event)
    reason = reason or getattr(domain_event, "reason", None)
    occurred_at = getattr(domain_event, "occurred_at", None) or domain_event.timestamp
    return {
        "study": str(study),
        "stream": str(domain_event.originator_id),
        "version": domain_event.originator_version,
        "type": name_of(cls),
        "schema": getattr(cls, "class_version", 1),
        "payload": event_payload(domain_event),
        "occurred_at": format_time(occurred_at),
        "recorded_at": format_time(domain_event.timestamp),
        "actor": "",
        "role": "",
        "key": "",
        "reason": reason,
        "prev": prev,
    }


class PayloadSchemaError(Picklable, MalformedEnvelope):
    """A signed payload that its event type's schema refuses, or that the domain would not have written so."""

    def __init__(self, type_name: str, field: str, message: str):
        self.field = field
        super().__init__(f"{type_name} payload field {field}: {message}")


def _payload_of(cls: type, env: dict[str, Any]) -> dict[str, Any]:
    """The payload upcast to the class's schema version."""
    state: dict[str, Any] = dict(env["payload"])
    class_version = getattr(cls, "class_version", 1)
    from_version = env["schema"]
    if from_version > class_version:
        raise PayloadSchemaError(
            env["type"], "$", f"schema {from_version} is newer than this software's {class_version}"
        )
    while from_version < class_version:
        getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
        from_version += 1
    return state


@cache
def _aggregate_topic(cls: type) -> str | None:
    """For a created event, its aggregate class's topic, from the local class (never from stored bytes)."""
    if "originator_topic" not in typing.get_type_hints(cls):
        return None
    return get_topic(cls).rsplit(".", 1)[0]


@cache
def _payload_schema(cls: type) -> type[BaseModel]:
    fields = {
        name: (hint, ...)
        for name, hint in typing.get_type_hints(cls).items()
        if name not in OUTSIDE_PAYLOAD and name != "originator_id_type"
    }
    return create_model(  # type: ignore[call-overload]  # fields built at run time: no overload takes **dict
        f"{cls.__qualname__}Payload", __config__=ConfigDict(extra="forbid", strict=True), **fields
    )


def check_payload(env: dict[str, Any]) -> None:
    """Refuse a payload that its type's schema refuses, or whose values the codec would have written otherwise
    (``"1e3"`` for 1000, a time without its offset...): every stored payload then loads exactly as the verb that
    built it produced it. Raises `PayloadSchemaError` naming the field, or `MalformedEnvelope` for an unknown type."""
    try:
        cls = event_class(env["type"])
    except UnknownEventName as e:
        raise MalformedEnvelope(str(e)) from None
    payload = _payload_of(cls, env)
    # Signed before stable names: the aggregate's Python path as the old code wrote it, ignored on reading.
    if (
        _aggregate_topic(cls) is not None
        and env["type"] in LEGACY_TOPICS
        and payload.pop("originator_topic", None) != env["type"].rsplit(".", 1)[0]
    ):
        raise PayloadSchemaError(env["type"], "originator_topic", "is not the aggregate this event type creates")
    schema = _payload_schema(cls)
    try:
        values = schema.model_validate_json(_json_dumps(payload), strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "$"
        got = "" if err["type"] == "missing" else f" (got {_short(err.get('input'))})"
        raise PayloadSchemaError(env["type"], field, f"{err['msg']}{got}") from None
    # Strings, integers, booleans and plain containers of them validate as themselves; values the codec converts
    # (decimals, times, UUIDs, codes, records) must come back out exactly as they went in.
    for name in _decoders(cls).keys() & payload.keys():
        try:
            again = to_json_value(getattr(values, name), f"$.{name}")
        except (MalformedEnvelope, NotCanonicalisable) as e:
            raise PayloadSchemaError(env["type"], name, str(e)) from None
        if again != payload[name]:
            raise PayloadSchemaError(
                env["type"], name, f"{_short(payload[name])} is not written as the domain writes it ({_short(again)})"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def domain_event_from(sealed: SealedEvent) -> Any:
    """Rebuild the domain event, upcasting older schema versions the way `eventsourcing` does."""
    env = sealed.envelope
    try:
        cls = event_class(env["type"])
    except UnknownEventName as e:
        raise MalformedEnvelope(str(e)) from None
    state = _payload_of(cls, env)
    aggregate_topic = _aggregate_topic(cls)
    if aggregate_topic is not None:
        state["originator_topic"] = aggregate_topic
    for name, decode in _decoders(cls).items():
        if name in state and state[name] is not None:
            state[name] = decode(state[name])
    state["originator_id"] = UUID(env["stream"])
    state["originator_version"] = env["version"]
    state["timestamp"] = parse_time("recorded_at", env["recorded_at"])
    if _has_occurred_at(cls):
        state["occurred_at"] = parse_time("occurred_at", env["occurred_at"])
    event: Any = object.__new__(cls)
    object.__setattr__(event, "__dict__", state)
    return event
