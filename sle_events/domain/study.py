"""The study aggregate: its trust root and key registry, and its configuration, as signed events.

The study is created with one admin public key (the trust root). Admins register the keys of users and
services with a role, rotate and revoke them. Whether a signature counts is asked of the study *as it stood at
the event's position in the log*: the verifier replays these events in log order.

The data manager records the study's configuration as versioned events: sites, approved ICF versions, the
visit schedule and the settings (PROTOCOL §2, §9). :attr:`Study.config` is the whole as the verbs read it.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import event

from sle_events.domain import clock, formulas
from sle_events.domain.base import TrialAggregate
from sle_events.domain.errors import InvalidChoice, MissingValue, ReasonRequired, UnknownSite
from sle_events.domain.roles import ADMIN, DEFAULT_PERMISSIONS, ROLES
from sle_events.domain.settings import DEFAULT_SETTINGS, StudySettings
from sle_events.domain.study_config import IcfVersion, Site, StudyConfig, VisitKind, VisitSchedule
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


def _printed_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise RegistryError("a printed name, when given, is the holder's name (not blank)")
    return " ".join(name.split())


class Study(TrialAggregate):
    """A trial, its trust root, its key registry and its table of who may record what."""

    class Created(TrialAggregate.Created):
        """Schema 2 adds the founding admin's printed name (None for studies created before)."""

        class_version = 2
        code: str
        title: str
        admin_actor: str
        admin_public_key: str
        occurred_at: datetime
        permissions: dict[str, list[str]] | None
        admin_printed_name: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["admin_printed_name"] = None  # created before printed names were recorded

    @event(Created)
    def __init__(
        self,
        code: str,
        title: str,
        admin_actor: str,
        admin_public_key: str,
        occurred_at: datetime,
        permissions: dict[str, list[str]] | None = None,
        admin_printed_name: str | None = None,
    ) -> None:
        self.code = code
        self.title = title
        self.keys: dict[str, dict[str, Any]] = {}
        self._add_key(admin_actor, ADMIN, admin_public_key, admin_printed_name)
        self.permissions = {k: list(v) for k, v in (permissions or DEFAULT_PERMISSIONS).items()}
        self.sites: dict[str, Site] = {}
        self.icf_versions: list[IcfVersion] = []
        self.schedule: VisitSchedule | None = None
        self.settings: StudySettings = DEFAULT_SETTINGS
        self._config: StudyConfig | None = None

    @classmethod
    def create(
        cls,
        code: str,
        title: str,
        admin_actor: str,
        admin_public_key: str,
        occurred_at: datetime,
        permissions: dict[str, list[str]] | None = None,
        *,
        study_id: UUID | None = None,
        admin_printed_name: str | None = None,
    ) -> Study:
        """A new study; ``study_id`` fixes its stream id (a replayable demo), else a random one. The founding
        admin's printed name (21 CFR 11.50) is shown beside what their key signs."""
        if not code.strip():
            raise RegistryError("a study needs a code")
        _raw_public_key(admin_public_key)
        admin_printed_name = _printed_name(admin_printed_name)
        for type_name, roles in (permissions or {}).items():
            cls._check_roles(type_name, roles)
        if study_id is not None:
            return cls._create(
                cls.Created,
                id=study_id,
                code=code,
                title=title,
                admin_actor=admin_actor,
                admin_public_key=admin_public_key,
                occurred_at=occurred_at,
                permissions=permissions,
                admin_printed_name=admin_printed_name,
            )
        return cls(code, title, admin_actor, admin_public_key, occurred_at, permissions, admin_printed_name)

    # --- verbs -----------------------------------------------------------------------------------------
    def register_key(
        self, actor: str, role: str, public_key: str, occurred_at: datetime, printed_name: str | None = None
    ) -> str:
        """Register the public key of a person (with their printed name, 21 CFR 11.50: the audit trail shows it)
        or of a service (no printed name) in a role. Returns the key's id."""
        if role not in ROLES:
            raise RegistryError(f"unknown role {role!r}; roles are {sorted(ROLES)}")
        printed_name = _printed_name(printed_name)
        kid = key_id_of(_raw_public_key(public_key))
        if kid in self.keys:
            raise RegistryError(f"key {kid} is already registered")
        self._key_registered(
            actor=actor, role=role, public_key=public_key, occurred_at=occurred_at, printed_name=printed_name
        )
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
        entry = self._active(key)
        if entry["role"] == ADMIN and not any(
            e["role"] == ADMIN and e["status"] == "active" and e["key"] != key for e in self.keys.values()
        ):
            # Nobody could register, rotate or revoke a key after this: the study would be frozen for good.
            raise RegistryError(
                f"key {key} is the study's last active admin key; register another admin key first, or rotate "
                "this one (the admin keeps signing with the new key)"
            )
        self._key_revoked(key=key, reason=reason, occurred_at=occurred_at)

    def approve_new_study(self, code: str, admin_actor: str, admin_public_key: str, occurred_at: datetime) -> str:
        """Let another study be created in the same database, with this trust-root key (its admin's).

        A database's first study needs no one's leave; every later one does, as a signed and logged decision of
        an existing study's admin, so nobody with write access can mint a trust root beside the real one. The
        approval is used by the first ``Study.Created`` with this code and admin key. Returns that key's id."""
        if not isinstance(code, str) or not code.strip():
            raise RegistryError("the new study needs a code")
        if not isinstance(admin_actor, str) or not admin_actor.strip():
            raise RegistryError("the new study needs its admin's user id")
        kid = key_id_of(_raw_public_key(admin_public_key))
        self._new_study_approved(code=code, admin_actor=admin_actor, admin_key=kid, occurred_at=occurred_at)
        return kid

    def change_permissions(self, event_type: str, roles: list[str], occurred_at: datetime) -> None:
        self._check_roles(event_type, roles)
        self._permissions_changed(event_type=event_type, roles=sorted(roles), occurred_at=occurred_at)

    # --- facts -----------------------------------------------------------------------------------------
    class KeyRegistered(TrialAggregate.Event):
        """Schema 2 adds the holder's printed name (None for a service, and for keys registered before)."""

        class_version = 2
        actor: str
        role: str
        public_key: str
        occurred_at: datetime
        printed_name: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["printed_name"] = None  # signed before printed names were recorded

    @event(KeyRegistered)
    def _key_registered(
        self, actor: str, role: str, public_key: str, occurred_at: datetime, printed_name: str | None
    ) -> None:
        self._add_key(actor, role, public_key, printed_name)

    @event("KeyRotated")
    def _key_rotated(self, old_key: str, public_key: str, occurred_at: datetime) -> None:
        old = self.keys[old_key]
        old["status"] = "rotated"
        self._add_key(old["actor"], old["role"], public_key, old.get("printed_name"))  # the same holder

    @event("KeyRevoked")
    def _key_revoked(self, key: str, reason: str, occurred_at: datetime) -> None:
        self.keys[key]["status"] = "revoked"

    @event("NewStudyApproved")
    def _new_study_approved(self, code: str, admin_actor: str, admin_key: str, occurred_at: datetime) -> None:
        pass  # the store and the verifier read approvals from the log; the study's own state does not change

    @event("PermissionsChanged")
    def _permissions_changed(self, event_type: str, roles: list[str], occurred_at: datetime) -> None:
        self.permissions[event_type] = list(roles)

    # --- configuration (data manager) ------------------------------------------------------------------
    def add_site(self, site_id: str, name: str, timezone: str, occurred_at: datetime) -> None:
        """A site that may screen subjects (T1), with its IANA time zone."""
        self._config_time(occurred_at)
        for field, value in (("site_id", site_id), ("name", name)):
            if not isinstance(value, str) or not value.strip():
                raise MissingValue(field, "adding a site")
        if site_id in self.sites:
            raise InvalidChoice("site_id", site_id, ["a new site id"])
        Site(site_id=site_id, name=name, timezone=timezone)  # validates the zone
        self._site_added(site_id=site_id, name=name, timezone=timezone, occurred_at=occurred_at)

    def close_site(self, site_id: str, reason: str, occurred_at: datetime) -> None:
        self._config_time(occurred_at)
        if site_id not in self.sites:
            raise UnknownSite(site_id, self.sites)
        if not isinstance(reason, str) or not reason.strip():
            raise ReasonRequired("closing a site")
        self._site_closed(site_id=site_id, reason=reason.strip(), occurred_at=occurred_at)

    def approve_icf_version(self, version: str, effective_from: datetime, occurred_at: datetime) -> None:
        """An approved ICF version; from ``effective_from`` on, consent is taken on it and active subjects
        re-consent before their next procedure (T2, R1)."""
        self._config_time(occurred_at)
        if not isinstance(version, str) or not version.strip():
            raise MissingValue("an ICF version", "ICF approval")
        if any(i.version == version for i in self.icf_versions):
            raise InvalidChoice("icf version", version, ["a version not yet approved"])
        IcfVersion(version=version, effective_from=effective_from)
        self._icf_version_approved(version=version, effective_from=effective_from, occurred_at=occurred_at)

    def define_visit_schedule(self, schedule: VisitSchedule, occurred_at: datetime) -> None:
        """A new version of the visit schedule (codes, VISITNUM, target days, windows)."""
        self._config_time(occurred_at)
        codes = [v.code for v in schedule.visits]
        if len(set(codes)) != len(codes):
            raise InvalidChoice("visit codes", codes, ["unique codes"])
        for required in ("SCR", "ET"):
            if required not in codes:
                raise MissingValue(f"the {required} visit", "visit schedule")
        follow = [v for v in schedule.visits if v.kind == VisitKind.FOLLOW_UP]
        if not follow or any(v.month is None or v.target_day is None or v.window_days is None for v in follow):
            raise MissingValue("follow-up visits with month, target day and window", "visit schedule")
        self._visit_schedule_defined(schedule=schedule, occurred_at=occurred_at)

    def adopt_settings(self, settings: StudySettings, occurred_at: datetime) -> None:
        """A new version of the study settings (windows, doses, bounds...; PROTOCOL §9)."""
        self._config_time(occurred_at)
        if settings.version == self.settings.version:
            raise InvalidChoice("settings version", settings.version, ["a new version label"])
        self._settings_adopted(settings=settings, occurred_at=occurred_at)

    def _config_time(self, occurred_at: datetime) -> None:
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=self.settings)

    @event("SiteAdded")
    def _site_added(self, site_id: str, name: str, timezone: str, occurred_at: datetime) -> None:
        self.sites[site_id] = Site(site_id=site_id, name=name, timezone=timezone)
        self._config = None

    @event("SiteClosed")
    def _site_closed(self, site_id: str, reason: str, occurred_at: datetime) -> None:
        self.sites[site_id] = self.sites[site_id].model_copy(update={"active": False})
        self._config = None

    @event("IcfVersionApproved")
    def _icf_version_approved(self, version: str, effective_from: datetime, occurred_at: datetime) -> None:
        self.icf_versions.append(IcfVersion(version=version, effective_from=effective_from))
        self._config = None

    @event("VisitScheduleDefined")
    def _visit_schedule_defined(self, schedule: VisitSchedule, occurred_at: datetime) -> None:
        self.schedule = schedule
        self._config = None

    @event("SettingsAdopted")
    def _settings_adopted(self, settings: StudySettings, occurred_at: datetime) -> None:
        self.settings = settings
        self._config = None

    @property
    def config(self) -> StudyConfig:
        """The study's configuration as it stands (cached until the next configuration event)."""
        config: StudyConfig | None = getattr(self, "_config", None)
        if config is None:
            config = self._config = StudyConfig.build(
                settings=getattr(self, "settings", DEFAULT_SETTINGS),
                sites=getattr(self, "sites", {}).values(),
                icf_versions=getattr(self, "icf_versions", ()),
                schedule=getattr(self, "schedule", None),
            )
        return config

    # --- questions -------------------------------------------------------------------------------------
    def authorise(self, key: str, actor: str, role: str, type_name: str) -> dict[str, Any]:
        """The key entry that vouches for `actor` recording the event type `type_name` (its stable name,
        `Subject.LabResultRecorded`) as `role`, or a specific refusal."""
        entry = self.keys.get(key)
        if entry is None:
            raise UnknownKey(f"key {key} is not registered in study {self.code}")
        if entry["status"] == "revoked":
            raise KeyRevoked(f"key {key} of {entry['actor']} was revoked")
        if entry["status"] == "rotated":
            raise KeyRotatedOut(f"key {key} of {entry['actor']} was rotated out")
        if entry["actor"] != actor or entry["role"] != role:
            raise RoleNotAllowed(f"key {key} belongs to {entry['actor']} as {entry['role']}, not {actor} as {role}")
        # A fact newer than this study's signed table falls back to the software's default roles for it.
        allowed = self.permissions.get(type_name, DEFAULT_PERMISSIONS.get(type_name, []))
        if role not in allowed:
            raise RoleNotAllowed(f"role {role} may not record {type_name} (allowed: {allowed or 'nobody'})")
        return entry

    def public_key(self, key: str) -> bytes:
        return base64.b64decode(self.keys[key]["public_key"])

    def _add_key(self, actor: str, role: str, public_key: str, printed_name: str | None = None) -> None:
        kid = key_id_of(_raw_public_key(public_key))
        self.keys[kid] = {
            "key": kid,
            "actor": actor,
            "role": role,
            "public_key": public_key,
            "status": "active",
            "printed_name": printed_name,
        }

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
