"""Results store: migrations, atomic writes, skipped scores, views on the fixture run, data ingest, stages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from fixtures_store import (
    BENCH_ROWS,
    METHODS,
    QUARANTINE_BY_REASON,
    SKIP_REASON,
    SKIPPED_METRIC,
    STYLE_OFFSETS,
    make_fixture_store,
    write_prepared_dir,
)

from i2l.store import METRICS, MIGRATIONS, Store

REPO = Path(__file__).resolve().parents[2]
TABLES = {"runs", "checkpoints", "datasets", "dataset_inputs", "shards", "quarantine", "quarantine_counts",
          "styles", "methods", "loras", "samples", "scores", "metrics", "benchmarks", "train_curves",
          "eval_losses", "stages", "out_of_family", "schema_version"}
VIEWS = {"v_metric_means", "v_method_summary", "v_style_breakdown", "v_amortization", "v_benchmarks",
         "v_data_summary", "v_quarantine_by_reason"}


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory):
    return make_fixture_store(tmp_path_factory.mktemp("store"))


def _sample(i: int, run_id: str, method: str = "base") -> dict:
    return {"sample_id": f"{run_id}/{i}", "run_id": run_id, "method": method, "style_id": "s000001",
            "prompt": "p", "seed": i}


def test_migrates_from_empty(tmp_path):
    store = Store(tmp_path / "sub" / "results.duckdb")
    assert store.version == len(MIGRATIONS)
    names = {r[0] for r in store.rows("SELECT table_name FROM duckdb_tables()")}
    views = {r[0] for r in store.rows("SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert TABLES <= names and VIEWS <= views
    lower = dict(store.rows("SELECT metric, lower_is_better FROM metrics"))
    assert lower == {m: v[0] for m, v in METRICS.items()} and lower["leakage"] and lower["fm_loss"]
    Store(store.path)  # reopening applies nothing twice
    assert store.rows("SELECT count(*) FROM schema_version")[0][0] == len(MIGRATIONS)


def test_migrates_old_store_and_keeps_its_data(tmp_path):
    old = Store(tmp_path / "r.duckdb", auto_migrate=False)
    assert old.migrate(upto=1) == 1
    with old.transaction() as con:
        con.execute("INSERT INTO runs (run_id, kind, status, started_at) VALUES ('r1', 'eval', 'ok', now())")
    with pytest.raises(duckdb.CatalogException):
        old.query("SELECT * FROM v_method_summary")
    store = Store(tmp_path / "r.duckdb")
    assert store.version == len(MIGRATIONS)
    assert store.rows("SELECT run_id FROM runs") == [("r1",)]
    assert store.query("SELECT * FROM v_method_summary").empty


def test_wrong_style_sanity_row_is_not_an_i2l_method(tmp_path):
    """i2l_wrong_style (a wrong style's i2L LoRA) is family 'sanity': by name, in the view, and in a store whose
    methods rows were recorded as 'i2l' before the 'sanity_family' migration."""
    from i2l.store import parse_method

    assert parse_method("i2l_wrong_style") == {"family": "sanity", "budget_steps": None, "n_refs": None,
                                               "asym": False}
    assert parse_method("i2l_4ref_asym") == {"family": "i2l", "budget_steps": None, "n_refs": 4, "asym": True}
    old = Store(tmp_path / "r.duckdb", auto_migrate=False)
    old.migrate(upto=[name for name, _ in MIGRATIONS].index("sanity_family"))
    losses = [{"method": m, "style_id": "s1", "n_refs": 4, "steps": 0, "wall_s": 0.0, "loss": 0.2}
              for m in ("i2l_4ref", "i2l_wrong_style", "gray_lora")]
    with old.transaction() as con:  # as an older i2l recorded them: methods rows, wrong style as 'i2l'
        con.executemany("INSERT INTO methods (run_id, method, family) VALUES ('e1', ?, ?)",
                        [["i2l_4ref", "i2l"], ["i2l_wrong_style", "i2l"], ["gray_lora", "gray_lora"]])
        con.executemany("INSERT INTO eval_losses VALUES (?, ?, ?, ?, ?, ?, ?)",  # e2: no methods rows
                        [[run, r["method"], "s1", 4, 0, 0.0, 0.2] for r in losses for run in ("e1", "e2")])
    assert dict(old.rows("SELECT method, family FROM v_amortization WHERE run_id = 'e1'"))["i2l_wrong_style"] \
        == "i2l"  # the bug, before the migration
    store = Store(tmp_path / "r.duckdb")
    assert store.version == len(MIGRATIONS)
    expected = {"i2l_4ref": "i2l", "i2l_wrong_style": "sanity", "gray_lora": "gray_lora"}
    for run in ("e1", "e2"):
        assert dict(store.rows("SELECT method, family FROM v_amortization WHERE run_id = ?", [run])) == expected
    assert dict(store.rows("SELECT method, family FROM methods WHERE run_id = 'e1'")) == expected
    store.record_eval_loss("e3", losses)  # recorded now
    assert dict(store.rows("SELECT method, family FROM v_amortization WHERE run_id = 'e3'")) == expected


def test_refuses_a_newer_schema(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    with store.transaction() as con:
        con.execute("INSERT INTO schema_version VALUES (99, 'future', now())")
    with pytest.raises(RuntimeError, match="upgrade i2l"):
        Store(tmp_path / "r.duckdb")


def test_failed_write_leaves_no_partial_run(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    kept = store.start_run("eval", "debug", {})
    store.record_samples([_sample(0, kept)])
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        run = store.start_run("eval", "debug", {"x": 1}, run_id="doomed")
        store.record_samples([_sample(i, run) for i in range(5)])
        store.record_scores([{"sample_id": f"{run}/0", "metric": "clip_text", "value": 1.0, "status": "ok"}])
        store.mark_stage_done("eval", run)
        raise RuntimeError("boom")
    # A bad row in the middle of a batch: nothing of the batch lands (DuckDB rejects the NULL run_id).
    with pytest.raises(duckdb.ConstraintException), store.transaction() as con:
        store.record_samples([_sample(1, kept)])
        con.execute("INSERT INTO samples (sample_id, method, created_at) VALUES ('x', 'base', now())")
    assert store.rows("SELECT run_id FROM runs") == [(kept,)]
    assert store.rows("SELECT sample_id FROM samples") == [(f"{kept}/0",)]
    assert store.rows("SELECT count(*) FROM scores")[0][0] == 0
    assert not store.is_stage_done("eval", "doomed")


def test_killed_writer_leaves_no_partial_run(tmp_path):
    db = tmp_path / "r.duckdb"
    Store(db).start_run("train", "debug", {}, run_id="before")
    code = textwrap.dedent(f"""
        import os
        from i2l.store import Store
        store = Store({str(db)!r})
        with store.transaction():
            store.start_run("eval", "debug", {{}}, run_id="killed")
            store.record_samples([dict(sample_id=f"k{{i}}", run_id="killed", method="base")
                                  for i in range(100)])
            os._exit(9)  # the process dies mid-transaction, as on SIGKILL or OOM
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 9, proc.stderr
    store = Store(db, read_only=True)
    assert store.rows("SELECT run_id FROM runs") == [("before",)]
    assert store.rows("SELECT count(*) FROM samples")[0][0] == 0


def test_skipped_scores_are_never_numbers(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.record_samples([_sample(0, "r")])
    sid = "r/0"
    with pytest.raises(ValueError, match="must have value None"):
        store.record_scores([{"sample_id": sid, "metric": "aesthetic", "value": 0.0, "status": "skipped",
                              "reason": "x"}])
    with pytest.raises(ValueError, match="needs a reason"):
        store.record_scores([{"sample_id": sid, "metric": "aesthetic", "value": None, "status": "skipped"}])
    with pytest.raises(ValueError, match="skipped"):
        store.record_scores([{"sample_id": sid, "metric": "clip_text", "value": float("nan"),
                              "status": "ok"}])
    # The table itself refuses a number on a skipped row.
    with pytest.raises(duckdb.ConstraintException), store.transaction() as con:
        con.execute("INSERT INTO scores VALUES (?, 'aesthetic', 5.0, 's', '1', 'skipped', 'r')", [sid])
    store.record_scores([{"sample_id": sid, "metric": "aesthetic", "value": None, "scorer": "laion",
                          "scorer_version": "1", "status": "skipped", "reason": "no weights",
                          "index": 0}])  # extra keys are ignored
    assert store.rows("SELECT value IS NULL, status, reason FROM scores") == [(True, "skipped", "no weights")]


def test_views_on_fixture_run(fixture_store):
    store, info = fixture_store
    ms = store.query("SELECT * FROM v_method_summary WHERE run_id = ?", [info["eval_run"]])
    assert len(ms) == len(METHODS) * 5  # clip_text, clip_style, leakage, aesthetic, overall
    cell = ms.set_index(["method", "metric"])
    for method, (ct, cs, leak, _, _) in METHODS.items():
        assert cell.loc[(method, "clip_text"), "mean"] == pytest.approx(ct)
        assert cell.loc[(method, "clip_style"), "mean"] == pytest.approx(cs)
        assert cell.loc[(method, "leakage"), "mean"] == pytest.approx(leak)
        assert cell.loc[(method, "clip_style"), "n_ok"] == 3
        skipped = cell.loc[(method, SKIPPED_METRIC)]
        assert pd.isna(skipped["mean"]) and skipped["n_skipped"] == 3
        assert skipped["skip_reason"] == SKIP_REASON
    # Hand-checked Overall: base = mean(1, 0, 1); i2l_4ref_asym = mean(0.5, 1, 0.75).
    assert cell.loc[("base", "overall"), "mean"] == pytest.approx(2 / 3)
    assert cell.loc[("i2l_4ref_asym", "overall"), "mean"] == pytest.approx(0.75)
    assert cell.loc[("adapter", "leakage"), "normalized"] == pytest.approx(0.0)  # worst leakage, inverted
    # Overall recomputed independently from the raw metric table.
    raw = pd.DataFrame({m: {"clip_text": v[0], "clip_style": v[1], "leakage": -v[2]}
                        for m, v in METHODS.items()}).T
    expected = ((raw - raw.min()) / (raw.max() - raw.min())).mean(axis=1)
    got = ms[ms.metric == "overall"].set_index("method")["mean"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)

    sb = store.query("SELECT * FROM v_style_breakdown WHERE method = 'base' AND metric = 'clip_style' "
                     "ORDER BY style_id")
    assert sb["mean"].tolist() == [METHODS["base"][1] + o for o in STYLE_OFFSETS.values()]
    assert sb["style"].str.startswith("In the style of").all()

    am = store.query("SELECT * FROM v_amortization WHERE run_id = ?", [info["eval_run"]]).set_index("method")
    assert set(am.index) == set(METHODS)
    assert am.loc["per_style@100", ["budget_steps", "wall_s", "eval_loss"]].tolist() == [100, 7.0, 0.14]
    assert am.loc["i2l_4ref", "family"] == "i2l" and am.loc["i2l_4ref", "wall_s"] == pytest.approx(0.012)
    assert pd.isna(am.loc["base", "budget_steps"]) and pd.isna(am.loc["i2l_4ref_asym", "eval_loss"])
    assert am.loc["i2l_4ref_asym", "overall"] == pytest.approx(0.75)

    bench = store.query("SELECT * FROM v_benchmarks WHERE bench = 'predictor_forward' ORDER BY case_name")
    assert bench[["case_name", "value", "unit"]].values.tolist() == [[r["case"], r["value"], r["unit"]]
                                                                     for r in BENCH_ROWS]
    wide = dict(store.rows("SELECT metric, value FROM v_benchmarks WHERE bench = 'prepare'"))
    assert wide == {"rows_per_s": 950.0, "speedup": 1.8}

    data = store.query("SELECT * FROM v_data_summary").iloc[0]
    assert (data.rows_in, data.rows_written, data.rows_quarantined, data.n_shards) == (99, 96, 3, 2)
    assert dict(store.rows("SELECT reason, n FROM v_quarantine_by_reason")) == QUARANTINE_BY_REASON
    assert store.rows("SELECT count(*) FROM quarantine WHERE detail IS NOT NULL")[0][0] == 3
    assert store.stage_info("eval", info["eval_run"]) == {"samples": info["n_samples"]}


def test_benchmark_view_keeps_latest(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.record_benchmark("b", [{"case": "c", "metric": "ms", "value": 2.0, "unit": "ms"}], device="cpu")
    store.record_benchmark("b", [{"case": "c", "metric": "ms", "value": 1.0, "unit": "ms"}], device="cpu")
    store.record_benchmark("b", [{"case": "c", "metric": "ms", "value": 9.0, "unit": "ms"}], device="cuda")
    got = store.rows("SELECT device, value, n_recorded FROM v_benchmarks ORDER BY device")
    assert got == [("cpu", 1.0, 2), ("cuda", 9.0, 1)]


def test_record_dataset_is_tolerant_and_idempotent(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    out = write_prepared_dir(tmp_path / "prep")
    a = store.record_dataset(out)
    assert store.record_dataset(out) == a  # re-ingesting replaces, never duplicates
    assert store.rows("SELECT count(*) FROM quarantine")[0][0] == 3
    assert store.rows("SELECT count(*) FROM datasets")[0][0] == 1
    # A sparser manifest: inputs as a mapping, no by_reason (counted from quarantine.parquet), no shards.
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (out / "quarantine.parquet").rename(sparse / "quarantine.parquet")
    (sparse / "manifest.json").write_text(json.dumps({"inputs": {"a.parquet": {"rows": 5}},
                                                      "counts": {"rows_in": 5}}))
    b = store.record_dataset(sparse)
    assert dict(store.rows("SELECT reason, n FROM quarantine_counts WHERE dataset_id = ?", [b])) == \
        QUARANTINE_BY_REASON
    assert store.rows("SELECT file, rows FROM dataset_inputs WHERE dataset_id = ?", [b]) == [("a.parquet", 5)]
    with pytest.raises(FileNotFoundError, match="i2l prepare"):
        store.record_dataset(tmp_path / "missing")


def test_runs_and_stages(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    with pytest.raises(ValueError, match="boom"), store.run("train", "debug", {"a": 1}, run_id="t1"):
        raise ValueError("boom")
    assert store.rows("SELECT status, finished_at IS NOT NULL FROM runs") == [("failed", True)]
    started = store.rows("SELECT started_at FROM runs")[0][0]
    store.start_run("train", "debug", {"a": 1}, run_id="t1")  # resume: running again, same start
    assert store.rows("SELECT status, started_at FROM runs") == [("running", started)]
    with pytest.raises(ValueError, match="unknown run"):
        store.finish_run("nope")
    with pytest.raises(ValueError, match="status"):
        store.finish_run("t1", "done")
    assert not store.is_stage_done("prepare", "k") and store.stage_info("prepare", "k") is None
    store.mark_stage_done("prepare", "k", {"rows": 3})
    assert store.is_stage_done("prepare", "k") and store.stage_info("prepare", "k") == {"rows": 3}
    logged = [{"step": 1, "loss": 0.5}, {"step": 1, "loss": 0.4, "lr": 0.1, "gn": 2}]
    assert store.record_curve("t1", logged) == 1
    assert store.rows("SELECT loss, lr, extra->>'gn' FROM train_curves") == [(0.4, 0.1, "2")]


def test_fail_open_runs_marks_only_what_this_process_left_unfinished(tmp_path, monkeypatch):
    """At a termination signal: every run this process started and has not finished, in whichever store file it
    lives, is marked failed; finished runs and runs of other processes are left as they are."""
    from i2l.store import fail_open_runs, results

    monkeypatch.setattr(results, "_OPEN_RUNS", {})  # not the runs earlier tests of this process left open

    a, b = Store(tmp_path / "a.duckdb"), Store(tmp_path / "b.duckdb")
    with a.run("train", "debug", None, run_id="done"):
        pass
    with pytest.raises(RuntimeError), a.run("eval", "debug", None, run_id="raised"):
        raise RuntimeError
    a.start_run("pipeline", "debug", None, run_id="parent")
    with a.run("train", "debug", None, run_id="inner"):
        b.start_run("produce", "debug", None, run_id="other-file")
        # another process's run in the same file: never this process's to mark
        theirs = "import sys; from i2l.store import Store; Store(sys.argv[1]).start_run('x', None, None, run_id='theirs')"
        subprocess.run([sys.executable, "-c", theirs, str(a.path)], cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
        gone = Store(tmp_path / "gone" / "c.duckdb")
        gone.start_run("eval", "debug", None, run_id="store-removed")
        gone.path.unlink()
        assert sorted(fail_open_runs()) == ["inner", "other-file", "parent"]
        assert not gone.path.exists()  # no empty store made where one was removed
        assert fail_open_runs() == []  # marked once: no longer open
    status = dict(a.rows("SELECT run_id, status FROM runs"))
    assert status == {"done": "ok", "raised": "failed", "parent": "failed", "inner": "ok", "theirs": "running"}
    assert b.rows("SELECT status FROM runs") == [("failed",)]


def test_read_only_store_refuses_writes(fixture_store):
    store, _ = fixture_store
    reader = Store(store.path, read_only=True)
    with pytest.raises(ValueError, match="read-only"):
        reader.start_run("x", None, None)
    with pytest.raises(duckdb.Error):
        reader.query("DELETE FROM runs")
    assert reader.rows("SELECT count(*) FROM runs")[0][0] == 4
    with pytest.raises(FileNotFoundError, match="i2l run"):
        Store(store.path.with_name("absent.duckdb"), read_only=True)


def test_query_command(fixture_store, capsys):
    from i2l.cli import main

    store, _ = fixture_store
    sql = ("SELECT method, round(mean, 3) AS overall FROM v_method_summary WHERE metric = 'overall' "
           "ORDER BY 2 DESC")
    assert main(["query", "--db", str(store.path), sql]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "overall"] and lines[1].split()[0] == "i2l_4ref_asym"
    assert float(lines[1].split()[1]) == 0.75 and len(lines) == 1 + len(METHODS)
    assert main(["query", "--db", str(store.path), "--format", "csv",
                 "SELECT count(*) AS n FROM samples"]) == 0
    assert capsys.readouterr().out == "n\n30\n"
    assert main(["query", "--db", str(store.path), "DROP TABLE runs"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_a_lora_row_round_trips_through_the_store(tmp_path):
    """lora_row reads rank and norms off the LoRA and the sha256 off its file; the loras table keeps them."""
    import torch

    from i2l.io import file_sha256
    from i2l.model.lora import LoRA
    from i2l.store.rows import lora_row

    g = torch.Generator().manual_seed(0)
    lora = LoRA({"blocks.0.attn.to_q": torch.randn(2, 8, generator=g)},
                {"blocks.0.attn.to_q": torch.randn(8, 2, generator=g)}, "toy")
    path = lora.save(tmp_path / "style.safetensors")
    row = lora_row("run/i2l_4ref/v1", "s000001", "i2l_4ref", lora, checkpoint_id="train:2", path=path, n_refs=4,
                   ref_ids=["a", "b", "c", "d"])
    store = Store(tmp_path / "results.duckdb")
    assert store.record_loras([row]) == ["run/i2l_4ref/v1"]
    got = store.query("SELECT * FROM loras").iloc[0]
    assert (got.style_id, got.method, got.checkpoint_id, got.path, got.sha256, got["rank"], got.n_refs) == \
        ("s000001", "i2l_4ref", "train:2", str(path), file_sha256(path), 2, 4)
    assert json.loads(got.norms) == pytest.approx(lora.norms()) and json.loads(got.ref_ids) == ["a", "b", "c", "d"]
    bare = lora_row(None, "s000002", "per_style@5", lora)  # no file, no id: named by method and style
    assert store.record_loras([bare]) == ["per_style@5:s000002:"] and bare["sha256"] is None


def test_report_queries_answer_from_the_fixture_run(fixture_store):
    from i2l.store import queries

    store, info = fixture_store
    top = queries.latest_top_level_run(store)
    family = queries.run_family(store, top)
    assert family.run_id.iloc[0] == top and info["eval_run"] in set(family.run_id)
    assert queries.run_exists(store, top) and not queries.run_exists(store, "nope")
    assert queries.recent_run_ids(store, limit=2) and len(queries.recent_run_ids(store, limit=2)) == 2
    assert queries.latest_eval_run(store, family.run_id.tolist()) == info["eval_run"]
    assert set(queries.grid_samples(store, info["eval_run"]).method) == set(info["methods"])
    with pytest.raises(ValueError, match="query failed"):
        queries.user_query(store, "SELECT * FROM no_such_table")
