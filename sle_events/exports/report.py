"""The PDF report an inspector reads and files (reportlab; plots with matplotlib).

Front matter: the scope, the last `sle verify` result (and whether a verifier's key sealed it), the ledger
checkpoint the export stands on and the key registry (who signs, in which role, with which key). The study
report then summarises enrolment, visit compliance, adverse events and renal / SLEDAI-2K response. Per subject:
the timeline (consent, cyclophosphamide, infusion, visits, AEs, exit), plots of eGFR, UPCR, anti-dsDNA, C3/C4
and Treg % against days from the AlloMSC infusion with the transplant and visit markers, and the audit trail
(who, role, recorded and occurred, what, old → new, why, signature status).

Audit trail detail: `audit="all"` lists every recorded fact (one row per event, its values on one line) and
every correction and void field by field; `audit="changes"` only the corrections and voids (the study-wide
default: a 300-subject record holds ~1.6 million recorded values, which no one reads on paper; the subject
report holds them all).

Deterministic: the same data give the same bytes. reportlab runs in invariant mode with the creation date taken
from the data (the newest event's recorded time), and the plots are PNGs drawn by Agg with no
metadata. One figure is reused for every subject (creating a figure is most of matplotlib's cost).
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from projections.patient_state import lab_series
from sle_events.exports.acts import SubjectActs, read_acts
from sle_events.exports.manifest import ExportCheckpoint
from sle_events.exports.scope import ExportScope
from sle_events.exports.source import ExportSource, SubjectData, partial, progress_counter, publish

__all__ = ["write_report", "export_report", "PLOTS", "AUDIT_DETAIL"]

AUDIT_DETAIL = ("all", "changes")
#: the plots of each subject: (title, [(label, analyte code)], y unit)
PLOTS = (
    ("eGFR", [("eGFR", "EGFR")], "mL/min/1.73 m²"),
    ("UPCR", [("UPCR", "UPCR")], "mg/mg"),
    ("anti-dsDNA", [("anti-dsDNA", "DSDNA")], "IU/mL"),
    ("C3 / C4", [("C3", "C3"), ("C4", "C4")], "mg/dL"),
    ("Treg %", [("Treg", "TREGPCT")], "% of CD4+"),
)
DPI = 90
#: the fields a reader looks for first in a recorded fact's one-line summary (the rest follow in their order)
FIRST_FIELDS = ("code", "value", "unit", "flag", "visit", "term", "grade", "total", "status", "treg_pct")
ROWS_PER_TABLE = 60  # long tables in chunks: reportlab splits one huge table in quadratic time


# ------------------------------------------------------------------------------------------------ plots
class _Plotter:
    """One matplotlib figure of five panels whose lines are given each subject's data in turn: creating
    figures, axes, lines and tight layouts is most of matplotlib's cost, redrawing the same artists is not."""

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # a fixed title height and the unit in the title (no y label): matplotlib otherwise measures every tick
        # label on every draw to place them, a third of the plot's cost
        plt.rcParams.update({"svg.hashsalt": "sle-report", "font.size": 7, "axes.titlesize": 8, "axes.titley": 1.0})
        self.plt = plt
        self.fig, axes = plt.subplots(1, len(PLOTS), figsize=(11.0, 2.1), dpi=DPI)
        self.fig.subplots_adjust(left=0.05, right=0.99, bottom=0.2, top=0.88, wspace=0.38)
        self.axes = list(axes)
        from matplotlib.collections import LineCollection

        self.lines: list[list[Any]] = []
        self.empty: list[Any] = []
        self.markers: list[tuple[Any, Any, Any]] = []
        for ax, (title, lines, unit) in zip(self.axes, PLOTS, strict=True):
            ax.set_title(f"{title}, {unit}")
            ax.xaxis.set_label_coords(0.5, -0.17)  # below the tick labels, whose height never changes
            ax.grid(True, linewidth=0.3, alpha=0.5)
            self.lines.append(
                [ax.plot([], [], marker="o", markersize=2.2, linewidth=1.0, label=label)[0] for label, _ in lines]
            )
            if len(lines) > 1:
                ax.legend(loc="upper right", fontsize=6, frameon=False)
            self.empty.append(
                ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes, color="#888888")
            )
            # the visit and transplant markers: x in days, y across the panel; their segments change per subject
            trans = ax.get_xaxis_transform()
            visits = LineCollection([], transform=trans, colors="#999999", linestyles=":", linewidths=0.5)
            tx = LineCollection([], transform=trans, colors="#c0392b", linestyles="--", linewidths=1.0)
            label = ax.text(0, 1.0, " TX", color="#c0392b", fontsize=6, transform=trans, va="top", clip_on=True)
            self.markers.append((ax.add_collection(visits, autolim=False), ax.add_collection(tx, autolim=False), label))

    def png(self, series: dict[str, list[tuple[float, float]]], markers: list[tuple[float, str]], xlabel: str) -> bytes:
        visits = [[(day, 0), (day, 1)] for day, label in markers if label != "TX"]
        tx = [[(day, 0), (day, 1)] for day, label in markers if label == "TX"]
        days = (min(d for d, _ in markers), max(d for d, _ in markers)) if markers else None
        for ax, lines, (_, wanted, _), (visit_lines, tx_lines, tx_label) in zip(
            self.axes, self.lines, PLOTS, self.markers, strict=True
        ):
            ax.set_xlabel(xlabel)
            drawn = False
            for line, (_, code) in zip(lines, wanted, strict=True):
                points = series.get(code) or []
                line.set_data([p[0] for p in points], [p[1] for p in points])
                drawn = drawn or bool(points)
            self.empty[self.axes.index(ax)].set_visible(not drawn)
            ax.set_autoscale_on(True)  # an empty panel before fixed its limits
            ax.relim()
            ax.autoscale_view()
            if not drawn:
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
            elif days:  # the markers widen the days shown (they are not data, so autoscaling leaves them out)
                lo, hi = ax.get_xlim()
                pad = 0.05 * (max(hi, days[1]) - min(lo, days[0]))
                ax.set_xlim(min(lo, days[0] - pad), max(hi, days[1] + pad))
            visit_lines.set_segments(visits)
            tx_lines.set_segments(tx)
            tx_label.set_visible(bool(tx))
            if tx:
                tx_label.set_x(tx[0][0][0])
        self.fig.canvas.draw()
        from PIL import Image as PILImage

        # RGB without the alpha channel (no soft mask beside each plot in the PDF), encoded once
        canvas: Any = self.fig.canvas  # Agg: it has the pixel buffer
        rgba = PILImage.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
        buf = io.BytesIO()
        rgba.convert("RGB").save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    def close(self) -> None:
        self.plt.close(self.fig)


def _series(s: SubjectData) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, str]], str]:
    """Each plotted analyte's (day from the infusion, canonical value), the transplant and visit markers, and
    what day 0 is (the AlloMSC infusion; for a subject never infused, cyclophosphamide or screening)."""
    a = s.aggregate
    if a.msc is not None:
        origin, name = a.msc.occurred_at, "AlloMSC infusion"
    elif a.cyc is not None:
        origin, name = a.cyc.occurred_at, "cyclophosphamide"
    else:
        origin, name = a.screened_at, "screening"

    def day(when: datetime) -> float:
        return (when - origin).total_seconds() / 86400

    # the web view's series (projections.patient_state.lab_series: canonical units, by clinical time, so a result
    # recorded late such as a re-derived eGFR is not drawn doubling back), of the items in the export's scope
    wanted = {code for _, lines, _ in PLOTS for _, code in lines}
    kinds = ("LabResultRecorded", "DerivedResultRecorded", "TregPanelRecorded")
    found = lab_series({kind: [i.record for i in s.of(kind)] for kind in kinds})
    series = {code: [(day(at), float(value)) for at, value, _, _ in found[code]] for code in wanted if code in found}
    markers = [(day(i.occurred_at), i.record.visit) for i in s.of("VisitRecorded")]
    if a.msc is not None:
        markers.append((0.0, "TX"))
    return series, markers, name


# ------------------------------------------------------------------------------------------------ text
def _styles() -> dict[str, Any]:
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    return {
        "title": base["Title"],
        "h1": base["Heading1"],
        "h2": base["Heading2"],
        "body": base["BodyText"],
        "small": ParagraphStyle("small", parent=base["BodyText"], fontSize=7, leading=8.5),
        "mono": ParagraphStyle("mono", parent=base["Code"], fontSize=6.5, leading=8),
    }


def _latin(text: Any) -> str:
    """Text the standard PDF fonts can show (their encoding is Latin-1: → and ² are spelled out)."""
    s = "" if text is None else str(text)
    s = s.replace("→", "->").replace("²", "2").replace("µ", "u").replace("–", "-").replace("—", "-")
    return s.encode("latin-1", "replace").decode("latin-1")


def _esc(text: Any) -> str:
    return _latin(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _table(header: list[str], rows: list[list[Any]], widths: Sequence[float], font: float = 7) -> list[Any]:
    """A table in chunks of ROWS_PER_TABLE rows, each repeating the header, as plain strings (fast)."""
    from reportlab.lib import colors
    from reportlab.platypus import Table, TableStyle

    style = TableStyle(
        [
            ("FONT", (0, 0), (-1, -1), "Helvetica", font),
            ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", font),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef4")),
            ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.HexColor("#cccccc")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TOPPADDING", (0, 0), (-1, -1), 1),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
        ]
    )
    if not rows:
        rows = [["(none)"] + [""] * (len(header) - 1)]
    out = []
    for start in range(0, len(rows), ROWS_PER_TABLE):
        chunk = [
            [_fit(_latin(c), w - 4, font) for c, w in zip(r, widths, strict=False)]
            for r in rows[start : start + ROWS_PER_TABLE]
        ]
        out.append(Table([header, *chunk], colWidths=widths, repeatRows=1, style=style, hAlign="LEFT"))
    return out


def _fit(text: str, width: float, font: float) -> str:
    """Text cut to what fits in a column (plain table cells do not wrap: they would run into the next one)."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    if stringWidth(text, "Helvetica", font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with its "..."
        mid = (lo + hi + 1) // 2
        if stringWidth(text[:mid] + "...", "Helvetica", font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..."


def _clip(text: Any, n: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 3] + "..."


def _short_time(text: str | None) -> str:
    return "" if not text else text[:16].replace("T", " ")


def _value(text: Any) -> str:
    """Long decimals (derived results keep every digit) shortened for reading."""
    s = "" if text is None else str(text)
    if len(s) > 12 and s.replace(".", "", 1).replace("-", "", 1).isdigit():
        return f"{float(s):.4g}"
    return s


# ------------------------------------------------------------------------------------------------ sections
def _front(source: ExportSource, st: dict[str, Any], checkpoint: Any, data_time: datetime) -> list[Any]:
    from reportlab.platypus import Paragraph, Preformatted, Spacer

    from projections.audit_trail import last_verification

    study = source.study
    story: list[Any] = [
        Paragraph(_esc(f"{study.title}"), st["title"]),
        Paragraph(
            _esc(
                f"Study {study.code}. Report of {source.scope.describe()}: {len(source)} subject(s). Data as of "
                f"{data_time.isoformat()} (the newest event shown)."
            ),
            st["body"],
        ),
        Paragraph("Verification", st["h1"]),
    ]
    with source.reader.engine.connect() as conn:
        last = last_verification(conn)
    if last is None:
        text = "sle verify has never been run on this record: run it (with --sign-key) before filing this report."
    else:
        found = sum(len(k) for k in last["findings_by_position"].values())
        result = (
            "VERIFIED: every signature, key, role, chain and ledger leaf held"
            if last["ok"]
            else (f"FAILED with {found} finding(s) at {len(last['findings_by_position'])} log position(s)")
        )
        seal = f"UNVERIFIABLE result ({last['unverifiable']})" if last["unverifiable"] else "sealed by a verifier's key"
        text = f"Last full verification (sle verify) at {last['run_at']}: {result}; {seal}."
    story.append(Paragraph(_esc(text), st["body"]))
    how = (
        f"Signatures of the events in this report: {source.vouch.describe()}; newer events were checked one by one."
        if source.vouch is not None
        else "Signatures of the events in this report: each checked one by one as it was read (no sealed, clean "
        "verification vouches for the ledger's tree)."
    )
    story.append(Paragraph(_esc(how), st["body"]))

    story.append(Paragraph("Ledger checkpoint", st["h1"]))
    if checkpoint is None:
        story.append(Paragraph("This record has no signed ledger checkpoint.", st["body"]))
    else:
        story.append(
            Paragraph(
                _esc(
                    f"The export covers the {checkpoint['size']} events of this signed checkpoint (RFC 9162 tree, "
                    "C2SP signed note); check it with the log's vkey: sle export verify."
                ),
                st["body"],
            )
        )
        story.append(Preformatted(_latin(checkpoint["note"]).strip(), st["mono"]))

    story.append(Paragraph("Key registry", st["h1"]))
    rows = [
        [k["key"], k["actor"], k.get("printed_name") or "(service)", k["role"], k["status"]]
        for k in sorted(study.keys.values(), key=lambda k: (k["role"], k["actor"], k["key"]))
    ]
    story += _table(["key", "user id", "printed name", "role", "status"], rows, [90, 130, 130, 90, 70])
    story.append(Spacer(1, 6))
    return story


def _study_summary(source: ExportSource, st: dict[str, Any]) -> list[Any]:
    from reportlab.platypus import Paragraph

    d = source.reader.dashboard()
    patients = source.rows
    story: list[Any] = [Paragraph("Study summary", st["h1"]), Paragraph("Enrolment by site and status", st["h2"])]
    story += _table(
        ["site", "status", "subjects"],
        [[r["site"], r["status"], r["subjects"]] for r in d["enrollment"]],
        [80, 150, 60],
    )
    story.append(Paragraph("Visit compliance", st["h2"]))
    by_visit: dict[str, dict[str, int]] = defaultdict(dict)
    for r in d["visit_compliance"]:
        by_visit[r["visit"]][r["outcome"]] = r["visits"]
    outcomes = sorted({o for v in by_visit.values() for o in v})
    story += _table(
        ["visit", *outcomes],
        [[v, *[str(c.get(o, 0)) for o in outcomes]] for v, c in by_visit.items()],
        [60] + [80] * len(outcomes),
    )
    story.append(Paragraph("Adverse events by CTCAE grade", st["h2"]))
    story += _table(
        ["grade", "events", "serious", "open"],
        [[r["grade"], r["events"], r["serious"], r["open"]] for r in d["adverse_events_by_grade"]],
        [60, 60, 60, 60],
    )
    story.append(Paragraph("Renal response (latest assessment) and SLEDAI-2K", st["h2"]))
    response: dict[str, int] = defaultdict(int)
    sledai: list[int] = []
    for p in patients:
        response[p["renal_response"] or "not assessed"] += 1
        if p["sledai_total"] is not None:
            sledai.append(int(p["sledai_total"]))
    rows = [[k, str(v)] for k, v in sorted(response.items())]
    if sledai:
        sledai.sort()
        rows.append(["SLEDAI-2K latest, median (range)", f"{sledai[len(sledai) // 2]} ({sledai[0]}-{sledai[-1]})"])
    story += _table(["renal response", "subjects"], rows, [200, 120])
    return story


def _timeline(s: SubjectData) -> list[list[str]]:
    names = {
        "Screened": "screened",
        "ConsentObtained": "consent",
        "ScreenFailed": "screen failure",
        "EligibilityConfirmed": "eligibility confirmed",
        "Enrolled": "enrolled",
        "Admitted": "admitted",
        "CyclophosphamideGiven": "cyclophosphamide",
        "MSCInfused": "AlloMSC infusion",
        "TransplantNotPerformed": "transplant not performed",
        "Discharged": "discharged",
        "VisitRecorded": "visit",
        "VisitMissed": "visit missed",
        "UnscheduledVisitRecorded": "unscheduled visit",
        "AdverseEventReported": "adverse event",
        "SeriousAdverseEventReported": "SAE reported",
        "Withdrawn": "withdrawn",
        "LostToFollowUp": "lost to follow-up",
        "Returned": "returned",
        "DeathRecorded": "death",
        "MainStudyCompleted": "main study completed",
        "StudyCompleted": "study completed",
    }
    rows = []
    for i in s.items:
        if i.type not in names:
            continue
        p, r = i.payload, i.record
        detail = ""
        if i.type == "ConsentObtained":
            detail = f"{p['icf_version']}{' (re-consent)' if p.get('reconsent') else ''}"
        elif i.type == "CyclophosphamideGiven":
            detail = f"{r.administered_mg} mg ({r.prescribed_mg_per_m2} mg/m2 x BSA {r.bsa_m2}), lot {r.lot}"
        elif i.type == "MSCInfused":
            detail = f"{float(r.dose_1e6_per_kg):.2f} x10^6 cells/kg, lot {r.lot_id}"
        elif i.type in ("VisitRecorded", "VisitMissed"):
            visit = r.visit if r is not None else p["visit"]
            detail = visit + ("" if r is None or r.in_window else " (out of window)")
        elif i.type == "AdverseEventReported":
            ae = s.aggregate.adverse_events.get(r.ae_id)
            grade = f", grade {ae.grade}" if ae and ae.grade else ""
            detail = f"{r.ae_id} {r.term}{grade}{' SERIOUS' if ae and ae.serious else ''}"
        elif i.type in ("ScreenFailed", "Withdrawn", "TransplantNotPerformed"):
            detail = p.get("reason") or ""
        elif i.type == "UnscheduledVisitRecorded":
            detail = p.get("purpose") or ""
        elif i.type == "DeathRecorded":
            detail = p.get("cause") or ""
        rows.append([i.occurred_at.isoformat(timespec="minutes").replace("T", " "), names[i.type], _clip(detail, 90)])
    return rows


def _audit_rows(rows: list[dict[str, Any]], detail: str) -> list[list[str]]:
    """Audit trail rows for print: a recorded fact on one line, corrections and voids field by field."""
    out: list[list[str]] = []
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    order: list[tuple[str, str | None]] = []
    for r in rows:
        if r["change"] == "recorded":
            if detail != "all":
                continue
            if r["event_id"] not in grouped:
                order.append((r["event_id"], None))
            grouped[r["event_id"]].append(r)
        else:
            order.append((r["event_id"], f"{r['event_id']}/{r['seq']}"))
            grouped[f"{r['event_id']}/{r['seq']}"].append(r)
    for event_id, one in order:
        group = grouped[one or event_id]
        r = group[0]
        who = f"{r['printed_name']} ({r['actor']})" if r["printed_name"] != r["actor"] else r["actor"]
        if one is None:
            what = r["form"].split(".", 1)[-1] + (f" {r['visit']}" if r["visit"] else "")
            shown = sorted(group, key=lambda g: FIRST_FIELDS.index(g["field"]) if g["field"] in FIRST_FIELDS else 99)
            values = "; ".join(f"{g['field']}={_value(g['new_value'])}" for g in shown if g["new_value"] is not None)
            change = _clip(values, 110)
        else:
            what = f"{r['change']}: {r['item']}"
            change = f"{_value(r['old_value'])} -> {_value(r['new_value'])}"
        status = "verified at append" if r["signature_status"] == "verified_at_append" else r["signature_status"]
        lv = r.get("last_verification") or ""
        if lv.startswith("FAILED"):
            status += f"; {lv}"
        out.append(
            [
                _short_time(r["recorded_at"]),
                _short_time(r["occurred_at"]),
                _clip(who, 30),
                r["role"],
                _clip(what, 48),
                change,
                _clip(r["reason"] or "", 40),
                _clip(status, 34),
            ]
        )
    return out


_plotter: _Plotter | None = None  # one figure per process, reused for every subject


def subject_part(source: ExportSource, s: SubjectData) -> dict[str, Any]:
    """What the report shows of one subject apart from its audit trail: run in the export's worker processes
    (reading and folding the subject and drawing its plots are most of the report's time)."""
    global _plotter
    if _plotter is None:
        _plotter = _Plotter()
    series, markers, origin = _series(s)
    return {
        "screening_number": s.screening_number,
        "stream": s.stream,
        "heading": f"Site {s.site}; status {s.aggregate.status.value}; {len(s.facts)} signed events "
        f"(stream {s.stream}). Times are site-local with their UTC offset in the timeline, UTC in the audit trail.",
        "png": _plotter.png(series, markers, f"days from {origin}"),
        "timeline": _timeline(s),
        "newest": max(datetime.fromisoformat(f.envelope["recorded_at"]) for f in s.facts),
    }


def _signoff_status(so: Any) -> str:
    return "INVALIDATED by change - needs re-signing" if so.invalidated_by else "valid"


def _acts_section(acts: SubjectActs, sdv: dict[str, Any] | None, st: dict[str, Any]) -> list[Any]:
    """Sign-offs (valid or invalidated, never dropped), the lock state, SDV progress and open queries."""
    from reportlab.platypus import Paragraph

    level = acts.level or "open (neither frozen nor locked)"
    if sdv and sdv["total"]:
        progress = (
            f"{sdv['VERIFIED']} of {sdv['total']} source facts verified ({sdv['verified_pct']} %), "
            f"{sdv['CHANGED_SINCE_VERIFIED']} changed since verified, {sdv['PARTIAL']} partly, "
            f"{sdv['PENDING']} pending"
        )
    else:
        progress = "no source data to verify"
    open_q = {k: q for k, q in acts.queries.items() if q["status"] != "CLOSED"}
    story: list[Any] = [
        Paragraph("Sign-off, lock, source data verification and queries", st["h2"]),
        Paragraph(
            _esc(f"Casebook: {level}. SDV: {progress}. Queries: {len(open_q)} not closed of {len(acts.queries)}."),
            st["small"],
        ),
    ]
    rows = [
        [
            so.scope if so.scope == "casebook" else f"visit {so.visit}",
            f"{so.meaning} ({so.signature_def})",
            f"{so.printed_name} ({so.actor})",
            _short_time(so.signed_at) + so.signed_at[19:],
            _clip(_signoff_status(so), 90),
        ]
        for so in acts.signoffs
    ]
    if rows:
        story += _table(["signed", "meaning", "by", "when (site time)", "status"], rows, [70, 140, 140, 100, 320])
    else:
        story.append(Paragraph("Not signed by the investigator.", st["small"]))
    for so in acts.signoffs:  # never dropped: what invalidated it, and where that change is in the ledger
        if so.invalidated_by:
            why = f": {so.invalidated_reason}" if so.invalidated_reason else ""
            story.append(
                Paragraph(
                    _esc(f"Sign-off of {_short_time(so.signed_at)} invalidated by change at {so.invalidated_by}{why}"),
                    st["small"],
                )
            )
    if open_q:
        story += _table(
            ["query on", "raised (UTC)", "by", "question", "status", "last act"],
            [
                [
                    f"v{q['version']}" + (f" {q['field']}" if q["field"] else ""),
                    _short_time(q["raised_at"]),
                    q["raised_by"],
                    _clip(q["text"], 60),
                    q["status"],
                    _clip(f"{q['last'][0]} by {q['last'][1]}: {q['last'][2]}", 60) if q["last"] else "",
                ]
                for q in open_q.values()
            ],
            [60, 70, 90, 250, 60, 240],
        )
    return story


def _acts_summary(
    acts: dict[str, SubjectActs], streams: list[str], sdv: dict[str, Any], st: dict[str, Any]
) -> list[Any]:
    """Counts over the subjects in the report."""
    from reportlab.platypus import Paragraph

    status: dict[str, int] = defaultdict(int)
    locks: dict[str, int] = defaultdict(int)
    queries: dict[str, int] = defaultdict(int)
    for stream in streams:
        a = acts.get(stream) or SubjectActs()
        casebook = [so for so in a.signoffs if so.scope == "casebook"]
        if any(not so.invalidated_by for so in casebook):
            status["signed (valid casebook sign-off)"] += 1
        elif casebook:
            status["invalidated by change - needs re-signing"] += 1
        else:
            status["not signed"] += 1
        status["invalidated sign-offs (any scope)"] += sum(1 for so in a.signoffs if so.invalidated_by)
        locks[a.level or "open"] += 1
        for q in a.queries.values():
            queries[q["status"]] += 1
    total = sum(g["total"] for g in sdv.values())
    verified = sum(g["VERIFIED"] for g in sdv.values())
    rows = [[k, str(v)] for k, v in sorted(status.items())]
    rows += [[f"casebook {k}", str(v)] for k, v in sorted(locks.items())]
    rows += [[f"queries {k}", str(queries.get(k, 0))] for k in ("OPEN", "ANSWERED", "CLOSED")]
    rows.append(["source facts verified", f"{verified} of {total}"])
    return [Paragraph("Sign-off, lock, SDV and queries", st["h2"]), *_table(["", "subjects / count"], rows, [260, 120])]


def _subject_section(
    part: dict[str, Any],
    st: dict[str, Any],
    audit: list[dict[str, Any]],
    detail: str,
    acts: list[Any] | None = None,
) -> list[Any]:
    from reportlab.platypus import CondPageBreak, Image, Paragraph

    story: list[Any] = [
        CondPageBreak(200),
        Paragraph(_esc(f"Subject {part['screening_number']}"), st["h1"]),
        Paragraph(_esc(part["heading"]), st["small"]),
        *(acts or []),
        Paragraph("Lab trends (red dashed: AlloMSC infusion; dotted: visits)", st["h2"]),
        Image(io.BytesIO(part["png"]), width=770, height=770 * 2.1 / 11.0),
        Paragraph("Timeline", st["h2"]),
    ]
    story += _table(["occurred", "what", "detail"], part["timeline"], [100, 130, 420])
    title = "Audit trail" if detail == "all" else "Audit trail: corrections and voids"
    story.append(Paragraph(title, st["h2"]))
    rows = _audit_rows(audit, detail)
    widths = [58, 58, 88, 48, 120, 246, 86, 82]
    story += _table(
        ["recorded (UTC)", "occurred (UTC)", "who", "role", "what", "values / old -> new", "why", "signature"],
        rows,
        widths,
        font=6,
    )
    return story


# ------------------------------------------------------------------------------------------------ the document
def write_report(
    source: ExportSource,
    out: Path,
    *,
    audit: str | None = None,
    progress: Callable[[int], None] | None = None,
    signed: ExportCheckpoint | None = None,
) -> Path:
    """Write the PDF report of `source` to file `out` (the subject report if the scope names one subject, else
    the study report). `audit`: "all" or "changes" (default: all for one subject, changes for the study)."""
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.utils import TimeStamp
    from reportlab.platypus import SimpleDocTemplate

    one_subject = source.scope.subject is not None
    detail = audit or ("all" if one_subject else "changes")
    if detail not in AUDIT_DETAIL:
        raise ValueError(f"audit detail {detail!r}: one of {', '.join(AUDIT_DETAIL)}")
    st = _styles()
    checkpoint = {"size": signed.size, "note": signed.note} if signed is not None else source.checkpoint()
    parts = list(source.map(subject_part, progress))
    # the report's date is the data's: the newest event it shows (never the clock: same data, same bytes)
    data_time = max((p["newest"] for p in parts), default=datetime(2000, 1, 1, tzinfo=UTC))

    if one_subject:
        trail = {
            p["screening_number"]: [
                r
                for r in source.reader.audit_trail(subject=p["screening_number"])
                if source.scope.covers_time(r["recorded_at"]) and (detail == "all" or r["change"] != "recorded")
            ]
            for p in parts
        }
    else:
        trail = defaultdict(list)
        wanted = {p["screening_number"] for p in parts}
        changes = ("corrected", "voided") if detail == "changes" else (None,)
        for change in changes:
            for r in source.reader.audit_trail(change=change):
                if r["subject"] in wanted and source.scope.covers_time(r["recorded_at"]):
                    trail[r["subject"]].append(r)
        for rows in trail.values():
            rows.sort(key=lambda r: (r["position"], r["seq"]))

    # the regulated acts as of the same checkpoint (SDV progress: the read models')
    acts = read_acts(source.url, str(source.scope.study_id), signed, source.scope.recorded_to)
    from projections.review import sdv_facts_status, sdv_progress

    with source.reader.engine.connect() as conn:
        sdv = {g["subject"]: g for g in sdv_progress(sdv_facts_status(conn, study=str(source.scope.study_id)))}

    story = _front(source, st, checkpoint, data_time)
    if not one_subject:
        story += _study_summary(source, st)
        story += _acts_summary(acts, [p["stream"] for p in parts], sdv, st)
    for part in parts:
        subject_acts = _acts_section(acts.get(part["stream"]) or SubjectActs(), sdv.get(part["screening_number"]), st)
        story += _subject_section(part, st, trail.get(part["screening_number"], []), detail, subject_acts)

    epoch = int(data_time.timestamp())
    title = f"{source.study.code} report: {source.scope.describe()}"

    def first_page(canvas: Any, doc: Any) -> None:
        stamp = TimeStamp(invariant=1)  # the creation date is the data's, so the same data give the same bytes
        stamp.t, stamp.lt = epoch, time.gmtime(epoch)
        stamp.YMDhms = tuple(stamp.lt)[:6]
        canvas._doc._timeStamp = stamp
        later_pages(canvas, doc)

    def later_pages(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(28, 14, _latin(f"{title} - data as of {data_time.isoformat()}"))
        canvas.drawRightString(landscape(A4)[0] - 28, 14, f"page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(
        str(out),
        pagesize=landscape(A4),
        leftMargin=28,
        rightMargin=28,
        topMargin=28,
        bottomMargin=28,
        title=_latin(title),
        author="sle-events",
        subject=_latin(source.scope.describe()),
        creator="sle export report",
        invariant=1,
    )
    from reportlab import rl_config

    was = rl_config.useA85
    rl_config.useA85 = 0  # binary image streams: ASCII85 only makes them bigger, and is pure Python here
    try:
        doc.build(story, onFirstPage=first_page, onLaterPages=later_pages)
    finally:
        rl_config.useA85 = was
    return out


def export_report(
    url: str,
    out: Path,
    *,
    scope: ExportScope | None = None,
    checkpoint: ExportCheckpoint | None = None,
    audit: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The PDF report of the record at `url` as file `out`, from the events `checkpoint` covers (all of them
    without one); nothing appears at `out` if it fails."""
    with ExportSource(url, scope, upto_position=checkpoint.position if checkpoint else None) as source:
        tmp = partial(out)
        try:
            write_report(source, tmp, audit=audit, progress=progress_counter(source, on_progress), signed=checkpoint)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    publish(tmp, out)
    return out
