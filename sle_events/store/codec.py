"""Domain events <-> envelope payloads: the one codec between the domain and the signed record.

A domain event's attributes become the envelope's JSON payload: decimals as strings, times as ISO 8601 with
offset, UUIDs as strings, enums by value, pydantic models by their JSON form. Floats are refused. Reading back,
the event class's type hints say how each field is rebuilt, so aggregates get the same types they produced.
`originator_id`, `originator_version` and `timestamp` are not payload: they are the envelope's stream,
version and recorded_at, inside the signature.
"""

from __future__ import annotations

import types
import typing
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from typing import Any, Callable
from uuid import UUID

from pydantic import BaseModel

from sle_events.domain.event_types import UnknownEventName, event_class, name_of

from sle_events.signing.canonical import FloatNotAllowed, NotCanonicalisable
from sle_events.signing.envelope import MalformedEnvelope, SealedEvent, format_time, parse_time

OUTSIDE_PAYLOAD = ("originator_id", "originator_version", "timestamp", "occurred_at")


def to_json_value(value: Any, path: str = "$") -> Any:
    """Encode one attribute value for a signed payload."""
    if value is None or isinstance(value, (str, bool, int)) and not isinstance(value, Enum):
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
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _decoder_for(args[0]) if len(args) == 1 else None
        return (lambda v: None if v is None else inner(v)) if inner else None
    if origin in (tuple, list):
        args = typing.get_args(hint)
        inner = _decoder_for(args[0]) if args else None
        if origin is tuple:
            return (lambda v: tuple(inner(x) for x in v)) if inner else tuple
        return (lambda v: [inner(x) for x in v]) if inner else None
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


@lru_cache(maxsize=None)
def _decoders(cls: type) -> dict[str, Callable[[Any], Any]]:
    hints = typing.get_type_hints(cls)
    found = {}
    for name, hint in hints.items():
        decoder = _decoder_for(hint)
        if decoder is not None:
            found[name] = decoder
    return found


@lru_cache(maxsize=None)
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


def domain_event_from(sealed: SealedEvent) -> Any:
    """Rebuild the domain event, upcasting older schema versions the way `eventsourcing` does."""
    env = sealed.envelope
    try:
        cls = event_class(env["type"])
    except UnknownEventName as e:
        raise MalformedEnvelope(str(e)) from None
    state: dict[str, Any] = dict(env["payload"])
    class_version = getattr(cls, "class_version", 1)
    from_version = env["schema"]
    while from_version < class_version:
        getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
        from_version += 1
    for name, decode in _decoders(cls).items():
        if name in state and state[name] is not None:
            state[name] = decode(state[name])
    state["originator_id"] = UUID(env["stream"])
    state["originator_version"] = env["version"]
    state["timestamp"] = parse_time("recorded_at", env["recorded_at"])
    if _has_occurred_at(cls):
        state["occurred_at"] = parse_time("occurred_at", env["occurred_at"])
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", state)
    return event
