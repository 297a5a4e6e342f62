"""The study's configuration as the verbs read it: sites, ICF versions, the visit schedule and settings.

The :class:`~sle_events.domain.study.Study` aggregate records each part as a versioned configuration event
and exposes the current whole as :class:`StudyConfig`. Verbs of the subject and the product lot take a
``config`` argument, so every rule reads the study's own numbers (never a hard-coded default).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from sle_events.domain.errors import InvalidChoice, NaiveTimestamp, UnknownSite, UnknownVisit
from sle_events.domain.lifecycle import Epoch
from sle_events.domain.quantities import DecimalValue
from sle_events.domain.settings import DEFAULT_SETTINGS, StudySettings

__all__ = [
    "Site",
    "IcfVersion",
    "VisitKind",
    "VisitDefinition",
    "VisitSchedule",
    "StudyConfig",
    "DEFAULT_CONFIG",
    "default_schedule",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Site(_Frozen):
    site_id: str
    name: str
    timezone: str  # IANA zone, e.g. Asia/Shanghai
    active: bool = True

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidChoice("timezone", v, ["an IANA time zone such as Asia/Shanghai"]) from None
        return v


class IcfVersion(_Frozen):
    """An approved informed-consent form version and the instant it takes effect."""

    version: str
    effective_from: datetime

    @field_validator("effective_from")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise NaiveTimestamp("effective_from", v)
        return v


class VisitKind:
    SCREENING = "screening"
    TREATMENT = "treatment"
    FOLLOW_UP = "follow_up"
    EARLY_TERMINATION = "early_termination"
    ALL = (SCREENING, TREATMENT, FOLLOW_UP, EARLY_TERMINATION)


class VisitDefinition(_Frozen):
    """One visit of the schedule (PROTOCOL §6). Follow-up visits have a month, a target day after TX
    (day 0) and an inclusive window of ± ``window_days``."""

    code: str
    visitnum: DecimalValue
    kind: str
    epoch: Epoch
    month: int | None = None
    target_day: int | None = None
    window_days: int | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in VisitKind.ALL:
            raise InvalidChoice("kind", v, VisitKind.ALL)
        return v


class VisitSchedule(_Frozen):
    version: str
    visits: tuple[VisitDefinition, ...]

    def get(self, code: str) -> VisitDefinition:
        for v in self.visits:
            if v.code == code:
                return v
        raise UnknownVisit(code, [v.code for v in self.visits])

    @property
    def follow_up(self) -> tuple[VisitDefinition, ...]:
        """Scheduled follow-up visits (M1…M48) in month order."""
        return tuple(sorted((v for v in self.visits if v.kind == VisitKind.FOLLOW_UP), key=lambda v: v.month or 0))

    @property
    def last_scheduled(self) -> VisitDefinition:
        return self.follow_up[-1]


def default_schedule(settings: StudySettings = DEFAULT_SETTINGS) -> VisitSchedule:
    """The PROTOCOL §6 schedule built from the settings' schedule numbers."""
    from sle_events.domain.formulas import scheduled_follow_up_months

    d = Decimal
    visits = [
        VisitDefinition(code="SCR", visitnum=d(10), kind=VisitKind.SCREENING, epoch=Epoch.SCREENING),
        VisitDefinition(code="BASE", visitnum=d(20), kind=VisitKind.TREATMENT, epoch=Epoch.TREATMENT),
        VisitDefinition(code="CYC", visitnum=d(30), kind=VisitKind.TREATMENT, epoch=Epoch.TREATMENT),
        VisitDefinition(code="TX", visitnum=d(40), kind=VisitKind.TREATMENT, epoch=Epoch.TREATMENT),
        VisitDefinition(code="DIS", visitnum=d(50), kind=VisitKind.TREATMENT, epoch=Epoch.TREATMENT),
    ]
    for n in scheduled_follow_up_months(settings=settings):
        long_term = n > settings.monthly_visits_through_month
        visits.append(
            VisitDefinition(
                code=f"M{n}",
                visitnum=d(100 + n),
                kind=VisitKind.FOLLOW_UP,
                epoch=Epoch.LONG_TERM_FOLLOW_UP if long_term else Epoch.FOLLOW_UP,
                month=n,
                target_day=settings.days_per_month * n,
                window_days=settings.long_term_window_days if long_term else settings.monthly_window_days,
            )
        )
    visits.append(
        VisitDefinition(
            code="ET",
            visitnum=d(900),
            kind=VisitKind.EARLY_TERMINATION,
            epoch=Epoch.FOLLOW_UP,
            window_days=settings.early_termination_max_days_after_withdrawal,
        )
    )
    return VisitSchedule(version=f"schedule-from-{settings.version}", visits=tuple(visits))


class StudyConfig(_Frozen):
    """Everything a verb needs to know about the study, as it stands."""

    settings: StudySettings = DEFAULT_SETTINGS
    sites: dict[str, Site] = Field(default_factory=dict)
    icf_versions: tuple[IcfVersion, ...] = ()
    schedule: VisitSchedule | None = None  # None: the schedule implied by the settings
    _default_schedule: VisitSchedule | None = PrivateAttr(default=None)

    @classmethod
    def build(
        cls,
        *,
        settings: StudySettings = DEFAULT_SETTINGS,
        sites: Iterable[Site] = (),
        icf_versions: Iterable[IcfVersion] = (),
        schedule: VisitSchedule | None = None,
    ) -> StudyConfig:
        return cls(
            settings=settings, sites={s.site_id: s for s in sites}, icf_versions=tuple(icf_versions), schedule=schedule
        )

    @property
    def visits(self) -> VisitSchedule:
        if self.schedule is not None:
            return self.schedule
        if self._default_schedule is None:
            self._default_schedule = default_schedule(self.settings)
        return self._default_schedule

    def site(self, site_id: str) -> Site:
        try:
            return self.sites[site_id]
        except KeyError:
            raise UnknownSite(site_id, self.sites) from None

    def icf_in_effect(self, at: datetime) -> IcfVersion | None:
        """The ICF version in effect at ``at``: the latest approved one whose effective instant has come
        (a later approval wins a tie)."""
        current: IcfVersion | None = None
        for icf in self.icf_versions:
            if icf.effective_from <= at and (current is None or icf.effective_from >= current.effective_from):
                current = icf
        return current


#: The protocol defaults with no sites and no ICF versions: what a verb reads when the caller passes no
#: configuration. Screening and consent need a study's sites and ICF versions, so they always take one.
DEFAULT_CONFIG = StudyConfig()
