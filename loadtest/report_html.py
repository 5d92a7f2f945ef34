"""A self-contained HTML report: tables from the summary and plots drawn as inline SVG.

No JavaScript and no external assets (CDNs are not allowed, and a report attached to a ticket must
render offline forever), so the charts are generated here as plain SVG polylines.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from loadtest.runner import TargetRun
from loadtest.stats import metric_values

__all__ = ["render_html"]

COLORS = {"bridge": "#1f77b4", "direct": "#ff7f0e"}
ERROR_COLORS = {"bridge": "#d62728", "direct": "#9467bd"}
WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 640, 300, 64, 16, 30, 44
MAX_POINTS = 400

Series = tuple[str, str, Sequence[tuple[float, float]]]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step  # the ticks enclose the data on both sides
    last = math.ceil(high / step) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def line_chart(title: str, series: Sequence[Series], x_label: str, y_label: str) -> str:
    """An SVG line chart; points are (x, y) in data units, ``y`` may be NaN for a gap."""
    points = [p for _, _, pts in series for p in pts if not math.isnan(p[1])]
    if not points:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p>no data</p></figure>"
    x_ticks = _nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = _nice_ticks(min(0.0, min(p[1] for p in points)), max(p[1] for p in points))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    x_span, y_span = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / x_span * plot_w

    def sy(y: float) -> float:
        return PAD_T + plot_h - (y - y0) / y_span * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-weight="bold">'
        f"{html.escape(title)}</text>",
    ]
    for x in x_ticks:
        parts.append(
            f'<line x1="{sx(x):.1f}" y1="{PAD_T}" x2="{sx(x):.1f}" '
            f'y2="{PAD_T + plot_h}" stroke="#eee"/><text x="{sx(x):.1f}" '
            f'y="{PAD_T + plot_h + 16}" text-anchor="middle">{_fmt(x)}</text>'
        )
    for y in y_ticks:
        parts.append(
            f'<line x1="{PAD_L}" y1="{sy(y):.1f}" x2="{PAD_L + plot_w}" '
            f'y2="{sy(y):.1f}" stroke="#eee"/><text x="{PAD_L - 6}" '
            f'y="{sy(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>'
        )
    parts.append(
        f'<text x="{PAD_L + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
    )
    parts.append(
        f'<text transform="translate(14 {PAD_T + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )
    for number, (name, color, pts) in enumerate(series):
        for segment in _segments(pts):
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in segment)
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'
            )
        legend_y = PAD_T + 14 * number + 4
        parts.append(
            f'<rect x="{PAD_L + 8}" y="{legend_y}" width="10" height="10" '
            f'fill="{color}"/><text x="{PAD_L + 22}" y="{legend_y + 9}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}</figure>"


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isnan(y):
            segments.append([])
        else:
            segments[-1].append((x, y))
    return [s for s in segments if s]


def _cdf(values: list[float]) -> list[tuple[float, float]]:
    """(latency ms, % of *all* requests at or below it); failures (inf) keep the curve < 100."""
    total = len(values)
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return []
    step = max(len(finite) // MAX_POINTS, 1)
    picks = list(range(0, len(finite), step))
    if picks[-1] != len(finite) - 1:
        picks.append(len(finite) - 1)
    return [(finite[i], 100.0 * (i + 1) / total) for i in picks]


def _charts(summary: dict[str, Any], runs: Sequence[TargetRun]) -> list[str]:
    charts = []
    for metric, title in (("ttft", "TTFT CDF"), ("completion", "Completion CDF")):
        series = [
            (
                run.target,
                COLORS.get(run.target, "#333"),
                _cdf(metric_values([r for r in run.records if r.steady], metric)),
            )
            for run in runs
        ]
        charts.append(
            line_chart(
                f"{title} (steady state; failures never reach 100 %)",
                series,
                "latency (ms)",
                "% of requests",
            )
        )
    p95_series: list[Series] = []
    flow_series: list[Series] = []
    for name, target in summary["targets"].items():
        tl = target["timeline"]
        window_s = tl["windowS"]
        xs = [t + window_s / 2 for t in tl["startS"]]
        p95 = [(x, math.nan if v is None else v) for x, v in zip(xs, tl["ttftP95Ms"], strict=True)]
        p95_series.append((name, COLORS.get(name, "#333"), p95))
        flow_series.append(
            (
                f"{name} completed/s",
                COLORS.get(name, "#333"),
                [(x, c / window_s) for x, c in zip(xs, tl["completed"], strict=True)],
            )
        )
        flow_series.append(
            (
                f"{name} failed/s",
                ERROR_COLORS.get(name, "#900"),
                [(x, f / window_s) for x, f in zip(xs, tl["failed"], strict=True)],
            )
        )
    charts.append(
        line_chart(
            "p95 TTFT per window (gaps: no finite p95)",
            p95_series,
            "time since start (s)",
            "p95 TTFT (ms)",
        )
    )
    charts.append(
        line_chart("Throughput and errors", flow_series, "time since start (s)", "requests/s")
    )
    return charts


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    return "inf" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _metric_rows(name: str, window: dict[str, Any]) -> list[list[str]]:
    rows = []
    for metric in ("ack", "ttft", "completion", "done", "gap"):
        dist = window["metrics"][metric]
        rows.append(
            [name, metric, str(dist["n"]), str(dist["censored"])]
            + [_cell(dist[k]) if dist["n"] else "-" for k in ("p50", "p90", "p95", "p99", "max")]
        )
    return rows


def render_html(summary: dict[str, Any], runs: Sequence[TargetRun]) -> str:
    """The whole report as one HTML string."""
    header = [
        "window",
        "metric",
        "n",
        "failed as inf",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
    ]
    rows: list[list[str]] = []
    for name, target in summary["targets"].items():
        rows += _metric_rows(f"{name} steady", target["steady"])
        for stage in target["stages"]:
            rows += _metric_rows(f"{name} stage {stage['stage']} ({stage['label']})", stage)
    gates = [
        [g["name"], _cell(g["value"]), _cell(g["threshold"]), "ok" if g["ok"] else "FAIL"]
        for g in summary["gates"]
    ]
    failures = [
        [name, k, str(v)]
        for name, t in summary["targets"].items()
        for k, v in {**t["all"]["failures"], **t["all"]["codes"], **t["all"]["correctness"]}.items()
    ]
    run = summary["run"]
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>loadtest {html.escape(run['run_id'])}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "figure{display:inline-block;margin:0.5em}svg{font-size:11px}</style></head><body>",
            f"<h1>Load test {html.escape(run['run_id'])}: {summary['verdict'].upper()}</h1>",
            f"<p>started {html.escape(run['started_at'])}; targets "
            f"{html.escape(', '.join(f'{k} {v}' for k, v in run['targets'].items()))}; "
            f"{html.escape(run['arrival'])} arrivals, seed {run['seed']}, {run['users']} users, "
            f"max in flight {run['max_in_flight']}</p>",
            "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in summary["reasons"]) + "</ul>",
            f"<h2>Gates ({html.escape(summary['gatedTarget'])}, steady state)</h2>",
            _table(gates, ["gate", "value", "threshold (<=)", "result"]),
            "<h2>Plots</h2>",
            *_charts(summary, runs),
            "<h2>Latencies (from the scheduled send time)</h2>",
            _table(rows, header),
            "<h2>Failures and correctness (whole run)</h2>",
            _table(failures, ["target", "class / code / check", "count"]),
            "</body></html>",
        ]
    )
