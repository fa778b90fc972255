"""HTML reports with PNG plots: what the demo's replay and an offline evaluation looked like, for a person.

Two halves, kept apart so each can be tested alone:

- data → :class:`Chart` (plain lists: series names, x and y values, optional confidence intervals):
  :func:`demo_charts` from the consumer's Prometheus samples taken during a replay, :func:`evaluate_charts` from
  ``persona evaluate``'s JSON;
- :class:`Chart` → PNG, and the PNGs → ``index.html``: :func:`write_report` (matplotlib, Agg backend: no display).

Example::

    >>> charts = evaluate_charts({"methods": {"base": {"ndcg@10": 0.05}, "persona": {"ndcg@10": 0.06}}})
    >>> [(c.name, list(c.series)) for c in charts]
    [('ndcg_10', ['methods'])]
    >>> write_report(tmp / "r", "Offline", charts)  # doctest: +SKIP
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: One scrape of the consumer's ``/metrics``: {(sample name, sorted labels): value} (:func:`persona_cli.demo.scrape`).
Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

#: Keys under which a JSON entry may hold its point estimate next to ``ci95``.
POINT_KEYS = ("mean", "value", "estimate", "ratio", "diff", "delta", "point")
VARIANTS = {"persona": "Persona", "base": "base"}


@dataclass
class Chart:
    """One plot: ``series`` maps a legend label to its (x, y) values.

    ``kind``: ``line`` (x numeric), ``bar`` (x are category names; ``errors`` may give each bar's 95 % interval
    as (low, high)), or ``hist`` (only y is used: the values whose distribution is drawn).
    """

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[Any], list[float]]]
    kind: Literal["line", "bar", "hist"] = "line"
    errors: dict[str, list[tuple[float, float] | None]] = field(default_factory=dict)
    caption: str = ""
    reference: float | None = None  # a horizontal line to read bars against (1.0 for ratios)


# ---------------------------------------------------------------------------------------------- data → charts
def _sum(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _label_values(samples: Samples, name: str, label: str) -> list[str]:
    found = {dict(lab).get(label) for (n, lab) in samples if n == name}
    return sorted((v for v in found if v is not None), key=lambda v: (len(v), v))


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def demo_charts(timeline: Sequence[tuple[float, Samples]], latencies_ms: Sequence[float] = ()) -> list[Chart]:
    """Charts of a replay from the consumer's metrics sampled during it (``(seconds, samples)``, oldest first).

    Quality is prequential and cumulative (hits / predictions so far, as the summary reports at the end), plotted
    against the events processed so far; drift signals are the consumer's gauges at each sample; the prototype mix
    is the share of events assigned to each prototype at the end; throughput is per sampling interval;
    ``latencies_ms`` are the API probe's request times.
    """
    t0 = timeline[0][0] if timeline else 0.0
    seconds = [t - t0 for t, _ in timeline]
    processed = [
        _sum(s, "persona_events_consumed_total") + _sum(s, "persona_events_invalid_total") for _, s in timeline
    ]
    charts: list[Chart] = []
    for metric, counter, title in (
        ("hr@10", "persona_hits_total", "Online HR@10 (prequential, cumulative)"),
        ("ndcg@10", "persona_ndcg_gain_total", "Online NDCG@10 (prequential, cumulative)"),
    ):
        series: dict[str, tuple[list[Any], list[float]]] = {}
        for variant, label in VARIANTS.items():
            xs, ys = [], []
            for done, (_, s) in zip(processed, timeline, strict=True):
                n = _sum(s, "persona_predictions_total", variant=variant)
                if n:
                    xs.append(done)
                    ys.append(_ratio(_sum(s, counter, variant=variant, k="10"), n))
            series[label] = (xs, ys)
        charts.append(
            Chart(
                metric.replace("@", "_"),
                title,
                "events processed",
                metric.upper(),
                series,
                caption="Before each event is applied, the session's previous state ranks the whole catalogue "
                "under Persona's edit and under the base model; the curve is the running mean.",
            )
        )
    drift: dict[str, tuple[list[Any], list[float]]] = {}
    for label, name, signal in (
        ("prototype-mix PSI", "persona_drift_psi", "prototype_mix"),
        ("item-popularity JS (bits)", "persona_drift_js", "item_popularity"),
    ):
        drift[label] = (list(processed), [_sum(s, name, signal=signal) for _, s in timeline])
    charts.append(
        Chart(
            "drift",
            "Drift signals against the training data",
            "events processed",
            "divergence",
            drift,
            caption="The consumer's gauges: a sliding window of live traffic against training (PSI of the "
            "prototype mix, Jensen-Shannon divergence of item popularity).",
        )
    )
    ood = [_ratio(_sum(s, "persona_ood_score_sum"), _sum(s, "persona_ood_score_count")) for _, s in timeline]
    charts.append(
        Chart(
            "ood",
            "Out-of-distribution score (running mean)",
            "events processed",
            "OOD score",
            {"mean OOD score": (list(processed), ood)},
            caption="Distance of each session's edit code to its nearest prototype, scaled by training quantiles.",
        )
    )
    last = timeline[-1][1] if timeline else {}
    protos = _label_values(last, "persona_prototype_assignments_total", "prototype")
    counts = [_sum(last, "persona_prototype_assignments_total", prototype=p) for p in protos]
    total = sum(counts)
    charts.append(
        Chart(
            "prototype_mix",
            "Prototype mix of the replay",
            "prototype",
            "share of events",
            {"events": ([f"#{p}" for p in protos], [c / total if total else 0.0 for c in counts])},
            kind="bar",
            caption="The share of events whose session was assigned to each prototype.",
        )
    )
    rate_x = [(a + b) / 2 for a, b in itertools.pairwise(seconds)]
    rates = [
        _ratio(p1 - p0, t1 - t0)
        for (p0, p1), (t0, t1) in zip(itertools.pairwise(processed), itertools.pairwise(seconds), strict=True)
    ]
    charts.append(
        Chart(
            "throughput",
            "Consumer throughput",
            "seconds since the replay started",
            "events/s",
            {"events/s": (rate_x, rates)},
            caption="Events processed (applied or rejected) per sampling interval.",
        )
    )
    charts.append(
        Chart(
            "api_latency",
            "API ranking latency",
            "milliseconds",
            "requests",
            {"GET /v1/sessions/{id}/recommendations": ([], list(latencies_ms))},
            kind="hist",
            caption="Sequential ranking requests against the live API after the replay (k=10).",
        )
    )
    return charts


def _point(value: Any) -> tuple[float | None, tuple[float, float] | None]:
    """A number, or a dict holding one (``mean``, ``value``, ...) with an optional ``ci95`` [low, high]."""
    if isinstance(value, bool):
        return None, None
    if isinstance(value, int | float):
        return float(value), None
    if isinstance(value, Mapping):
        point = next((float(value[k]) for k in POINT_KEYS if isinstance(value.get(k), int | float)), None)
        ci = value.get("ci95")
        if isinstance(ci, Sequence) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci):
            return point, (float(ci[0]), float(ci[1]))
        return point, None
    return None, None


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "chart"


def evaluate_charts(result: Mapping[str, Any]) -> list[Chart]:
    """One bar chart per metric of ``persona evaluate``'s JSON, methods side by side.

    Read generically: ``methods`` maps a method to {metric: number, or {"mean": …, "ci95": [low, high]}}; any
    ``ci95`` found becomes an error bar. A ``paired`` section (paired bootstrap comparisons, e.g.
    ``{"persona / base": {"ratio": 1.04, "ci95": [1.01, 1.07]}}``) gives one more chart of the entries it holds
    with a ``ci95`` key, labelled by their path, one per metric when the path names one (a line at 1 for ratios).
    """
    methods = result.get("methods") or {}
    metrics: list[str] = []
    for values in methods.values():
        for metric in values if isinstance(values, Mapping) else ():
            if metric not in metrics and _point(values[metric])[0] is not None:
                metrics.append(metric)
    setting = ", ".join(str(result[k]) for k in ("dataset", "protocol", "ranking") if k in result)
    charts = []
    for metric in metrics:
        names, ys, cis = [], [], []
        for method, values in methods.items():
            point, ci = _point(values.get(metric)) if isinstance(values, Mapping) else (None, None)
            if point is not None:
                names.append(method)
                ys.append(point)
                cis.append(ci)
        charts.append(
            Chart(
                _stem(metric),
                f"{metric.upper()} on the test period" + (f" ({setting})" if setting else ""),
                "method",
                metric.upper(),
                {"methods": (names, ys)},
                kind="bar",
                errors={"methods": cis} if any(cis) else {},
                caption="Error bars: 95 % confidence intervals." if any(cis) else "",
            )
        )
    paired: dict[str, tuple[list[str], list[float], list[tuple[float, float] | None]]] = {}
    ratios: dict[str, bool] = {}
    for path, leaf in _leaves_with_ci(result.get("paired")):
        metric = next((p for p in reversed(path) if p in metrics), "")
        label = " / ".join(p for p in path if p != metric) or metric
        point, ci = _point(leaf)
        if point is not None:
            entry = paired.setdefault(metric, ([], [], []))
            entry[0].append(label)
            entry[1].append(point)
            entry[2].append(ci)
            ratios[metric] = ratios.get(metric, True) and "ratio" in leaf
    how = result.get("paired_method")
    for metric, (labels, ys, cis) in paired.items():
        charts.append(
            Chart(
                "paired" + (f"_{_stem(metric)}" if metric else ""),
                "Paired comparison" + (f": {metric.upper()}" if metric else ""),
                "comparison",
                "ratio" if ratios[metric] else (metric.upper() or "value"),
                {"paired": (labels, ys)},
                kind="bar",
                errors={"paired": cis},
                caption=(f"{how}; " if isinstance(how, str) else "Paired bootstrap over the same test examples; ")
                + "error bars are 95 % intervals.",
                reference=1.0 if ratios[metric] else None,
            )
        )
    return charts


def _leaves_with_ci(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    if not isinstance(node, Mapping):
        return []
    if "ci95" in node:
        return [(path, node)]
    out = []
    for key, value in node.items():
        out += _leaves_with_ci(value, (*path, str(key)))
    return out


# ---------------------------------------------------------------------------------------------- charts → files
def draw(chart: Chart, path: Path) -> Path:
    """Write one chart as a PNG (small: 640×360 at 100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are written on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        if chart.kind == "line":
            for label, (xs, ys) in chart.series.items():
                ax.plot(xs, ys, label=label, linewidth=1.8)
        elif chart.kind == "bar":
            for label, (xs, ys) in chart.series.items():
                positions = list(range(len(xs)))
                errors = chart.errors.get(label)
                yerr = None
                if errors:
                    lows = [y - e[0] if e else 0.0 for y, e in zip(ys, errors, strict=True)]
                    highs = [e[1] - y if e else 0.0 for y, e in zip(ys, errors, strict=True)]
                    yerr = [lows, highs]
                ax.bar(positions, ys, yerr=yerr, capsize=4, color="#4c72b0")
                ax.set_xticks(positions, [str(x) for x in xs], rotation=20 if len(xs) > 4 else 0, ha="right")
            if chart.reference is not None:
                ax.axhline(chart.reference, color="#888", linewidth=1, linestyle="--")
        else:
            for label, (_, ys) in chart.series.items():
                ax.hist(ys, bins=min(40, max(5, len(ys) // 5)), label=label, color="#4c72b0")
        ax.set_title(chart.title, fontsize=11)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        ax.grid(alpha=0.3)
        if chart.kind != "bar" and len(chart.series) > 1:
            ax.legend(fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def write_report(
    out: Path, title: str, charts: Sequence[Chart], facts: Mapping[str, str] | None = None, preamble: str = ""
) -> Path:
    """Write ``out/index.html`` and one ``out/<chart>.png`` per chart; returns the index path.

    ``facts`` become a two-column table at the top (the summary's numbers); ``preamble`` is preformatted text
    shown under it (e.g. the example sessions).
    """
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        "td{padding:2px 12px 2px 0;vertical-align:top}figure{margin:1.5em 0}"
        "figcaption{color:#555;font-size:90%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    if facts:
        parts.append("<table>")
        parts += [f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in facts.items()]
        parts.append("</table>")
    if preamble:
        parts.append(f"<pre>{html.escape(preamble)}</pre>")
    for chart in charts:
        png = draw(chart, out / f"{chart.name}.png")
        parts.append(
            f'<figure><img src="{png.name}" alt="{html.escape(chart.title)}" width="640">'
            f"<figcaption>{html.escape(chart.caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return index
