"""The study aggregate: its trust root and key registry, as signed events.

The study is created with one admin public key (the trust root). Admins register the keys of users and
services with a role, rotate and revoke them. Whether a signature counts is asked of the study *as it stood at
the event's position in the log*: the verifier replays these events in log order.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate, event

from sle_events.domain.roles import ADMIN, DEFAULT_PERMISSIONS, ROLES, event_type_name
from sle_events.signing.keys import key_id as key_id_of


class KeyProblem(ValueError):
    """A signature's key cannot vouch for the event."""


class UnknownKey(KeyProblem):
    pass


class KeyRevoked(KeyProblem):
    pass


class KeyRotatedOut(KeyProblem):
    pass


class RoleNotAllowed(KeyProblem):
    pass


class RegistryError(ValueError):
    """A registry command that makes no sense (unknown role, duplicate key, reason missing...)."""


def _raw_public_key(public_key: str) -> bytes:
    try:
        raw = base64.b64decode(public_key, validate=True)
    except ValueError:
        raise RegistryError("public key is not base64") from None
    if len(raw) != 32:
        raise RegistryError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return raw


class Study(Aggregate):
    """A trial, its trust root, its key registry and its table of who may record what."""

    @event("Created")
    def __init__(
        self,
        code: str,
        title: str,
        admin_actor: str,
        admin_public_key: str,
        occurred_at: datetime,
        permissions: dict[str, list[str]] | None = None,
    ) -> None:
        self.code = code
        self.title = title
        self.keys: dict[str, dict[str, Any]] = {}
        self._add_key(admin_actor, ADMIN, admin_public_key)
        self.permissions = {k: list(v) for k, v in (permissions or DEFAULT_PERMISSIONS).items()}

    @classmethod
    def create(cls, code: str, title: str, admin_actor: str, admin_public_key: str, occurred_at: datetime,
               permissions: dict[str, list[str]] | None = None) -> "Study":  # fmt: skip
        if not code.strip():
            raise RegistryError("a study needs a code")
        _raw_public_key(admin_public_key)
        for type_name, roles in (permissions or {}).items():
            cls._check_roles(type_name, roles)
        return cls(code, title, admin_actor, admin_public_key, occurred_at, permissions)

    # --- verbs -----------------------------------------------------------------------------------------
    def register_key(self, actor: str, role: str, public_key: str, occurred_at: datetime) -> str:
        if role not in ROLES:
            raise RegistryError(f"unknown role {role!r}; roles are {sorted(ROLES)}")
        kid = key_id_of(_raw_public_key(public_key))
        if kid in self.keys:
            raise RegistryError(f"key {kid} is already registered")
        self._key_registered(actor=actor, role=role, public_key=public_key, occurred_at=occurred_at)
        return kid

    def rotate_key(self, old_key: str, public_key: str, occurred_at: datetime) -> str:
        entry = self._active(old_key)
        kid = key_id_of(_raw_public_key(public_key))
        if kid in self.keys:
            raise RegistryError(f"key {kid} is already registered")
        self._key_rotated(old_key=entry["key"], public_key=public_key, occurred_at=occurred_at)
        return kid

    def revoke_key(self, key: str, reason: str, occurred_at: datetime) -> None:
        if not reason or not reason.strip():
            raise RegistryError("revoking a key needs a reason")
        self._active(key)
        self._key_revoked(key=key, reason=reason, occurred_at=occurred_at)

    def change_permissions(self, event_type: str, roles: list[str], occurred_at: datetime) -> None:
        self._check_roles(event_type, roles)
        self._permissions_changed(event_type=event_type, roles=sorted(roles), occurred_at=occurred_at)

    # --- facts -----------------------------------------------------------------------------------------
    @event("KeyRegistered")
    def _key_registered(self, actor: str, role: str, public_key: str, occurred_at: datetime) -> None:
        self._add_key(actor, role, public_key)

    @event("KeyRotated")
    def _key_rotated(self, old_key: str, public_key: str, occurred_at: datetime) -> None:
        old = self.keys[old_key]
        old["status"] = "rotated"
        self._add_key(old["actor"], old["role"], public_key)

    @event("KeyRevoked")
    def _key_revoked(self, key: str, reason: str, occurred_at: datetime) -> None:
        self.keys[key]["status"] = "revoked"

    @event("PermissionsChanged")
    def _permissions_changed(self, event_type: str, roles: list[str], occurred_at: datetime) -> None:
        self.permissions[event_type] = list(roles)

    # --- questions -------------------------------------------------------------------------------------
    def authorise(self, key: str, actor: str, role: str, topic: str) -> dict[str, Any]:
        """The key entry that vouches for `actor` recording `topic` as `role`, or a specific refusal."""
        entry = self.keys.get(key)
        if entry is None:
            raise UnknownKey(f"key {key} is not registered in study {self.code}")
        if entry["status"] == "revoked":
            raise KeyRevoked(f"key {key} of {entry['actor']} was revoked")
        if entry["status"] == "rotated":
            raise KeyRotatedOut(f"key {key} of {entry['actor']} was rotated out")
        if entry["actor"] != actor or entry["role"] != role:
            raise RoleNotAllowed(
                f"key {key} belongs to {entry['actor']} as {entry['role']}, not {actor} as {role}"
            )
        type_name = event_type_name(topic)
        allowed = self.permissions.get(type_name, [])
        if role not in allowed:
            raise RoleNotAllowed(f"role {role} may not record {type_name} (allowed: {allowed or 'nobody'})")
        return entry

    def public_key(self, key: str) -> bytes:
        return base64.b64decode(self.keys[key]["public_key"])

    def _add_key(self, actor: str, role: str, public_key: str) -> None:
        kid = key_id_of(_raw_public_key(public_key))
        self.keys[kid] = {"key": kid, "actor": actor, "role": role, "public_key": public_key, "status": "active"}

    def _active(self, key: str) -> dict[str, Any]:
        entry = self.keys.get(key)
        if entry is None:
            raise RegistryError(f"key {key} is not registered")
        if entry["status"] != "active":
            raise RegistryError(f"key {key} is already {entry['status']}")
        return entry

    @staticmethod
    def _check_roles(type_name: str, roles: list[str]) -> None:
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            raise RegistryError(f"unknown roles {unknown} for {type_name}")
