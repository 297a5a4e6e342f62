"""A realistic synthetic trial, recorded through the trial's own use cases on a simulated clock.

The generator follows ``synthetic-cohort.md`` (simplified where noted): a screening funnel with screen failures
and a re-screening, staggered enrollment over 18 months, CYC pretreatment and the AlloMSC infusion, monthly
follow-up to M24 and six-monthly long-term visits up to the data cut, responder / partial / relapsing /
non-responder lab trajectories, adverse events with SAEs and their 24-hour reports, corrections with reasons, a
new ICF version with re-consent, withdrawals, deaths, losses to follow-up, missed and out-of-window visits.

How it runs: every subject's story becomes a list of *commands* (a use case of :class:`sle_events.trial.Trial`
with its signer, its ``occurred_at`` and the instant it is entered, ``recorded_at``). All commands are sorted by
``recorded_at`` and replayed on one simulated clock that drives both the events' timestamps and the store's
clock, so R1–R11 and the role checks run for real. A few deliberately invalid commands (≈ 1 %) must be refused
with their expected error. Commands entered after the data cut are dropped (a backlog).

Determinism: one PRNG stream per (seed, subject, topic) — xoshiro256** seeded from SHA-256 — with Box–Muller
normals, so the same seed gives the same record (:attr:`DemoResult.digest`, over everything but keys and
signatures) and adding subjects leaves the earlier ones' draws unchanged. Floats exist only inside the generator;
every recorded quantity is a decimal string.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

from sle_events.domain import bounds
from sle_events.domain import clock as domain_clock
from sle_events.domain import errors as E
from sle_events.domain.event_types import type_name
from sle_events.domain.payloads import CriterionAnswer, EligibilityChecklist, LabResult
from sle_events.signing.keys import Signer
from sle_events.store.errors import AppendRejected, UntrustedKey
from sle_events.store.record import StudyRecord
from sle_events.trial import Trial

__all__ = ["run_demo", "DemoResult", "demo_signers", "Rng", "setup_demo_ledger"]

DEMO_NAMESPACE = UUID("5f1e7a52-9c1b-4d55-9a0e-1c9b5e0d2007")
STUDY_START = datetime(2007, 3, 12, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
ENROLLMENT_MONTHS = 18
DATA_CUT_MONTHS = 46
SITES = [
    ("NJ01", "Affiliated Drum Tower Hospital, Nanjing", "Asia/Shanghai"),
    ("SH01", "Renji Hospital, Shanghai", "Asia/Shanghai"),
    ("BE01", "Charité, Berlin", "Europe/Berlin"),
]
PEOPLE = {
    "admin": ("admin@drum-tower", "admin"),
    "coordinator": ("nurse.li", "coordinator"),
    "investigator": ("dr.wang", "investigator"),
    "lab": ("lab.drum-tower", "lab"),
    "data_manager": ("dm.zhao", "data_manager"),
    "sponsor": ("pv.sponsor", "sponsor"),
    # source data verification and queries: the monitor (CRA), and the study's checking service (automatic queries)
    "monitor": ("cra.huang", "monitor"),
    "checks": ("edc.checks", "data_manager"),
}
# The printed names registered with the people's keys (21 CFR 11.50), shown by the audit trail. The lab's key is
# its reporting interface's (a service: no printed name), and the admin is the trust root (`Study.Created`).
PRINTED_NAMES = {
    "coordinator": "Li Na",
    "investigator": "Dr. Wang Li",
    "data_manager": "Zhao Min",
    "sponsor": "Chen Jing",
    "monitor": "Huang Wei",
}
MASK64 = (1 << 64) - 1


# =========================================================================== the PRNG (synthetic-cohort.md §1)
class Rng:
    """xoshiro256** seeded by SplitMix64 from the first 8 bytes of SHA-256(``"{seed}/{subject}/{topic}"``)."""

    def __init__(self, seed: int, subject: int | str, topic: str) -> None:
        x = int.from_bytes(hashlib.sha256(f"{seed}/{subject}/{topic}".encode()).digest()[:8], "big")
        self.s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            self.s.append(z ^ (z >> 31))

    def next(self) -> int:
        s = self.s
        result = (((s[1] * 5) & MASK64) << 7 | ((s[1] * 5) & MASK64) >> 57) & MASK64
        result = (result * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = ((s[3] << 45) | (s[3] >> 19)) & MASK64
        return result

    def random(self) -> float:
        return (self.next() >> 11) * (1.0 / (1 << 53))

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def chance(self, p: float) -> bool:
        return self.random() < p

    def integer(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))

    def normal(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        u1 = max(self.random(), 1e-300)
        return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * self.random())

    def lognormal(self, median: float, gsd: float) -> float:
        return median * math.exp(self.normal(0.0, math.log(gsd)))

    def pick(self, weighted: Sequence[tuple[Any, float]]) -> Any:
        r, acc = self.random() * sum(w for _, w in weighted), 0.0
        for item, w in weighted:
            acc += w
            if r < acc:
                return item
        return weighted[-1][0]


def dec(x: float, dp: int) -> str:
    """A generated float as a decimal string, half-up to ``dp`` decimals (formulas.md conventions)."""
    q = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-dp), rounding=ROUND_HALF_UP)
    return format(q, "f")


def clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


# =========================================================================== commands
@dataclass(order=True)
class Command:
    recorded_at: datetime
    seq: int
    label: str = field(compare=False)
    run: Callable[..., Any] = field(compare=False)
    expect: type[Exception] | None = field(compare=False, default=None)


@dataclass
class DemoResult:
    study_id: str
    subjects: int
    events: int
    events_by_type: dict[str, int] = field(default_factory=dict)
    screened: int = 0
    refused_as_expected: dict[str, int] = field(default_factory=dict)
    backlog: int = 0
    digest: str = ""


def demo_signers(key_dir: Path) -> dict[str, Signer]:
    """The demo's key holders; private keys live in ``key_dir`` (0600), never in the store."""
    key_dir.mkdir(parents=True, exist_ok=True)
    signers = {}
    for name, (actor, role) in PEOPLE.items():
        path = key_dir / f"{name}.pem"
        if not path.exists():
            Signer.generate(actor, role).save(path)
        signers[name] = Signer.from_file(path, actor, role)
    return signers


class Plan:
    """Collects commands; each subject's commands are entered in causal order (a later fact is never entered
    before the one it depends on), other subjects' interleave by ``recorded_at``."""

    def __init__(self, data_cut: datetime) -> None:
        self.commands: list[Command] = []
        self.seq = itertools.count()
        self.data_cut = data_cut
        self.backlog = 0

    def add(
        self, recorded_at: datetime, label: str, run: Callable[..., Any], expect: type[Exception] | None = None
    ) -> datetime:
        recorded_at = recorded_at.astimezone(UTC)
        if recorded_at > self.data_cut:
            self.backlog += 1
        else:
            self.commands.append(Command(recorded_at, next(self.seq), label, run, expect))
        return recorded_at


class Story:
    """One subject's commands, entered no earlier than the previous one of the same subject."""

    def __init__(self, plan: Plan, tz: ZoneInfo) -> None:
        self.plan = plan
        self.tz = tz
        self.cursor = datetime.min.replace(tzinfo=UTC)
        self.consented: list[str] = []

    def procedure(self, demo: Demo, sid: Callable[[], UUID], when: datetime, number: str) -> None:
        """R1: before a study procedure at ``when``, re-consent if a newer ICF version is in effect."""
        current = demo.icf_at(when)
        if self.consented and current not in self.consented:
            at_ = max(when - timedelta(minutes=30), next(e for v, e in demo.icf_versions if v == current))
            self.consented.append(current)
            self.add(
                at_ + timedelta(minutes=5),
                f"{number} re-consent {current}",
                lambda: demo.trial.obtain_consent(
                    sid(),
                    current,
                    at_,
                    signer=demo.signers["investigator"],
                    taken_by=demo.signers["investigator"].actor,
                ),
            )

    def at(self, day: date, hour: float) -> datetime:
        h = int(hour)
        m = round((hour - h) * 60)
        return datetime(day.year, day.month, day.day, h, 0, tzinfo=self.tz) + timedelta(minutes=m)

    def add(
        self, entered: datetime, label: str, run: Callable[..., Any], expect: type[Exception] | None = None
    ) -> datetime:
        """``run`` is called with no arguments (a lambda's parameters, if any, bind loop values by default)."""
        when = max(entered.astimezone(UTC), self.cursor + timedelta(seconds=1))
        self.cursor = when
        return self.plan.add(when, label, run, expect)


# =========================================================================== lab trajectories (§3–§4, simplified)
NOISE_CV = {
    "UPROT": 0.35,
    "UCREAT": 0.30,
    "ALB": 0.05,
    "CREAT": 0.07,
    "DSDNA": 0.25,
    "C3": 0.10,
    "C4": 0.15,
    "WBC": 0.15,
    "NEUT": 0.20,
    "LYMPH": 0.20,
    "HGB": 0.05,
    "PLAT": 0.12,
    "ESR": 0.25,
    "CRP": 0.60,
    "URBC": 0.60,
    "TREGPCT": 0.20,
    "CD4": 0.20,
}
UNITS = {
    "UPROT": "mg/dL",
    "UCREAT": "mg/dL",
    "ALB": "g/dL",
    "CREAT": "mg/dL",
    "DSDNA": "[IU]/mL",
    "C3": "mg/dL",
    "C4": "mg/dL",
    "WBC": "10*3/uL",
    "NEUT": "10*3/uL",
    "LYMPH": "10*3/uL",
    "HGB": "g/dL",
    "PLAT": "10*3/uL",
    "ESR": "mm/h",
    "CRP": "mg/L",
    "URBC": "/[HPF]",
    "UPROT24": "g/(24.h)",
}
DP = {
    "UPROT": 0,
    "UCREAT": 0,
    "ALB": 1,
    "CREAT": 2,
    "DSDNA": 0,
    "C3": 0,
    "C4": 1,
    "WBC": 1,
    "NEUT": 2,
    "LYMPH": 2,
    "HGB": 1,
    "PLAT": 0,
    "ESR": 0,
    "CRP": 1,
    "URBC": 0,
    "UPROT24": 2,
}
LAB_RANGES = {"DSDNA": ("0", "30"), "C3": ("90", "180"), "C4": ("10", "40")}


@dataclass
class Course:
    """A treated subject's latent disease course."""

    klass: str  # CR, PR, REL, NR
    base: dict[str, float]
    target: dict[str, float]
    tau_ren: float
    tau_imm: float
    t_rel: float | None
    treg0: float
    treg_gain: float
    descriptors: set[str]

    def renal(self, t: float) -> float:
        if self.t_rel is not None and t >= self.t_rel:
            return 0.0  # back towards baseline
        return math.exp(-t / self.tau_ren)

    def true(self, code: str, t: float) -> float:
        b, tg = self.base[code], self.target.get(code, self.base[code])
        if code in ("UPROT", "URBC"):
            f = self.renal(t)
            if self.t_rel is not None and t >= self.t_rel:
                low = tg + (b - tg) * math.exp(-self.t_rel / self.tau_ren)
                return math.exp(math.log(b * 0.85) + (math.log(low) - math.log(b * 0.85)) * math.exp(-(t - self.t_rel)))
            return math.exp(math.log(tg) + (math.log(b) - math.log(tg)) * f)
        f = math.exp(-t / (self.tau_imm if code in ("DSDNA", "C3", "C4") else 3.0))
        if code in ("DSDNA", "CREAT", "ESR", "CRP"):
            return math.exp(math.log(tg) + (math.log(b) - math.log(tg)) * f)
        return tg + (b - tg) * f


def baseline_course(rng: Rng, klass: str) -> Course:
    s = rng.normal()
    upcr = clip(rng.lognormal(2.6, 1.7) * math.exp(0.3 * s), 1.0, 12.0)
    ucreat = clip(rng.lognormal(100, 1.6), 20, 300)
    base = {
        "UCREAT": ucreat,
        "UPROT": upcr * ucreat,
        "CREAT": clip(rng.lognormal(1.0, 1.35), 0.5, 2.6),
        "DSDNA": clip(rng.lognormal(120, 3.5) * math.exp(0.4 * s), 5, 3000),
        "C3": clip(rng.normal(62, 20) - 8 * s, 20, 130),
        "C4": clip(rng.normal(9, 5), 2, 35),
        "WBC": clip(rng.lognormal(5.5, 1.4), 2.0, 15),
        "HGB": clip(rng.normal(10.8, 1.4), 8, 15.5),
        "PLAT": clip(rng.normal(200, 70), 30, 450),
        "ESR": clip(rng.lognormal(35, 1.8), 2, 140),
        "CRP": clip(rng.lognormal(4, 2.5), 0.2, 150),
        "URBC": clip(rng.lognormal(6, 3) * math.exp(0.3 * s), 0, 200),
    }
    base["NEUT"] = base["WBC"] * rng.uniform(0.55, 0.75)
    base["LYMPH"] = base["WBC"] * rng.uniform(0.10, 0.25)
    base["ALB"] = clip(4.2 - 1.2 * math.log(1 + upcr) + rng.normal(0, 0.25), 1.5, 4.8)
    like = klass if klass != "REL" else ("CR" if rng.chance(0.6) else "PR")
    target: dict[str, float] = {}
    if like == "CR":
        target["UPROT"] = clip(rng.lognormal(0.22, 1.5), 0.05, 0.40) * ucreat
        target["DSDNA"], target["C3"] = base["DSDNA"] * rng.uniform(0.15, 0.4), base["C3"] + rng.uniform(25, 50)
        target["C4"], target["CREAT"] = base["C4"] + rng.uniform(6, 15), base["CREAT"] * rng.uniform(0.8, 1.0)
        target["URBC"] = 1.5
    elif like == "PR":
        target["UPROT"] = clip(upcr * rng.uniform(0.15, 0.40), 0.6, 2.8) * ucreat
        target["DSDNA"], target["C3"] = base["DSDNA"] * rng.uniform(0.25, 0.6), base["C3"] + rng.uniform(15, 40)
        target["C4"], target["CREAT"] = base["C4"] + rng.uniform(4, 12), base["CREAT"] * rng.uniform(0.85, 1.05)
        target["URBC"] = base["URBC"] * rng.uniform(0.2, 0.6)
    else:
        target["UPROT"] = upcr * rng.uniform(0.6, 1.2) * ucreat
        target["DSDNA"], target["C3"] = base["DSDNA"] * rng.uniform(0.7, 1.3), base["C3"] + rng.uniform(-5, 10)
        target["C4"], target["CREAT"] = base["C4"] + rng.uniform(-2, 3), base["CREAT"] * rng.uniform(1.0, 1.25)
        target["URBC"] = base["URBC"] * rng.uniform(0.6, 1.3)
    for k in ("C3", "C4"):
        target[k] = max(target[k], 2.0)
    target["ESR"] = base["ESR"] * (rng.uniform(0.3, 0.6) if like == "CR" else rng.uniform(0.8, 1.2))
    target["HGB"] = base["HGB"] + (rng.uniform(0.5, 2.0) if like == "CR" else rng.uniform(-1, 0.5))
    descriptors = {
        code
        for code, p in (
            ("SLED2K15", 0.2),
            ("SLED2K16", 0.15),
            ("SLED2K17", 0.1),
            ("SLED2K09", 0.15),
            ("SLED2K18", 0.03),
            ("SLED2K19", 0.02),
            ("SLED2K08", 0.03),
        )
        if rng.chance(p)
    }
    return Course(
        klass,
        base,
        target,
        rng.uniform(2, 4) if like == "CR" else rng.uniform(2, 5),
        rng.uniform(1.5, 3),
        rng.uniform(5, 20) if klass == "REL" else None,
        clip(rng.normal(2.8, 1.2), 0.5, 8),
        rng.normal(3.0, 1.2),
        descriptors,
    )


def observe(rng: Rng, course: Course, t: float, nadir: tuple[float, float] | None = None) -> dict[str, str]:
    """One visit's lab values (true value × visit noise), as decimal strings in their units."""
    z = rng.normal()
    rho = {"UPROT": 0.5, "URBC": 0.4, "DSDNA": 0.4, "C3": -0.4, "C4": -0.3, "ALB": -0.3, "ESR": 0.3}
    out = {}
    for code, cv in NOISE_CV.items():
        if code in ("TREGPCT", "CD4"):
            continue
        sigma = math.sqrt(math.log(1 + cv * cv))
        r = rho.get(code, 0.0)
        e = r * z + math.sqrt(1 - r * r) * rng.normal()
        value = (
            course.true(code, t)
            if code != "ALB"
            else clip(
                4.2
                - 1.2 * math.log(1 + course.true("UPROT", max(t - 1, 0)) / course.base["UCREAT"])
                + (course.base["ALB"] - 4.2 + 1.2 * math.log(1 + course.base["UPROT"] / course.base["UCREAT"])),
                1.5,
                4.8,
            )
        )
        if nadir is not None and code in ("NEUT", "WBC", "LYMPH", "PLAT"):
            d_days, depth = nadir
            scale = {"NEUT": 1.0, "WBC": 0.8, "LYMPH": 0.6, "PLAT": 0.3}[code]
            value *= 1 - scale * depth * math.exp(-(((t * 30 - d_days) / 4) ** 2))
        value *= math.exp(sigma * e)
        out[code] = value
    lows = {"CREAT": 0.3, "ALB": 0.8, "HGB": 6.0, "C3": 5.0, "C4": 0.5, "UCREAT": 15}
    return {code: dec(min(max(v, lows.get(code, 0.0)), _plausible_high(code)), DP[code]) for code, v in out.items()}


def _plausible_high(code: str) -> float:
    """A simulated lab never reports what no real lab could (the plausibility bounds would refuse it)."""
    field = bounds.lab_bound_field(code)
    return float(bounds.get_bound(field).high) * 0.98 if field else math.inf


def sledai_codes(values: dict[str, str], clinical: set[str]) -> list[str]:
    d = set(clinical)
    upcr = float(values["UPROT"]) / float(values["UCREAT"])
    if upcr > 0.5:
        d.add("SLED2K13")
    if float(values["URBC"]) > 5:
        d.add("SLED2K12")
    if float(values["C3"]) < 90 or float(values["C4"]) < 10:
        d.add("SLED2K20")
    if float(values["DSDNA"]) > 30:
        d.add("SLED2K21")
    return sorted(d)


# =========================================================================== the cohort
@dataclass
class Demo:
    trial: Trial
    signers: dict[str, Signer]
    plan: Plan
    seed: int
    icf_versions: list[tuple[str, datetime]]
    expected: dict[str, int] = field(default_factory=dict)
    versions: dict[tuple[UUID, str], Any] = field(default_factory=dict)

    def icf_at(self, when: datetime) -> str:
        return [v for v, eff in self.icf_versions if eff <= when][-1]


def _checklist(labs_at: datetime, failed: Sequence[str] = ()) -> EligibilityChecklist:
    from sle_events.domain.eligibility import EXCLUSION, INCLUSION

    answers = {c: CriterionAnswer(met=c not in failed, evidence="source documents") for c in INCLUSION}
    answers.update({c: CriterionAnswer(met=c in failed, evidence="source documents") for c in EXCLUSION})
    return EligibilityChecklist(answers=answers, screening_labs_collected_at=labs_at)


FAILURES = [
    ("T3", 18),
    ("I3", 20),
    ("E1", 12),
    ("I7", 10),
    ("I2", 8),
    ("T5", 7),
    ("I4", 6),
    ("E4", 6),
    ("E5", 5),
    ("E8", 4),
    ("E2", 2),
    ("E3", 2),
]


def screening_dates(seed: int, n: int) -> list[date]:
    """Weekday screening dates over 18 months, at half rate in months 0–3 (Poisson arrivals)."""
    rng = Rng(seed, "study", "screening")
    per_day = n / (ENROLLMENT_MONTHS * 30 - 45) if n else 1.0
    days: list[date] = []
    d = STUDY_START.date()
    while len(days) < n:
        rate = per_day * (0.5 if (d - STUDY_START.date()).days < 90 else 1.0)
        d += timedelta(days=max(1, round(-math.log(max(rng.random(), 1e-12)) / rate)))
        while d.weekday() >= 5:
            d += timedelta(days=1)
        days.append(d)
    return days


def plan_screening(
    demo: Demo,
    k: int,
    day: date,
    site: tuple[str, str, str],
    *,
    enrol: bool,
    rescreen_of: Callable[[], UUID] | None = None,
) -> tuple[Callable[[], UUID], Story, datetime] | None:
    """Screening, consent, screening data and eligibility (or a screen failure). Returns the subject's id
    getter, its story and the eligibility time for a subject who will enrol."""
    t, s = demo.trial, demo.signers
    rng = Rng(demo.seed, k, "screen")
    tz = ZoneInfo(site[2])
    story = Story(demo.plan, tz)
    number = f"{site[0]}-{k:04d}"
    ids: dict[str, UUID] = {}

    def sid() -> UUID:
        return ids["id"]

    screened = story.at(day, rng.uniform(9, 11))

    def screen() -> None:
        ids["id"] = t.screen(
            site[0],
            number,
            screened,
            signer=s["coordinator"],
            rescreen_of=None if rescreen_of is None else rescreen_of(),
        )

    story.add(screened + timedelta(minutes=20), f"{number} screened", screen)
    reason = None if enrol else rng.pick(FAILURES)
    if reason == "T3":
        story.add(
            screened + timedelta(hours=2),
            f"{number} declined",
            lambda: t.screen_fail(
                sid(), screened + timedelta(hours=1), signer=s["coordinator"], reason="consent declined before signing"
            ),
        )
        return None
    consent_day = day if rng.chance(0.7) else day + timedelta(days=rng.integer(1, 7))
    consented = story.at(consent_day, rng.uniform(11.5, 16))
    icf = demo.icf_at(consented)
    story.consented.append(icf)
    story.add(
        consented + timedelta(minutes=15),
        f"{number} consent",
        lambda: t.obtain_consent(sid(), icf, consented, signer=s["investigator"], taken_by=s["investigator"].actor),
    )
    demo_rng = Rng(demo.seed, k, "demo")
    female = demo_rng.chance(0.87)
    age = int(clip(demo_rng.normal(31, 8), 18, 60))
    birth = date(consent_day.year - age - 1, demo_rng.integer(1, 12), demo_rng.integer(1, 28))
    cbp = female and demo_rng.chance(0.9)
    story.add(
        consented + timedelta(minutes=40),
        f"{number} demographics",
        lambda: t.record_demographics(
            sid(),
            "F" if female else "M",
            birth,
            consented + timedelta(minutes=30),
            signer=s["coordinator"],
            childbearing_potential=cbp,
        ),
    )
    story.add(
        consented + timedelta(minutes=50),
        f"{number} history",
        lambda: t.record_medical_history(
            sid(),
            "systemic lupus erythematosus",
            consented + timedelta(minutes=45),
            signer=s["coordinator"],
            start_date=consent_day - timedelta(days=int(clip(demo_rng.lognormal(48, 2), 12, 240) * 30)),
            ongoing=True,
            category="SLE",
        ),
    )
    course = baseline_course(Rng(demo.seed, k, "class"), "NR")
    labs_at = story.at(consent_day + timedelta(days=1), rng.uniform(7.5, 11))
    values = observe(Rng(demo.seed, k, "labs-scr"), course, 0.0)
    if reason == "I3":
        values["UPROT"] = dec(float(values["UCREAT"]) * rng.uniform(0.2, 0.99), 0)
    if reason == "E4":
        values["CREAT"] = dec(rng.uniform(2.6, 3.4), 2)
    if reason == "E5":
        values["WBC"], values["NEUT"] = dec(rng.uniform(1.2, 1.9), 1), dec(rng.uniform(0.5, 0.9), 2)
    panel = [
        (c, values[c], UNITS[c])
        for c in ("CREAT", "UPROT", "UCREAT", "ALB", "DSDNA", "C3", "C4", "WBC", "NEUT", "HGB", "PLAT")
    ]
    story.procedure(demo, sid, labs_at, number)
    story.add(
        labs_at + timedelta(hours=rng.uniform(1, 8)),
        f"{number} screening labs",
        lambda: t.record_lab_panel(sid(), panel, labs_at, signer=s["lab"], ranges=LAB_RANGES),
    )
    biopsy_class = rng.pick([("IV", 55), ("III", 20), ("IV+V", 15), ("III+V", 10)]) if reason != "I2" else "V"
    story.add(
        labs_at + timedelta(hours=10),
        f"{number} biopsy",
        lambda: t.record_biopsy(
            sid(),
            consent_day - timedelta(days=rng.integer(20, 300)),
            biopsy_class,
            labs_at + timedelta(hours=9),
            signer=s["coordinator"],
        ),
    )
    review = labs_at + timedelta(days=rng.integer(2, 13), hours=2)
    items = [
        "BIOPSY_CLASS_III_OR_IV" if biopsy_class in ("III", "IV", "III+V", "IV+V") else "BIOPSY_CLASS_II_OR_V",
        "ANTI_DSDNA_OR_ANTI_SM",
        "LOW_C3_AND_LOW_C4" if float(values["C4"]) < 10 else "LOW_C3_OR_LOW_C4",
    ]
    story.procedure(demo, sid, review, number)
    story.add(
        review + timedelta(minutes=5),
        f"{number} classification",
        lambda: t.record_classification(
            sid(),
            rng.pick([("1:160", 25), ("1:320", 35), ("1:640", 25), ("1:1280", 15)]),
            items,
            review,
            signer=s["investigator"],
        ),
    )
    if reason is None or reason == "T5":
        eligible_at = review + timedelta(hours=1)
        story.add(
            eligible_at + timedelta(minutes=10),
            f"{number} eligibility",
            lambda: t.confirm_eligibility(sid(), eligible_at, _checklist(labs_at), signer=s["investigator"]),
        )
        if reason == "T5":
            story.add(
                eligible_at + timedelta(days=2),
                f"{number} withdrew consent",
                lambda: t.screen_fail(
                    sid(),
                    eligible_at + timedelta(days=2),
                    signer=s["investigator"],
                    reason="consent withdrawn before enrollment",
                ),
            )
            return None
        return sid, story, eligible_at
    failed = [reason]
    story.add(
        review + timedelta(hours=1),
        f"{number} screen failure",
        lambda: t.screen_fail(
            sid(), review, signer=s["investigator"], reason=f"criterion {reason} not met", failed_criteria=failed
        ),
    )
    if reason in ("I3", "E4", "E5") and rng.chance(0.10) and rescreen_of is None:
        return sid, story, review  # the caller may re-screen this one
    return None


def plan_treatment(
    demo: Demo, k: int, sid: Callable[[], UUID], story: Story, eligible_at: datetime, number: str, showcase: int
) -> None:
    """Enrollment, the in-patient stay with CYC and the MSC infusion, and follow-up to the data cut."""
    t, s = demo.trial, demo.signers
    rng = Rng(demo.seed, k, "treat")
    klass = Rng(demo.seed, k, "class").pick([("CR", 28), ("PR", 16), ("REL", 16), ("NR", 40)])
    course = baseline_course(Rng(demo.seed, k, "course"), klass)
    enrolled = eligible_at + timedelta(days=rng.integer(0, 7), hours=1)
    story.procedure(demo, sid, enrolled, number)
    story.add(
        enrolled + timedelta(minutes=10),
        f"{number} enrolled",
        lambda: t.enroll(sid(), enrolled, signer=s["investigator"]),
    )
    cyc_day = (enrolled + timedelta(days=rng.integer(3, 21))).date()
    admitted = story.at(cyc_day - timedelta(days=0 if rng.chance(0.8) else 1), 7.0)
    story.procedure(demo, sid, admitted - timedelta(minutes=30), number)
    story.add(
        admitted + timedelta(minutes=5), f"{number} admitted", lambda: t.admit(sid(), admitted, signer=s["coordinator"])
    )
    female = Rng(demo.seed, k, "demo").chance(0.87)
    h = rng.normal(158, 6) if female else rng.normal(169, 6)
    w = clip(rng.normal(54, 8) if female else rng.normal(65, 10), 38, 110)
    height, weight = dec(h, 0), dec(w, 1)
    measured = admitted + timedelta(minutes=15)
    story.add(
        measured + timedelta(minutes=5),
        f"{number} vitals",
        lambda: t.record_vital_signs(
            sid(),
            measured,
            signer=s["coordinator"],
            height_cm=height,
            weight_kg=weight,
            temperature_c=dec(rng.uniform(36.3, 37.3), 1),
            systolic_bp=dec(rng.normal(128, 14), 0),
            diastolic_bp=dec(rng.normal(82, 10), 0),
            heart_rate=dec(rng.normal(82, 10), 0),
        ),
    )
    story.add(
        measured + timedelta(hours=1),
        f"{number} pregnancy test",
        lambda: t.record_pregnancy_test(sid(), measured, "negative", signer=s["lab"]),
    )
    specimens = admitted + timedelta(minutes=30)
    base = observe(Rng(demo.seed, k, "labs-base"), course, 0.0)
    if not rng.chance(0.02):
        story.add(
            specimens + timedelta(hours=rng.uniform(0.5, 1.2)),
            f"{number} baseline labs",
            lambda: t.record_lab_panel(
                sid(),
                [(c, base[c], UNITS[c]) for c in UNITS if c in base],
                specimens,
                signer=s["lab"],
                ranges=LAB_RANGES,
            ),
        )
    cyc_start = story.at(cyc_day, rng.uniform(9, 11))
    bsa = round(math.sqrt(float(height) * float(weight) / 3600) + 1e-9, 2)
    calc = 750 * bsa
    off = rng.uniform(0.11, 0.20) * (1 if rng.chance(0.5) else -1) if rng.chance(0.03) else rng.normal(0, 0.02)
    administered = dec(calc * (1 + off), 0)
    cyc_stop = cyc_start + timedelta(minutes=rng.integer(60, 120))
    msc_start = cyc_start + timedelta(hours=clip(rng.normal(24, 1.5), 20, 30))
    story.procedure(demo, sid, cyc_start - timedelta(minutes=10), number)
    story.add(
        cyc_stop + timedelta(minutes=10),
        f"{number} CYC",
        lambda: t.give_pretreatment(
            sid(), cyc_start, cyc_stop, "750", administered, f"CYC-{cyc_day:%Y%m}", signer=s["investigator"]
        ),
    )
    story.add(
        cyc_stop + timedelta(minutes=20),
        f"{number} mesna",
        lambda: t.record_concomitant_medication(
            sid(),
            "mesna",
            cyc_day,
            cyc_stop,
            signer=s["coordinator"],
            dose="400",
            dose_unit="mg",
            route="IV",
            indication="uroprotection",
        ),
    )
    if k == showcase:  # an invalid command: an infusion 12 h after CYC (formulas.md W3) is refused
        demo.expected["R4 infusion 12 h after CYC"] = 0
        lot_early = f"MSC-{number}-X"
        early = cyc_start + timedelta(hours=12)
        story.add(
            early - timedelta(hours=1),
            f"{number} early lot",
            lambda: _release(demo, sid(), lot_early, early - timedelta(hours=2), weight, rng),
        )
        story.add(
            early + timedelta(hours=1),
            f"{number} early infusion (must be refused)",
            lambda: t.infuse_msc(sid(), lot_early, early, early + timedelta(hours=1), signer=s["investigator"]),
            E.OutsideWindow,
        )
    released = msc_start - timedelta(hours=rng.uniform(1, 4))
    lot_id = f"MSC-{number}"
    fail_lot = rng.chance(0.01)
    story.add(
        released + timedelta(minutes=5),
        f"{number} lot release",
        lambda: _release(demo, sid(), lot_id, released, weight, rng, fail=fail_lot),
    )
    tnp = False
    if fail_lot:
        if rng.chance(0.5):
            story.add(
                released + timedelta(minutes=30),
                f"{number} deviation",
                lambda: t.record_deviation(
                    sid(),
                    released + timedelta(minutes=20),
                    signer=s["investigator"],
                    category="product_release",
                    description="lot below 70 % viability: sponsor approved its use",
                    lot_id=lot_id,
                ),
            )
        else:
            tnp = True
    msc_stop = msc_start + timedelta(minutes=rng.integer(30, 60))
    if tnp:
        story.add(
            msc_start,
            f"{number} transplant not performed",
            lambda: t.record_transplant_not_performed(
                sid(), msc_start, "the lot failed release and no replacement was available", signer=s["investigator"]
            ),
        )
    else:
        # An ICF version may take effect between the CYC and the infusion (R1).
        story.procedure(demo, sid, msc_start - timedelta(minutes=45), number)
        story.add(
            msc_start - timedelta(minutes=30),
            f"{number} premedication",
            lambda: t.record_concomitant_medication(
                sid(),
                "prednisone",
                msc_start.date(),
                msc_start - timedelta(minutes=40),
                signer=s["coordinator"],
                dose="20",
                dose_unit="mg",
                route="PO",
                indication="premedication",
            ),
        )
        story.add(
            msc_stop + timedelta(minutes=15),
            f"{number} MSC infusion",
            lambda: t.infuse_msc(sid(), lot_id, msc_start, msc_stop, signer=s["investigator"], volume_ml="100"),
        )
    ae_rng = Rng(demo.seed, k, "ae")
    ae_count = itertools.count(1)
    if ae_rng.chance(0.30):
        onset = cyc_start + timedelta(hours=ae_rng.uniform(2, 30))
        plan_ae(
            demo,
            story,
            sid,
            number,
            next(ae_count),
            "nausea",
            onset,
            ae_rng,
            grade=1 + ae_rng.chance(0.3),
            related=("probable", "unlikely"),
        )
    if not tnp and ae_rng.chance(0.06):
        plan_ae(
            demo,
            story,
            sid,
            number,
            next(ae_count),
            "infusion-related reaction (fever)",
            msc_start + timedelta(hours=ae_rng.uniform(0.5, 20)),
            ae_rng,
            grade=1,
            related=("not_related", "probable"),
            linked="MSC",
        )
    long_stay = ae_rng.chance(0.06)
    stay_days = ae_rng.integer(6, 9) if long_stay else ae_rng.integer(2, 4)
    discharged = story.at(msc_start.date() + timedelta(days=stay_days), 10.0)
    prolonged = None
    if long_stay:
        prolonged = next(ae_count)
        plan_ae(
            demo,
            story,
            sid,
            number,
            prolonged,
            "febrile neutropenia",
            msc_start + timedelta(days=2),
            ae_rng,
            grade=3,
            serious=["hospitalisation"],
            related=("probable", "unlikely"),
        )
    story.add(
        discharged + timedelta(hours=1),
        f"{number} discharge",
        lambda: t.discharge(
            sid(),
            discharged,
            signer=s["coordinator"],
            prolonged_by_ae=None if prolonged is None else f"AE-{prolonged:03d}",
        ),
    )
    if tnp:
        return
    plan_follow_up(demo, k, sid, story, number, course, msc_start, cyc_start, ae_count, showcase)


def _release(
    demo: Demo, subject: UUID, lot_id: str, released: datetime, weight: str, rng: Rng, fail: bool = False
) -> None:
    cells = float(weight) * 1e6 * rng.uniform(0.95, 1.1)
    viability = rng.uniform(80, 97) if not fail else rng.uniform(60, 69)
    demo.trial.release_product_lot(
        lot_id,
        subject,
        released,
        signer=demo.signers["lab"],
        donor_id=f"DONOR-{lot_id[-4:]}",
        hla_match=rng.pick([("10/10", 60), ("9/10", 25), ("haplo", 15)]),
        total_cells=dec(cells / (viability / 100), 0),
        viability_pct=dec(viability, 1),
        identity_markers_pct={
            "CD73": dec(rng.uniform(96, 99.9), 1),
            "CD90": dec(rng.uniform(96, 99.9), 1),
            "CD105": dec(rng.uniform(95.5, 99.5), 1),
            "CD45": dec(rng.uniform(0.1, 1.5), 1),
            "CD34": dec(rng.uniform(0.1, 1.0), 1),
            "CD14": dec(rng.uniform(0.1, 1.0), 1),
            "CD19": dec(rng.uniform(0.1, 1.0), 1),
            "HLA-DR": dec(rng.uniform(0.1, 1.5), 1),
        },
        sterility_negative=True,
        mycoplasma_negative=True,
        endotoxin_eu_per_kg=dec(rng.uniform(0.1, 1.0), 2),
        volume_ml="100",
    )


def plan_ae(
    demo: Demo,
    story: Story,
    sid: Callable[[], UUID],
    number: str,
    n: int,
    term: str,
    onset: datetime,
    rng: Rng,
    *,
    grade: int,
    related: tuple[str, str],
    serious: list[str] | None = None,
    linked: str | None = None,
) -> None:
    """An AE: first entry (coordinator), assessment (investigator), SAE report on the 24-h clock, the sponsor's
    expectedness, and the outcome."""
    t, s = demo.trial, demo.signers
    ae_id = f"AE-{n:03d}"
    entered = onset + timedelta(hours=rng.uniform(2, 72))
    story.add(
        entered,
        f"{number} {ae_id} entry",
        lambda: t.report_adverse_event(
            sid(), term, onset.date(), entered, signer=s["coordinator"], grade_proposal=grade, linked_to=linked
        ),
    )
    assessed = entered + timedelta(hours=rng.uniform(4, 72) if serious else rng.uniform(24, 240))
    story.add(
        assessed + timedelta(minutes=5),
        f"{number} {ae_id} assessment",
        lambda: t.assess_adverse_event(
            sid(),
            ae_id,
            assessed,
            signer=s["investigator"],
            grade=grade,
            serious=bool(serious),
            seriousness=serious or [],
            relatedness_cyc=related[0],
            relatedness_msc=related[1],
        ),
    )
    if serious:
        late = rng.chance(0.05)
        reported = assessed + timedelta(hours=rng.uniform(25, 40) if late else rng.uniform(1, 20))
        story.add(
            reported + timedelta(minutes=5),
            f"{number} {ae_id} SAE report",
            lambda: t.report_sae(sid(), ae_id, reported, signer=s["investigator"]),
        )
        story.add(
            reported + timedelta(days=2),
            f"{number} {ae_id} expectedness",
            lambda: t.assess_expectedness(
                sid(),
                ae_id,
                reported + timedelta(days=2),
                signer=s["sponsor"],
                expectedness_cyc="expected",
                expectedness_msc="expected" if "infusion" in term or "infection" in term else "unexpected",
            ),
        )
    resolved = onset + timedelta(days=rng.uniform(2, 20))
    story.add(
        resolved + timedelta(days=1),
        f"{number} {ae_id} outcome",
        lambda: t.record_ae_outcome(
            sid(),
            ae_id,
            resolved + timedelta(hours=12),
            "recovered",
            signer=s["investigator"],
            resolved_on=resolved.date(),
            action="treatment_given" if grade >= 2 else "none",
        ),
    )


MONTHS = [*list(range(1, 25)), 30, 36, 42, 48]
ET_PANEL = ("CREAT", "UPROT", "UCREAT", "WBC", "NEUT", "HGB", "PLAT")


def plan_follow_up(
    demo: Demo,
    k: int,
    sid: Callable[[], UUID],
    story: Story,
    number: str,
    course: Course,
    msc_start: datetime,
    cyc_start: datetime,
    ae_count: Any,
    showcase: int,
) -> None:
    t, s = demo.trial, demo.signers
    vrng = Rng(demo.seed, k, "visits")
    erng = Rng(demo.seed, k, "entry")
    crng = Rng(demo.seed, k, "corrections")
    ae_rng = Rng(demo.seed, k, "ae-follow")
    tx = msc_start.date()
    nadir = (vrng.uniform(7, 14), 0.9 if vrng.chance(0.01) else vrng.uniform(0.2, 0.7))
    disp = Rng(demo.seed, k, "disposition")
    death_p = {"CR": 0.01, "PR": 0.03, "REL": 0.06, "NR": 0.09}[course.klass]
    withdraw_p = {"CR": 0.05, "PR": 0.05, "REL": 0.05, "NR": 0.12}[course.klass]
    exit_month = 0  # the month of the exit (with exit_kind)
    exit_kind = None
    if k == showcase + 1:
        exit_kind, exit_month = "withdraw", 8
    elif disp.chance(death_p):
        exit_kind, exit_month = "death", disp.integer(2, 24)
    elif disp.chance(withdraw_p):
        exit_kind, exit_month = "withdraw", disp.integer(6, 20)
    elif disp.chance(0.04):
        exit_kind, exit_month = "ltfu", disp.integer(4, 22)
    missed_last = False
    sae_forced = k == showcase
    stale_shown = k != showcase  # the showcase's first monthly creatinine leaves a stale eGFR (below)
    for nadir_day in (7, 14):  # unscheduled CBC at the CYC nadir (synthetic-cohort.md §4.4)
        day = tx + timedelta(days=nadir_day)
        uns_at = story.at(day, 9.0)
        story.procedure(demo, sid, uns_at - timedelta(minutes=30), number)
        story.add(
            uns_at + timedelta(hours=1),
            f"{number} day {nadir_day} UNS",
            lambda at_=uns_at: t.record_unscheduled_visit(
                sid(), at_, signer=s["coordinator"], purpose="CBC at the CYC nadir"
            ),
        )
        cbc = observe(vrng, course, nadir_day / 30, nadir)
        story.add(
            uns_at + timedelta(hours=3),
            f"{number} day {nadir_day} CBC",
            lambda v=cbc, at_=uns_at: t.record_lab_panel(
                sid(),
                [(c, v[c], UNITS[c]) for c in ("WBC", "NEUT", "LYMPH", "HGB", "PLAT")],
                at_ - timedelta(minutes=15),
                signer=s["lab"],
            ),
        )
    for month in MONTHS:
        target = tx + timedelta(days=30 * month)
        window = 7 if month <= 24 else 30
        if exit_kind == "ltfu" and month in (exit_month, exit_month + 1):
            day = target + timedelta(days=window + 1)
            story.add(
                story.at(day, 9),
                f"{number} M{month} missed",
                lambda m=month, d=day: t.record_missed_visit(
                    sid(), f"M{m}", story.at(d, 9), signer=s["coordinator"], reason="did not attend"
                ),
            )
            if month == exit_month + 1:
                for i in range(3):
                    when = story.at(day + timedelta(days=2 + 3 * i), 10)
                    story.add(
                        when,
                        f"{number} contact {i}",
                        lambda w_=when: t.record_contact_attempt(
                            sid(), w_, signer=s["coordinator"], method="phone", outcome="no answer"
                        ),
                    )
                lost = story.at(day + timedelta(days=12), 11)
                story.add(
                    lost,
                    f"{number} lost to follow-up",
                    lambda lost=lost: t.mark_lost_to_follow_up(sid(), lost, signer=s["investigator"]),
                )
                if disp.chance(0.2):
                    back = story.at(day + timedelta(days=60), 10)
                    story.add(
                        back,
                        f"{number} returned",
                        lambda back=back: t.record_return(
                            sid(), back, "subject called back after moving house", signer=s["investigator"]
                        ),
                    )
                    exit_kind = None
                else:
                    return
            continue
        if exit_kind in ("withdraw", "death") and month == exit_month:
            when = story.at(target, 11)
            if exit_kind == "withdraw":
                agreed = disp.chance(0.6) or k == showcase + 1
                code = disp.pick(
                    [
                        ("lack_of_efficacy", 40),
                        ("withdrawal_by_subject", 30),
                        ("adverse_event", 10),
                        ("pregnancy", 10),
                        ("physician_decision", 10),
                    ]
                )
                story.add(
                    when,
                    f"{number} withdrawn",
                    lambda when=when, code=code, agreed=agreed: t.withdraw(
                        sid(),
                        when,
                        signer=s["investigator"],
                        reason_code=code,
                        reason="no renal response; rescue therapy"
                        if code == "lack_of_efficacy"
                        else "subject's decision",
                        decided_by="subject" if code == "withdrawal_by_subject" else "investigator",
                        safety_follow_up_agreed=agreed,
                    ),
                )
                if agreed:
                    et = story.at(target + timedelta(days=disp.integer(3, 20)), 9)
                    story.add(
                        et + timedelta(hours=2),
                        f"{number} ET",
                        lambda et=et: t.record_visit(sid(), "ET", et, signer=s["coordinator"]),
                    )
                    values = observe(vrng, course, month + 0.3)
                    story.add(
                        et + timedelta(hours=5),
                        f"{number} ET labs",
                        lambda v=values, et=et: t.record_lab_panel(
                            sid(), [(c, v[c], UNITS[c]) for c in ET_PANEL], et, signer=s["lab"], ranges=LAB_RANGES
                        ),
                    )
            else:
                died = story.at(target - timedelta(days=disp.integer(1, 20)), 4)
                cause = disp.pick([("pneumonia", 50), ("renal failure", 30), ("pulmonary embolism", 10), ("other", 10)])
                story.add(
                    died + timedelta(hours=20),
                    f"{number} death",
                    lambda died=died, cause=cause: t.record_death(
                        sid(), died, cause, signer=s["investigator"], aware_at=died + timedelta(hours=18)
                    ),
                )
                story.add(
                    died + timedelta(hours=30),
                    f"{number} death SAE report",
                    lambda died=died: t.report_sae(
                        sid(), _open_ae(t, sid()), died + timedelta(hours=30), signer=s["investigator"]
                    ),
                )
            return
        missed = vrng.chance(0.20 if missed_last else 0.05)
        missed_last = missed
        if missed:
            day = target + timedelta(days=window + 1)
            story.add(
                story.at(day, 9),
                f"{number} M{month} missed",
                lambda m=month, d=day: t.record_missed_visit(
                    sid(), f"M{m}", story.at(d, 9), signer=s["coordinator"], reason="did not attend"
                ),
            )
            continue
        shift = round(vrng.normal(0, 2.5))
        if vrng.chance(0.06):
            shift = int(vrng.uniform(8, 20) if month <= 24 else vrng.uniform(31, 45)) * (1 if vrng.chance(0.75) else -1)
        day = target + timedelta(days=shift)
        if day.weekday() == 6:
            day += timedelta(days=1)
        visit_at = story.at(day, 8.0)
        t_month = (day - tx).days / 30
        story.procedure(demo, sid, collected_at := visit_at - timedelta(minutes=30), number)
        entry = visit_at + (
            timedelta(hours=erng.uniform(1, 8)) if erng.chance(0.6) else timedelta(days=min(erng.lognormal(2, 3), 20))
        )
        story.add(
            entry,
            f"{number} M{month}",
            lambda m=month, at_=visit_at: t.record_visit(sid(), f"M{m}", at_, signer=s["coordinator"]),
        )
        story.add(
            entry + timedelta(minutes=2),
            f"{number} M{month} vitals",
            lambda at_=visit_at: t.record_vital_signs(
                sid(),
                at_ + timedelta(minutes=10),
                signer=s["coordinator"],
                weight_kg=dec(vrng.normal(55, 1), 1),
                systolic_bp=dec(vrng.normal(124, 12), 0),
                diastolic_bp=dec(vrng.normal(80, 8), 0),
                heart_rate=dec(vrng.normal(78, 9), 0),
            ),
        )
        collected = collected_at + timedelta(minutes=int(vrng.uniform(0, 30)))
        values = observe(vrng, course, t_month, nadir if month == 1 else None)
        codes = [
            "CREAT",
            "UPROT",
            "UCREAT",
            "ALB",
            "DSDNA",
            "C3",
            "C4",
            "WBC",
            "NEUT",
            "LYMPH",
            "HGB",
            "PLAT",
            "ESR",
            "CRP",
            "URBC",
        ]
        wrong = None
        if crng.chance(0.3):  # a transcription error in one result, corrected later (2 % of results overall)
            wrong = crng.pick([(c, 1) for c in ("C3", "HGB", "ALB", "PLAT", "ESR", "C4")])
            swapped = _swap_last_digits(values[wrong])
            if swapped == values[wrong] or not _plausible(wrong, swapped):
                wrong = None
        reported = collected + timedelta(hours=vrng.uniform(1, 8))
        shown = dict(values)
        if wrong:
            shown[wrong] = swapped
        stale = None
        if not stale_shown:
            # A mis-keyed creatinine, corrected by the lab days later without deriving the eGFR again: the eGFR
            # derived from the wrong value is a stale result (`sle patients`, `sle dashboard`) for the monitor.
            stale_shown = True
            stale = _swap_last_digits(values["CREAT"])
            if stale == values["CREAT"] or not _plausible("CREAT", stale):
                stale = dec(float(values["CREAT"]) + 0.3, 2)
            shown["CREAT"] = stale
        key = (k, month)
        story.add(
            reported,
            f"{number} M{month} labs",
            lambda v=shown, c=collected, r=reported, kk=key, cs=codes: demo.versions.__setitem__(
                kk,
                t.record_lab_panel(
                    sid(), [(x, v[x], UNITS[x]) for x in cs], c, signer=s["lab"], reported_at=r, ranges=LAB_RANGES
                ),
            ),
        )
        if wrong:
            fixed = reported + timedelta(days=crng.uniform(2, 60))
            story.add(
                fixed,
                f"{number} M{month} correction",
                lambda kk=key, c=wrong, v=values[wrong], f_=fixed: t.correct(
                    sid(), demo.versions[kk][c], {"value": v}, "transcription error", f_, signer=s["lab"]
                ),
            )
        if stale is not None:
            stale_fixed = reported + timedelta(days=5)
            story.add(
                stale_fixed,
                f"{number} M{month} creatinine correction (eGFR not derived again)",
                lambda kk=key, v=values["CREAT"], f_=stale_fixed: t.correct(
                    sid(),
                    demo.versions[kk]["CREAT"],
                    {"value": v},
                    "transcription error",
                    f_,
                    signer=s["lab"],
                    derive=False,
                ),
            )
        if crng.chance(0.03):  # the lab sends one result twice; the duplicate is voided
            dup_at = reported + timedelta(hours=1)
            story.add(
                dup_at,
                f"{number} M{month} duplicate CRP",
                lambda kk=key, v=values["CRP"], c=collected: demo.versions.__setitem__(
                    (kk, "dup"), t.record_lab_result(sid(), "CRP", v, "mg/L", c, signer=s["lab"])
                ),
            )
            story.add(
                dup_at + timedelta(days=crng.uniform(1, 14)),
                f"{number} M{month} void duplicate",
                lambda kk=key, f_=dup_at + timedelta(days=1): t.void(
                    sid(), demo.versions[(kk, "dup")], "duplicate entry", f_, signer=s["lab"]
                ),
            )
        if k == showcase and month == 2:  # an invalid command: a correction without a reason
            demo.expected["R11 correction without a reason"] = 0
            story.add(
                reported + timedelta(days=3),
                f"{number} reasonless correction (must be refused)",
                lambda kk=key, f_=reported + timedelta(days=3): t.correct(
                    sid(), demo.versions[kk]["C3"], {"value": "1"}, " ", f_, signer=s["lab"]
                ),
                E.ReasonRequired,
            )
        if k == showcase and month == 1:  # an invalid command: a coordinator cannot record a lab result
            demo.expected["R10 coordinator records a lab result"] = 0
            story.add(
                reported + timedelta(minutes=1),
                f"{number} lab by a nurse (must be refused)",
                lambda c=collected: t.record_lab_result(sid(), "CRP", "3.0", "mg/L", c, signer=s["coordinator"]),
                UntrustedKey,
            )
        if month % 3 == 0 and month <= 24:
            treg = clip(
                course.treg0
                + course.treg_gain
                * (1.0 if month == 3 else 0.8 if month <= 12 else 0.6)
                * (1 if course.klass != "NR" else 0.5 * math.exp(-(month - 3) / 3)),
                0.2,
                30,
            )
            treg_reported = collected + timedelta(days=vrng.uniform(2, 7))
            story.add(
                treg_reported,
                f"{number} M{month} Treg",
                lambda c=collected, v=treg, r=treg_reported: t.record_treg_panel(
                    sid(),
                    c,
                    dec(v * math.exp(vrng.normal(0, 0.2)), 1),
                    dec(clip(vrng.lognormal(450, 1.6), 80, 1500), 0),
                    signer=s["lab"],
                    reported_at=r,
                ),
            )
        assessed = reported + timedelta(hours=2)
        descriptors = sledai_codes(values, {d for d in course.descriptors if vrng.chance(math.exp(-t_month / 4))})
        story.add(
            assessed,
            f"{number} M{month} SLEDAI",
            lambda at_=visit_at, d=descriptors, m=month: t.assess_sledai(
                sid(), at_ + timedelta(minutes=30), d, signer=s["investigator"], visit=f"M{m}"
            ),
        )
        story.add(
            assessed + timedelta(minutes=5),
            f"{number} M{month} renal response",
            lambda at_=assessed, m=month: t.assess_renal_response(sid(), at_, signer=s["investigator"], visit=f"M{m}"),
        )
        story.add(
            assessed + timedelta(minutes=10),
            f"{number} M{month} team",
            lambda at_=visit_at, m=month: t.record_team_evaluation(
                sid(),
                at_ + timedelta(hours=1),
                signer=s["investigator"],
                disciplines=["rheumatology", "haematology", "bmt"],
                assessment=f"M{m}: course reviewed",
                visit=f"M{m}",
            ),
        )
        # adverse events of the month
        if sae_forced and month == 3:
            plan_ae(
                demo,
                story,
                sid,
                number,
                next(ae_count),
                "pneumonia (infection)",
                visit_at + timedelta(days=5),
                ae_rng,
                grade=3,
                serious=["hospitalisation"],
                related=("possible", "unlikely"),
            )
        elif ae_rng.chance(0.08 if month <= 3 else 0.03):
            term, grade, serious = ae_rng.pick(
                [
                    (("upper respiratory tract infection", 1 + ae_rng.chance(0.6), None), 40),
                    (("pneumonia (infection)", 3, ["hospitalisation"]), 10),
                    (("herpes zoster (infection)", 2, None), 12),
                    (("headache", 1, None), 20),
                    (("arthralgia", 1, None), 18),
                ]
            )
            plan_ae(
                demo,
                story,
                sid,
                number,
                next(ae_count),
                term,
                visit_at + timedelta(days=ae_rng.uniform(1, 20)),
                ae_rng,
                grade=grade,
                serious=serious,
                related=("unlikely", "unlikely"),
            )


def _swap_last_digits(text: str) -> str:
    """A transcription error: the last two digits swapped (1.38 → 1.83)."""
    places = [i for i, ch in enumerate(text) if ch.isdigit()]
    if len(places) < 2:
        return text
    chars = list(text)
    a, b = places[-2], places[-1]
    chars[a], chars[b] = chars[b], chars[a]
    return "".join(chars)


def _plausible(code: str, value: str) -> bool:
    from sle_events.domain.bounds import check_lab_value

    try:
        check_lab_value(code, value, UNITS[code])
        return True
    except E.ProtocolViolation:
        return False


def _entered(sid: Callable[[], UUID]) -> bool:
    """Whether a planned subject's screening was entered (before the data cut)."""
    try:
        sid()
    except KeyError:
        return False
    return True


def _open_ae(trial: Trial, subject: UUID) -> str:
    return [a.ae_id for a in trial.subject(subject).adverse_events.values() if a.serious and a.open][-1]


# =========================================================================== monitoring: SDV and queries
def review_acts(
    demo: Demo, sim: domain_clock.SimulatedClock, start: datetime, enrolled: list[UUID], refused: dict[str, int]
) -> None:
    """A monitoring visit after the data cut (sle_events/domain/review.py): automatic queries from the record,
    SDV of the first subject's whole record and of the second's M1, a query answered and a correction made
    after SDV (changed since verified, then verified again), queries in every state (open, answered, closed,
    re-opened, an automatic one closed because its cause is gone, one closed by the data manager), and two
    acts refused (SDV of data that does not exist, answering a closed query)."""
    from sle_events.domain.review import facts_of_visit

    trial, who = demo.trial, demo.signers
    monitor, dm, checks, lab = who["monitor"], who["data_manager"], who["checks"], who["lab"]
    a, b = enrolled[0], enrolled[1 % len(enrolled)]

    def at(days: int, hour: int) -> datetime:
        when = start + timedelta(days=days, hours=hour)
        sim.set(when)
        return when

    def query_id(n: int) -> UUID:  # deterministic, so the demo's digest is
        return uuid5(DEMO_NAMESPACE, f"query/{demo.seed}/{n}")

    def creatinines(sid: UUID) -> list[int]:
        return [v for v, r in trial.subject(sid).records("LabResultRecorded") if getattr(r, "code", "") == "CREAT"]

    def refuse(kind: type[Exception], run: Callable[[], Any]) -> None:
        try:
            run()
        except kind as exc:
            refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
        else:
            raise RuntimeError(f"the demo's monitoring act should have been refused with {kind.__name__}")

    def corrected_value(sid: UUID, version: int) -> str:
        lab = cast(LabResult, trial.subject(sid).facts[version].record)  # a creatinine: a LabResultRecorded
        value = Decimal(str(lab.value))
        return str(value + Decimal("0.01"))

    at(1, 9)
    trial.run_automatic_queries(signer=checks)
    at(1, 10)
    trial.verify_source(a, [f.version for f in trial.sdv_status(a)], signer=monitor)
    cb = creatinines(b)[min(1, len(creatinines(b)) - 1)]
    at(1, 11)
    trial.verify_source(b, sorted({cb, *facts_of_visit(trial.subject(b), "M1")}), signer=monitor)
    refuse(E.UnknownFact, lambda: trial.verify_source(a, [trial.subject(a).version + 100], signer=monitor))
    at(1, 12)
    q1 = trial.raise_query(
        b, cb, "Creatinine differs from the lab report in the source.", field="value", query_id=query_id(1),
        signer=monitor,
    )  # fmt: skip
    vitals = [v for v, _ in trial.subject(a).records("VitalSignsRecorded")]
    q2 = trial.raise_query(
        a, vitals[0] if vitals else 1, "Weight not found in the source notes.", query_id=query_id(2), signer=monitor
    )
    q3 = trial.raise_query(a, 1, "Screening date before the ICF date on file?", query_id=query_id(3), signer=dm)
    at(2, 9)
    trial.answer_query(q1, "Transcription error: corrected from the lab report.", signer=who["coordinator"])
    trial.correct(b, cb, {"value": corrected_value(b, cb)}, "transcription error", signer=lab)  # after SDV
    at(2, 10)
    trial.answer_query(q2, "Weight is in the nursing chart, page 3.", signer=who["investigator"])
    trial.answer_query(q3, "ICF signed the same morning, before screening.", signer=who["coordinator"])
    at(3, 9)
    trial.verify_source(b, [cb], signer=monitor)  # the corrected fact verified again
    trial.close_query(q1, "Correction verified against the source.", signer=monitor)
    at(3, 10)
    trial.close_query(q2, "Seen in the nursing chart.", signer=monitor)
    at(3, 11)
    trial.reopen_query(q2, "The chart page shows height, not weight.", signer=monitor)
    refuse(E.QueryStateConflict, lambda: trial.answer_query(q1, "late", signer=who["coordinator"]))
    ca = creatinines(a)[-1]
    at(3, 12)
    trial.correct(a, ca, {"value": corrected_value(a, ca)}, "transcription error", signer=lab)  # not re-verified
    at(4, 9)  # the showcase's stale eGFR is derived again: its automatic query closes itself
    for stale in trial.subject(a).stale_results():
        if stale["type"] == "DerivedResultRecorded" and stale["code"] == "EGFR":
            trial.derive_egfr_again(a, stale["changed_inputs"][0], signer=lab)
    at(4, 10)
    trial.run_automatic_queries(signer=checks)
    at(4, 11)
    window = [q for q in trial.open_queries() if q.cause and "VISIT_OUT_OF_WINDOW" in q.cause]
    if window:
        trial.close_query(window[0].id, "Visit date confirmed with the site: a deviation.", signer=dm)


# =========================================================================== running it
def run_demo(
    record: StudyRecord,
    key_dir: Path,
    *,
    subjects: int = 30,
    seed: int = 20070311,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Record a synthetic trial of ``subjects`` enrolled subjects into ``record``; deterministic for ``seed``."""
    signers = demo_signers(key_dir)
    sim = domain_clock.SimulatedClock(STUDY_START - timedelta(days=60))
    data_cut = (STUDY_START + timedelta(days=30 * DATA_CUT_MONTHS)).astimezone(UTC)
    store_clock = record.clock
    record.clock = sim
    try:
        with domain_clock.use_clock(sim):
            return _run(record, signers, sim, data_cut, subjects, seed, on_progress)
    finally:
        record.clock = store_clock


def _run(
    record: StudyRecord,
    signers: dict[str, Signer],
    sim: domain_clock.SimulatedClock,
    data_cut: datetime,
    subjects: int,
    seed: int,
    on_progress: Callable[[int, int], None] | None,
) -> DemoResult:
    people = [(signers[n], PRINTED_NAMES.get(n)) for n in PEOPLE if n != "admin"]
    setup_at = STUDY_START - timedelta(days=60)
    study_id = uuid5(DEMO_NAMESPACE, f"ALLOMSC-SLE/{seed}/{subjects}")
    trial = Trial.create(
        record,
        code="ALLOMSC-SLE",
        title="AlloMSC for refractory SLE with lupus nephritis (NCT00698191)",
        admin=signers["admin"],
        people=people,
        occurred_at=setup_at,
        study_id=study_id,
        admin_printed_name="Zhou Min",
    )
    dm = signers["data_manager"]
    sites = SITES[:1] if subjects <= 50 else SITES
    for site_id, name, zone in sites:
        trial.add_site(site_id, name, zone, signer=dm, occurred_at=setup_at)
    new_icf = (STUDY_START + timedelta(days=30 * 20)).replace(hour=0, minute=0)
    icf = [
        ("ICF v1.0", STUDY_START - timedelta(days=30)),
        ("ICF v1.1", new_icf),
    ]  # a safety update: active subjects re-consent before their next procedure
    trial.approve_icf_version(icf[0][0], icf[0][1], signer=dm, occurred_at=setup_at)
    plan = Plan(data_cut)
    demo = Demo(trial, signers, plan, seed, icf)
    plan.add(
        icf[1][1] - timedelta(days=14),
        "ICF v1.1 approved",
        lambda: trial.approve_icf_version(icf[1][0], icf[1][1], signer=dm, occurred_at=icf[1][1] - timedelta(days=14)),
    )

    # the screening funnel: screen until `subjects` are enrolled (≈ 28 % of the screened never enrol)
    enrolled, screened, k = 0, 0, 0
    dates = screening_dates(seed, max(1, round(subjects / 0.72)) + 8)
    showcase = 0
    enrolled_ids: list[Any] = []  # each enrolled subject's id, when its screening has been entered
    while enrolled < subjects:
        k += 1
        day = dates[min(k - 1, len(dates) - 1)] + timedelta(days=max(0, k - len(dates)))
        while day.weekday() >= 5:
            day += timedelta(days=1)
        site = sites[(k - 1) % len(sites)]
        enrol = not Rng(seed, k, "screen").chance(0.28) or k > 3 * subjects
        screened += 1
        planned = plan_screening(demo, k, day, site, enrol=enrol)
        number = f"{site[0]}-{k:04d}"
        if planned is not None and not enrol:  # a lab screen failure re-screened once
            old_sid, _old_story, failed_at = planned
            k2 = 10_000 + k
            later = (failed_at + timedelta(days=30)).date()
            while later.weekday() >= 5:
                later += timedelta(days=1)
            screened += 1
            again = plan_screening(demo, k2, later, site, enrol=True, rescreen_of=old_sid)
            if again is None:
                continue
            planned, number, k_used = again, f"{site[0]}-{k2:04d}", k2
        else:
            k_used = k
        if planned is None:
            continue
        sid, story, eligible_at = planned
        enrolled += 1
        if showcase == 0:
            showcase = k_used
        plan_treatment(demo, k_used, sid, story, eligible_at, number, showcase)
        enrolled_ids.append(sid)

    # replay every command in the order it was entered, on the simulated clock
    commands = sorted(plan.commands)
    refused: dict[str, int] = {}
    for i, c in enumerate(commands):
        sim.set(c.recorded_at)
        if c.expect is None:
            try:
                c.run()
            except (E.ProtocolViolation, AppendRejected) as exc:
                raise RuntimeError(f"demo command {c.label!r} at {c.recorded_at} was refused: {exc}") from exc
        else:
            try:
                c.run()
            except c.expect as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
            else:
                raise RuntimeError(f"demo command {c.label!r} should have been refused with {c.expect.__name__}")
        if on_progress and (i % 250 == 0 or i == len(commands) - 1):
            on_progress(i + 1, len(commands))

    screened_ids = [f() for f in enrolled_ids if _entered(f)]
    review_acts(demo, sim, max(data_cut, domain_clock.now()), screened_ids, refused)  # SDV and queries
    result = DemoResult(
        str(study_id), enrolled, 0, screened=screened, refused_as_expected=refused, backlog=plan.backlog
    )
    digest = hashlib.sha256()
    for stream in _all_streams(record, study_id):
        for e in record.stream(stream):
            name = type_name(e.topic)
            result.events_by_type[name] = result.events_by_type.get(name, 0) + 1
            result.events += 1
            if not name.startswith("Study.Key") and name != "Study.Created":
                env = {k: v for k, v in e.envelope.items() if k not in ("key", "prev")}
                if name == "SourceVerification.Verified":  # a mark's hash is of signed bytes: other keys, other hash
                    items = [{k: v for k, v in i.items() if k != "hash"} for i in env["payload"]["items"]]
                    env["payload"] = {**env["payload"], "items": items}
                digest.update(json.dumps(env, sort_keys=True).encode())
    result.digest = digest.hexdigest()
    return result


def _all_streams(record: StudyRecord, study_id: UUID) -> list[UUID]:
    """Every stream of this study: the study's and those whose first event names it, in log order."""
    import sqlalchemy as sa

    t = record.table
    engine = cast(Any, record.recorder).datastore.engine  # eventsourcing-sqlalchemy's recorder, typed as the base
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.originator_id, t.c.state).where(t.c.originator_version == 1).order_by(t.c.id)
        ).all()
    from sle_events.signing.envelope import open_stored

    out = []
    for stream, state in rows:
        if open_stored(bytes(state)).envelope["study"] == str(study_id):
            out.append(stream)
    return out


# =========================================================================== the demo's ledger
LOG_KEY_FILE = "log.key"


def setup_demo_ledger(url: str, key_dir: Path) -> str:
    """Give the demo record its ledger: a log key in ``key_dir`` (0600, made once), every event integrated and a
    signed checkpoint, so a newcomer can export and prove straight away. Returns the log's vkey."""
    from sle_events.ledger.log import Ledger, create_log_key, default_origin, load_log_key

    path = key_dir / LOG_KEY_FILE
    signer = load_log_key(path) if path.exists() else create_log_key(path, default_origin(url))
    with Ledger(url) as ledger:
        ledger.integrate()
        ledger.checkpoint(signer)
    return str(signer.vkey)
