"""Reports: metrics sampled during a replay and evaluate's JSON become the expected series, drawn as real PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona_cli.report import Chart, demo_charts, draw, evaluate_charts, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scrape(done: float, persona: tuple[float, float, float], base: tuple[float, float, float], psi: float) -> dict:
    """One consumer scrape: ``done`` events consumed; per variant (predictions, hits@10, NDCG gain@10)."""
    out = {
        ("persona_events_consumed_total", (("type", "click"),)): done,
        ("persona_events_invalid_total", (("reason", "bad_json"),)): 1.0,
        ("persona_drift_psi", (("signal", "prototype_mix"),)): psi,
        ("persona_drift_js", (("signal", "item_popularity"),)): psi / 2,
        ("persona_ood_score_sum", ()): done * 0.5,
        ("persona_ood_score_count", ()): done,
        ("persona_prototype_assignments_total", (("prototype", "0"),)): done * 0.25,
        ("persona_prototype_assignments_total", (("prototype", "10"),)): done * 0.25,
        ("persona_prototype_assignments_total", (("prototype", "2"),)): done * 0.5,
    }
    for variant, (n, hits, gain) in (("persona", persona), ("base", base)):
        out[("persona_predictions_total", (("variant", variant),))] = n
        out[("persona_hits_total", (("k", "10"), ("variant", variant)))] = hits
        out[("persona_hits_total", (("k", "20"), ("variant", variant)))] = hits * 2  # another k: never mixed in
        out[("persona_ndcg_gain_total", (("k", "10"), ("variant", variant)))] = gain
    return out


TIMELINE = [
    (100.0, _scrape(0, (0, 0, 0), (0, 0, 0), 0.0)),  # before the first event: no prediction yet
    (100.5, _scrape(400, (300, 30, 15), (300, 15, 6), 0.1)),
    (101.0, _scrape(1000, (800, 100, 40), (800, 40, 16), 0.2)),
    (102.0, _scrape(1500, (1200, 120, 60), (1200, 60, 30), 0.15)),
]


def test_demo_series_follow_the_sampled_counters() -> None:
    charts = {c.name: c for c in demo_charts(TIMELINE, [3.0, 4.0, 5.0])}
    assert list(charts) == ["hr_10", "ndcg_10", "drift", "ood", "prototype_mix", "throughput", "api_latency"]
    hr = charts["hr_10"].series
    assert list(hr) == ["Persona", "base"]
    assert hr["Persona"] == ([401.0, 1001.0, 1501.0], [0.1, 0.125, 0.1])  # cumulative hits / predictions
    assert hr["base"][1] == [0.05, 0.05, 0.05]
    assert charts["ndcg_10"].series["Persona"][1] == [0.05, 0.05, 0.05]
    drift = charts["drift"].series
    assert list(drift) == ["prototype-mix PSI", "item-popularity JS (bits)"]
    assert all(len(xs) == len(ys) == 4 for xs, ys in drift.values())
    assert drift["prototype-mix PSI"][1] == [0.0, 0.1, 0.2, 0.15]
    mix = charts["prototype_mix"]
    assert mix.kind == "bar" and mix.series["events"] == (["#0", "#2", "#10"], [0.25, 0.5, 0.25])
    assert charts["throughput"].series["events/s"] == ([0.25, 0.75, 1.5], [800.0, 1200.0, 500.0])
    assert charts["api_latency"].series["GET /v1/sessions/{id}/recommendations"][1] == [3.0, 4.0, 5.0]


def test_evaluate_series_are_one_chart_per_metric_with_intervals_where_given() -> None:
    result = {
        "dataset": "ml-100k",
        "methods": {
            "base": {"hr@10": 0.1, "ndcg@10": {"mean": 0.05, "ci95": [0.04, 0.06]}},
            "persona": {"hr@10": 0.12, "ndcg@10": {"mean": 0.06, "ci95": [0.05, 0.07]}},
        },
        "paired": {"persona vs base": {"ndcg@10": {"diff": 0.01, "ci95": [0.004, 0.016]}, "n": 3000}},
    }
    charts = {c.name: c for c in evaluate_charts(result)}
    assert list(charts) == ["hr_10", "ndcg_10", "paired_ndcg_10"]
    assert charts["hr_10"].series == {"methods": (["base", "persona"], [0.1, 0.12])}
    assert charts["hr_10"].errors == {}
    assert charts["ndcg_10"].errors == {"methods": [(0.04, 0.06), (0.05, 0.07)]}
    assert charts["paired_ndcg_10"].series == {"paired": (["persona vs base"], [0.01])}
    assert charts["paired_ndcg_10"].errors == {"paired": [(0.004, 0.016)]}
    assert charts["paired_ndcg_10"].reference is None  # a difference, not a ratio


def test_evaluates_paired_ratios_are_one_chart_read_against_one() -> None:
    """The shape ``persona evaluate`` writes: {label: {"ratio": r, "ci95": [low, high] or null}}."""
    result = {
        "methods": {"persona": {"ndcg@10": 0.06}, "base": {"ndcg@10": 0.05}},
        "paired": {
            "persona_vs_base": {"ratio": 1.2, "ci95": [1.1, 1.3]},
            "persona_vs_finetune": {"ratio": 0.95, "ci95": None},  # too few examples for an interval
        },
        "paired_method": "NDCG@10 ratio of means, paired bootstrap over test examples, 1000 resamples",
    }
    paired = evaluate_charts(result)[-1]
    assert paired.name == "paired" and paired.reference == 1.0 and paired.ylabel == "ratio"
    assert paired.series == {"paired": (["persona_vs_base", "persona_vs_finetune"], [1.2, 0.95])}
    assert paired.errors == {"paired": [(1.1, 1.3), None]}
    assert paired.caption.startswith("NDCG@10 ratio of means")


def _is_png(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    return image.shape[0], image.shape[1]


def test_the_report_is_an_index_with_decodable_pngs(tmp_path: Path) -> None:
    charts = demo_charts(TIMELINE, [3.0, 4.0, 5.0, 4.5]) + evaluate_charts(
        {
            "methods": {"base": {"mrr": {"mean": 0.1, "ci95": [0.09, 0.11]}}, "persona": {"mrr": 0.12}},
            "paired": {
                "persona_vs_base": {"ratio": 1.2, "ci95": [1.1, 1.3]},
                "persona_vs_x": {"ratio": 1, "ci95": None},
            },
        }
    )
    assert [c.name for c in charts][-2:] == ["mrr", "paired"]
    index = write_report(tmp_path / "r", "A <demo>", charts, {"events": "1500 of 1500"}, "session 1 · last: x")
    html = index.read_text()
    assert "<title>A &lt;demo&gt;</title>" in html and "session 1 · last: x" in html
    for chart in charts:
        png = tmp_path / "r" / f"{chart.name}.png"
        assert f'src="{png.name}"' in html
        assert _is_png(png) == (360, 640)
        assert png.stat().st_size < 150_000


def test_an_empty_series_still_draws(tmp_path: Path) -> None:
    """A replay too short for a second sample has no throughput interval: the report is still written."""
    chart = Chart("t", "t", "x", "y", {"events/s": ([], [])})
    assert _is_png(draw(chart, tmp_path / "t.png")) == (360, 640)


@pytest.mark.parametrize("value", [True, "0.1", None, [0.1]])
def test_values_that_are_not_numbers_are_left_out(value: object) -> None:
    charts = evaluate_charts({"methods": {"a": {"x": value, "y": 1.0}}})
    assert [c.name for c in charts] == ["y"]
