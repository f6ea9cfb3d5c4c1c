"""report.html: one self-contained HTML file (inline CSS, PNGs embedded as base64, no links out).

Small builders that each return an HTML fragment; every text that comes from data goes through
:func:`html.escape`. :func:`demo_report` assembles the page `covidseg demo` writes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from covidseg.io.atomic import write_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d1d1f; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.7em; }
th { background: #f3f3f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.ours td { font-weight: 600; }
img { max-width: 100%; border: 1px solid #e3e3e3; margin: 0.3em 0; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
.figs figure { margin: 0; flex: 1 1 320px; }
figcaption, .note { color: #555; font-size: 0.88em; }
pre { background: #f6f6f8; padding: 0.8em; overflow-x: auto; font-size: 0.82em; }
"""


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` decimals; an en dash for a missing or undefined value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def fmt_mean_std(stats: dict | None, digits: int = 3) -> str:
    """'mean ± std' of an aggregate dict ({"mean", "std"}); an en dash when undefined."""
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{fmt(stats['mean'], digits)} ± {fmt(stats['std'], digits)}"


def table(
    headers: list[str], rows: list[list[str]], numeric_from: int = 1, highlight: int | None = None
) -> str:
    """An HTML table; columns from `numeric_from` on are right-aligned; row `highlight` (the model the
    pipeline delivers, not necessarily the best row) in bold."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if j >= numeric_from else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f'<tr class="ours">{cells}</tr>' if i == highlight else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(path: Path, caption: str) -> str:
    """A PNG embedded as a base64 data URI, with a caption; nothing if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def paragraph(text: str, css_class: str | None = None) -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def page(title: str, lead: str, sections: list[str]) -> str:
    """The whole document: inline CSS, no scripts, no external resources."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="lead">{html.escape(lead)}</p>'
        f"{''.join(sections)}</body></html>\n"
    )


@dataclass
class MethodScores:
    """One method's scores on the test phantoms (from an evaluate summary.json)."""

    name: str
    summary: dict  # evaluate's summary.json
    healthy_flagged_pct: list[float] = field(default_factory=list)  # % of lung flagged, healthy cases

    def row(self) -> list[str]:
        agg = self.summary["aggregate"]
        flagged = self.healthy_flagged_pct
        mean_flagged = sum(flagged) / len(flagged) if flagged else None
        return [
            self.name,
            fmt_mean_std(agg["metrics"].get("dice")),
            fmt(agg["pooled"].get("dice")),
            fmt_mean_std(agg["metrics"].get("sensitivity")),
            fmt_mean_std(agg["metrics"].get("specificity"), 4),
            fmt(mean_flagged, 2),
        ]

    def case_dice(self) -> dict[str, float]:
        return {c["case_id"]: c["dice"] for c in self.summary.get("cases", [])}


METRIC_HEADERS = [
    "method",
    "Dice per volume (mean ± std)",
    "pooled Dice",
    "sensitivity",
    "specificity",
    "healthy lung flagged %",
]


def metrics_table(methods: list[MethodScores], highlight: int | None = None) -> str:
    return table(METRIC_HEADERS, [m.row() for m in methods], highlight=highlight)


def per_case_table(methods: list[MethodScores], lesion_ml: dict[str, float]) -> str:
    """Dice per test case and method, with the case's true lesion volume (mL)."""
    dice = [m.case_dice() for m in methods]
    rows = [
        [case_id, fmt(ml, 1), *(fmt(d.get(case_id)) for d in dice)]
        for case_id, ml in sorted(lesion_ml.items())
    ]
    return table(["case", "lesion mL", *(m.name for m in methods)], rows)


def timings_table(timings: list[tuple[str, str, float]]) -> str:
    """(step, status, seconds) rows and their total in minutes."""
    rows = [[name, status, f"{seconds:.1f}"] for name, status, seconds in timings]
    total = sum(s for _, _, s in timings)
    rows.append(["total", "", f"{total:.1f} ({total / 60:.1f} min)"])
    return table(["step", "status", "seconds"], rows, numeric_from=2)


def key_value_table(items: dict[str, object]) -> str:
    return table(["", ""], [[str(k), str(v)] for k, v in items.items()], numeric_from=2)


def settings_block(settings: dict) -> str:
    text = html.escape(json.dumps(settings, indent=2))
    return f"<details><summary>resolved settings (config.json)</summary><pre>{text}</pre></details>"


@dataclass
class DemoReport:
    """Everything report.html shows; paths are PNG files to embed."""

    title: str
    lead: str
    data_text: str
    methods: list[MethodScores]
    highlight: int | None
    lesion_ml: dict[str, float]
    notes: list[str]
    loss_figures: list[tuple[Path, str]]
    overlay_figure: Path | None
    overlay_caption: str
    timings: list[tuple[str, str, float]]
    timing_note: str
    versions: dict[str, object]
    settings: dict


def demo_report(report: DemoReport) -> str:
    """The HTML text of the demo report."""
    figures = "".join(image(path, caption) for path, caption in report.loss_figures)
    overlay = image(report.overlay_figure, report.overlay_caption) if report.overlay_figure else ""
    sections = [
        section(
            "Test phantoms: how well each method finds the lesions",
            paragraph(report.data_text),
            metrics_table(report.methods, report.highlight),
            *(paragraph(note, "note") for note in report.notes),
        ),
        section("Predictions vs ground truth", overlay),
        section("Dice per test case", per_case_table(report.methods, report.lesion_ml)),
        section("Training curves", f'<div class="figs">{figures}</div>'),
        section("Timings", timings_table(report.timings), paragraph(report.timing_note, "note")),
        section("Versions and settings", key_value_table(report.versions), settings_block(report.settings)),
    ]
    return page(report.title, report.lead, sections)


def write_report(path: Path, text: str) -> Path:
    """Write the HTML atomically; return its path."""
    write_text(path, text)
    return Path(path)
