"""`prepare` on a local 2-worker Ray cluster: toy world round trip, style-disjoint split, validation manifest,
bad rows through the pipeline, resuming (skips, stale outputs) and a real `i2l prepare` killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from hashlib import sha256
from pathlib import Path

import conftest_ray
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from bad_data import check_converted, read_split_images, write_bad_dataset
from leftovers import dead_writer_tmp
from PIL import Image

import i2l.data.prepare as prepare_module
from i2l.config import get_config
from i2l.data.megastyle import QUARANTINE_SCHEMA
from i2l.data.plan import make_plan
from i2l.data.prepare import prepare
from i2l.data.shards import iter_rows, split_files
from i2l.toy.world import write_toyworld

REPO = Path(__file__).resolve().parents[2]
ray_session = conftest_ray.ray_session  # the session fixture: one Ray cluster for every test here


def _cfg(**overrides):
    return get_config("debug", {"data.concurrency": 2, **overrides})


def _toy(path: Path, styles: int = 12, rows_per_shard: int = 40) -> Path:
    tw = get_config("debug").toyworld
    tw.styles, tw.rows_per_shard = styles, rows_per_shard
    write_toyworld(tw, path, progress=False)
    return path


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return _toy(tmp_path_factory.mktemp("toy") / "in")


def _outputs(out: Path) -> dict:
    """What a run leaves behind, by content: shard checksums, quarantine rows, val manifest."""
    m = json.loads((out / "manifest.json").read_text())
    return {"shards": sorted((s["name"], s["sha256"], s["rows"]) for s in m["shards"]),
            "quarantine": pq.read_table(out / "quarantine.parquet").to_pylist(),
            "val_manifest": (out / "val_manifest.jsonl").read_text(), "counts": m["counts"]}


def test_toy_round_trip(ray_session, toy_dir, tmp_path):
    cfg = _cfg()
    s = prepare(cfg, toy_dir, tmp_path / "out", progress=False)
    inp = pq.read_table(sorted(toy_dir.glob("*.parquet")), columns=["id", "content", "style"]).to_pylist()
    inp = {r["id"]: r for r in inp}
    rows = {}
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "out" / split).glob("part-*.parquet")):
            t = pq.read_table(shard).to_pylist()
            seen: list[str] = []  # rows of one style consecutive within the shard
            for r in t:
                assert r["id"] not in rows, f"duplicate {r['id']}"
                rows[r["id"]] = r
                if not seen or seen[-1] != r["style_id"]:
                    assert r["style_id"] not in seen, f"style {r['style_id']} split inside {shard.name}"
                    seen.append(r["style_id"])
                assert r["split"] == split and r["style_id"] == r["id"].split("_")[0]
                assert (r["content"], r["style"]) == (inp[r["id"]]["content"], inp[r["id"]]["style"])
                assert r["sha256"] == sha256(r["image"]).hexdigest() and (r["width"], r["height"]) == (32, 32)
                assert r["source_file"].startswith("train-") and r["source_file"].endswith(".parquet")
    assert set(rows) == set(inp)  # every row present, once
    im = Image.open(__import__("io").BytesIO(next(iter(rows.values()))["image"]))
    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    train = {r["style_id"] for r in rows.values() if r["split"] == "train"}
    val = {r["style_id"] for r in rows.values() if r["split"] == "val"}
    assert val and train and not train & val  # style-disjoint
    # validation manifest: val_samples samples, 1 prompt + 4 references of the same held-out style
    samples = [json.loads(x) for x in (tmp_path / "out" / "val_manifest.jsonl").read_text().splitlines()]
    assert len(samples) == cfg.data.val_samples == s.val_samples
    assert len({x["sample_id"] for x in samples}) == len(samples)
    assert len({x["style_id"] for x in samples}) == min(len(val), len(samples))  # round-robin over styles
    for x in samples:
        target = rows[x["target_id"]]
        assert target["split"] == "val" and target["style_id"] == x["style_id"]
        assert (x["prompt"], x["style"]) == (target["content"], target["style"])
        assert len(x["reference_ids"]) == 4 == len(set(x["reference_ids"])) and x["target_id"] not in x["reference_ids"]
        assert all(rows[r]["style_id"] == x["style_id"] and rows[r]["split"] == "val" for r in x["reference_ids"])
    # counts reconcile, and the manifest says so
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (s.rows_in, s.rows_written, s.rows_quarantined) == (96, 96, 0) == tuple(
        m["counts"][k] for k in ("rows_in", "rows_written", "rows_quarantined"))
    assert (s.styles_train, s.styles_val) == (len(train), len(val))
    assert len(m["shards"]) == s.shards and {i["file"] for i in m["inputs"]} >= {p.name for p in toy_dir.glob("*")}
    assert pq.read_schema(tmp_path / "out" / "quarantine.parquet").equals(QUARANTINE_SCHEMA)
    assert sum(1 for _ in iter_rows(tmp_path / "out", "val", columns=("id",))) == len(
        [r for r in rows.values() if r["split"] == "val"])


def test_split_is_a_function_of_style_and_seed(toy_dir, tmp_path):
    other_layout = _toy(tmp_path / "in24", rows_per_shard=24)  # same rows, other shards and row groups

    def val_styles(d, seed=0):
        plan = make_plan(d, get_config("debug", {"data.seed": seed}).data, progress=False)
        return set().union(*(u.val_styles for u in plan.units))

    assert val_styles(toy_dir) == val_styles(other_layout)
    assert any(val_styles(toy_dir, seed) != val_styles(toy_dir) for seed in (1, 2, 3))


def test_bad_rows_through_ray(ray_session, tmp_path):
    inp, kept, rejects = write_bad_dataset(tmp_path)
    s = prepare(_cfg(), inp, tmp_path / "out", progress=False)
    check_converted(read_split_images(tmp_path / "out"), kept)
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert sorted((r["id"], r["reason"]) for r in q) == rejects
    assert s.rows_in == s.rows_written + s.rows_quarantined == len(kept) + len(rejects)
    assert s.by_reason == dict(Counter(reason for _, reason in rejects))


def test_rerun_skips_and_refuses_stale(ray_session, toy_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare(_cfg(), toy_dir, out, progress=False)
    before = _outputs(out)
    again = prepare(_cfg(), toy_dir, out, progress=False)
    assert again.units_skipped == again.units == first.units and again.rows_processed == 0
    assert _outputs(out) == before
    victim = out / before["shards"][1][0]
    victim.unlink()  # a lost shard is redone, identically
    run_units, left = prepare_module._run_units, []

    def actor_died_mid_shard(*args):  # what an actor killed while writing leaves (its unit runs again elsewhere)
        for rec in run_units(*args):
            left.append(dead_writer_tmp(victim))
            yield rec

    monkeypatch.setattr(prepare_module, "_run_units", actor_died_mid_shard)
    redo = prepare(_cfg(), toy_dir, out, progress=False)
    assert redo.units_skipped == first.units - 1 and _outputs(out) == before
    assert left and not any(p.exists() for p in left), "a dead writer's temporary outlived the run"
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--force"):
        prepare(_cfg(**{"data.resolution": 48}), toy_dir, out, progress=False)
    forced = prepare(_cfg(**{"data.resolution": 48}), toy_dir, out, progress=False, force=True)
    assert forced.rows_written == 96 and forced.units_skipped == 0
    first_row = next(iter_rows(out, "train", columns=("width", "height")))
    assert (first_row["width"], first_row["height"]) == (48, 48)


def test_rerun_keeps_the_dataset_identity(ray_session, toy_dir, tmp_path):
    """A re-run with nothing to do rewrites the manifest's timings only: the data's id (evaluation keys, the
    store's dataset row) must not change with them."""
    from i2l.eval.stage import dataset_fingerprint
    from i2l.store import Store

    out, store = tmp_path / "out", Store(tmp_path / "results.duckdb")
    prepare(_cfg(), toy_dir, out, progress=False)
    first = dataset_fingerprint(out)
    assert store.record_dataset(out) == first
    again = prepare(_cfg(), toy_dir, out, progress=False)
    assert again.rows_processed == 0
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "timings": {"total": 1e6}}))  # whatever the clock said
    assert dataset_fingerprint(out) == first and store.record_dataset(out) == first
    assert store.rows("SELECT dataset_id FROM datasets") == [(first,)]
    m["shards"][0]["sha256"] = "0" * 64  # other data: another id
    (out / "manifest.json").write_text(json.dumps(m))
    assert dataset_fingerprint(out) != first


def test_one_style_prepares_with_an_empty_val_manifest(ray_session, toy_dir, tmp_path, caplog):
    """No style can be held out: prepare still finishes (manifest.json written), with a warning and an empty
    val manifest, and the train split reads back without the quarantine."""
    table = pq.read_table(min(toy_dir.glob("*.parquet")))
    sid = table.column("id")[0].as_py().split("_")[0]
    one = table.filter(pc.starts_with(table.column("id"), sid + "_"))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(one, inp / "train-00000-of-00001.parquet")
    with caplog.at_level("WARNING", logger="i2l.data.prepare"):
        s = prepare(_cfg(), inp, out, progress=False)
    assert (s.rows_written, s.styles_train, s.styles_val, s.val_samples) == (one.num_rows, 1, 0, 0)
    assert json.loads((out / "manifest.json").read_text())["counts"]["rows_written"] == one.num_rows
    assert (out / "val_manifest.jsonl").read_text() == "" and "no val shards" in caplog.text
    assert split_files(out, "train") == [out / "train" / "part-00000.parquet"]
    with pytest.raises(FileNotFoundError, match="no val shards"):
        split_files(out, "val")


@pytest.mark.parametrize("layout", ["prepared", "raw"])
def test_split_files_never_reads_a_quarantine(tmp_path, layout):
    pq.write_table(pa.table({"id": ["s1_c1"], "reason": ["too_small"]}), tmp_path / "quarantine.parquet")
    if layout == "prepared":  # prepared, every row quarantined: no shards, and not a raw directory either
        (tmp_path / "manifest.json").write_text("{}")
        pq.write_table(pa.table({"id": ["s1_c1"]}), tmp_path / "stray.parquet")
        with pytest.raises(FileNotFoundError, match="no train shards"):
            split_files(tmp_path, "train")
    else:
        pq.write_table(pa.table({"id": ["s1_c1"]}), tmp_path / "train-00000-of-00001.parquet")
        assert [p.name for p in split_files(tmp_path, "train")] == ["train-00000-of-00001.parquet"]


@pytest.mark.slow
def test_killed_run_finishes_on_rerun(ray_session, tmp_path):
    """SIGKILL a real `i2l prepare` mid-run, re-run it: same output as an uninterrupted run."""
    inp = _toy(tmp_path / "in", styles=64, rows_per_shard=48)
    sets = ["data.resolution=128", "data.rows_per_shard=16", "data.concurrency=2"]
    cfg = get_config("debug", sets)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "i2l.cli", "prepare", "--preset", "debug", "--input", str(inp),
           "--out", str(killed), "--no-progress", *(a for s in sets for a in ("--set", s))]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    units = killed / ".work" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(units.glob("*.json"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)  # our own child, by pid
    proc.wait()
    n_done = len(list(units.glob("*.json")))
    total = len(make_plan(inp, cfg.data, progress=False).units)
    assert 3 <= n_done < total and not (killed / "manifest.json").exists(), (n_done, total)
    deadline = time.time() + 60  # Ray kills the dead driver's actors; let them go before re-running
    while time.time() < deadline and ray_session.available_resources().get("CPU", 0) < 2:
        time.sleep(0.2)
    resumed = prepare(cfg, inp, killed, progress=False)
    assert resumed.units_skipped >= n_done
    clean = prepare(cfg, inp, tmp_path / "clean", progress=False)
    assert _outputs(killed) == _outputs(tmp_path / "clean")
    assert resumed.rows_written == clean.rows_written == 64 * 8
    for out in (killed, tmp_path / "clean"):  # byte-identical shards, no leftovers
        assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/part-*.parquet")) == [
            s[0] for s in _outputs(out)["shards"]]
        assert not list(out.rglob("*.tmp"))
    assert len(read_split_images(killed)) == 64 * 8
