"""`i2l bench prepare`: one stored figure per (case, metric) — the PIL loop and each Ray worker count apart — and
both of its goals judged, on a tiny toy world."""

import json

import pytest


@pytest.mark.usefixtures("ray_session")
def test_bench_prepare_stores_each_case_apart_and_judges_both_goals(tmp_path, capsys, monkeypatch):
    import i2l.bench.prepare
    from i2l.cli import main
    from i2l.store import Store

    assert i2l.bench.prepare.GOALS == {"per_worker/loop": (">=", 0.8), "2_workers/1_worker": (">=", 1.7)}
    # goals every timing meets / none meets: judged met / missed whatever this machine measures
    monkeypatch.setattr(i2l.bench.prepare, "GOALS", {"per_worker/loop": (">=", 0.0),
                                                     "2_workers/1_worker": (">=", 1e9)})
    store = tmp_path / "results.duckdb"
    assert main(["bench", "prepare", "--styles", "4", "--size", "16", "--resolution", "32", "--workers", "1,2",
                 "--store", str(store)]) == 0
    out = capsys.readouterr().out
    df = Store(store).query("SELECT case_name, metric, value, unit, extra FROM benchmarks WHERE bench = 'prepare'")
    assert f"recorded {len(df)} figures" in out  # what was inserted, not how many rows run() returned
    assert df.case_name.notna().all()
    assert len(df) == len(Store(store).query("SELECT * FROM v_benchmarks WHERE bench = 'prepare'"))  # none hidden
    fig = {(r.case_name, r.metric): r for r in df.itertuples()}
    for case in ("pil_loop", "ray_w1", "ray_w2"):
        assert fig[(case, "rows_per_s")].value > 0 and fig[(case, "rows_per_s")].unit == "rows/s"
        assert fig[(case, "cpu_ms_per_row")].value > 0
    rate = {c: fig[(c, "rows_per_s")].value for c in ("pil_loop", "ray_w1", "ray_w2")}
    judged = {}
    for (case, metric), goal in {("ray_w1/pil_loop", "per_worker_ratio"): (">= 0", True),
                                 ("ray_w2/pil_loop", "per_worker_ratio"): (">= 0", True),
                                 ("ray_w2/ray_w1", "ratio"): (">= 1e+09", False)}.items():
        r = fig[(case, metric)]
        extra = json.loads(r.extra)
        assert (extra["goal"], extra["goal_met"]) == goal
        judged[case] = r.value
    assert judged["ray_w2/pil_loop"] == pytest.approx(rate["ray_w2"] / 2 / rate["pil_loop"], rel=1e-9)
    assert judged["ray_w2/ray_w1"] == pytest.approx(rate["ray_w2"] / rate["ray_w1"], rel=1e-9)


def test_bench_reports_the_figures_it_stored_not_the_rows_it_was_given(tmp_path, capsys, monkeypatch):
    import i2l.bench.prepare
    from i2l.cli import main

    wide = [{"case": "x", "seconds": 1.5, "rows_per_s": 20.0, "cpu_ms_per_row": 3.0, "format": "png"}]
    monkeypatch.setattr(i2l.bench.prepare, "run", lambda args: wide)  # a wide row: one figure per number
    assert main(["bench", "prepare", "--store", str(tmp_path / "results.duckdb")]) == 0
    assert "recorded 3 figures" in capsys.readouterr().out


def test_every_bench_judges_its_goal_the_same_way():
    from i2l.bench import format_rows, judged

    assert judged(1.2, ("<=", 1.3)) == {"goal": "<= 1.3", "goal_met": True}
    assert judged(1.4, ("<=", 1.3))["goal_met"] is False
    assert judged(999.0, (">=", 1000.0)) == {"goal": ">= 1000", "goal_met": False}
    assert judged(0.5, None) == {}
    with pytest.raises(ValueError, match="'<=' or '>='"):
        judged(1.0, ("<", 1.3))
    table = format_rows([{"case": "a/b", "metric": "ratio", "value": 1.4, "unit": "x", **judged(1.4, ("<=", 1.3))}])
    assert "<= 1.3 (NOT met)" in table
