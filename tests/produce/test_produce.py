"""Mass production on a real local Ray cluster: one file per held-out style + the gray LoRA, a complete catalog (file,
store), files that load with `LoRA.load` and diffusers' `load_lora_weights`, idempotent re-runs, and a `ray.kill`ed
actor whose work is retried so that every LoRA exists exactly once."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from leftovers import dead_writer_tmp

from i2l.cli import main as cli
from i2l.data.shards import iter_rows
from i2l.io import file_sha256
from i2l.model.lora import LoRA
from i2l.produce.catalog import GRAY_FILE, read_catalog, remove_leftovers
from i2l.produce.jobs import StyleJob, jobs_from_images, jobs_from_manifest
from i2l.produce.producer import LoRAProducer
from i2l.produce.stage import produce
from i2l.store import Store


@pytest.fixture(scope="module")
def model(debug_run):
    from i2l.infer.api import I2L

    return I2L.load(debug_run.run_dir)


def manifest_styles(prepared) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (prepared / "val_manifest.jsonl").read_text().splitlines():
        e = json.loads(line)
        out.setdefault(e["style_id"], e["reference_ids"])
    return out


@pytest.mark.slow  # two pools of actors start (~10 s each on 2 busy cores)
def test_produce_manifest_catalog_and_reruns(debug_run, model, tmp_path, ray_session):
    styles = manifest_styles(debug_run.prepared_dir)
    jobs = jobs_from_manifest(debug_run.prepared_dir / "val_manifest.jsonl")
    assert [j.style_id for j in jobs] == list(styles) and all(j.ref_ids == styles[j.style_id] for j in jobs)
    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    first = produce(debug_run.run_dir, jobs[:1], out, Store(db), workers=1, batch_size=1, progress=False)
    assert first.produced == 2 and first.skipped == 0  # one style + the gray LoRA

    # the rest through the command line: only what is missing is made
    argv = ["produce", "--checkpoint", str(debug_run.run_dir), "--manifest", str(debug_run.prepared_dir),
            "--out", str(out), "--db", str(db), "--workers", "1", "--batch-size", "2", "--no-progress"]
    assert cli(argv) == 0
    files = sorted(p.stem for p in (out / "styles").glob("*.safetensors"))
    assert files == sorted(styles) and (out / GRAY_FILE).is_file()
    assert not list(out.rglob("*.tmp")), "no temporary files may remain"

    catalog = read_catalog(out)
    assert len(catalog) == len(styles) + 1 and len({r["lora_id"] for r in catalog}) == len(catalog)
    by_style = {r["style_id"]: r for r in catalog}
    assert set(by_style) == {*styles, None}
    for style, refs in styles.items():
        r = by_style[style]
        path = out / r["path"]
        assert r["ref_ids"] == refs and r["n_refs"] == len(refs) and r["sha256"] == file_sha256(path)
        lora = LoRA.load(path, backbone=model.backbone)  # fits the backbone it was made for
        assert r["norms"] == pytest.approx(lora.norms(), rel=1e-6) and set(r["norms"]) == set(lora.names)
        assert json.loads(lora.meta["ref_ids"]) == refs and lora.meta["checkpoint_id"] == r["checkpoint_id"]
    assert len({r["checkpoint_id"] for r in catalog}) == 1
    # an actor's LoRA = the API's LoRA from the same references
    images = {row["id"]: row["image"] for row in iter_rows(debug_run.prepared_dir, "val", ("id", "image"))}
    job = jobs[0]
    from i2l.data.images import decode

    mine = model.predict_lora([decode(images[i]) for i in job.ref_ids])
    theirs = LoRA.load(out / by_style[job.style_id]["path"])
    assert all(torch.allclose(mine.delta(k), theirs.delta(k), atol=1e-6) for k in mine.names)
    gray = LoRA.load(out / GRAY_FILE)
    assert all(torch.allclose(gray.delta(k), model.gray_lora().delta(k), atol=1e-6) for k in gray.names)

    stored = Store(db, read_only=True).query("SELECT * FROM loras ORDER BY lora_id")
    assert sorted(stored["lora_id"]) == sorted(r["lora_id"] for r in catalog)
    assert {s: h for s, h in zip(stored["lora_id"], stored["sha256"])} == {r["lora_id"]: r["sha256"] for r in catalog}
    assert all(p.startswith(str(out.resolve())) for p in stored["path"])

    # a re-run does nothing: no actor is started, no file is touched; what a kill left half-written is removed
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    for left in (out / f"{GRAY_FILE}.tmp", out / "styles" / f"{jobs[0].style_id}.safetensors.tmp"):
        left.write_bytes(b"half a LoRA")  # what LoRA.save leaves when killed before its rename
    again = produce(debug_run.run_dir, jobs, out, Store(db), progress=False)
    assert (again.produced, again.skipped, again.workers) == (0, len(jobs), 0)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert not list(out.rglob("*.tmp"))

    # a driver killed after files were written but before the catalog was: the files are adopted, not redone
    (out / "catalog.parquet").unlink()
    adopted = produce(debug_run.run_dir, jobs, out, Store(tmp_path / "fresh.duckdb"), progress=False)
    assert (adopted.produced, adopted.workers) == (0, 0)
    assert sorted(map(str, read_catalog(out))) == sorted(map(str, catalog))
    assert Store(tmp_path / "fresh.duckdb", read_only=True).rows("SELECT count(*) FROM loras")[0][0] == len(catalog)


def test_a_producer_and_i2l_predict_write_their_files_without_importing_diffusers(debug_run, tmp_path):
    """Writing a LoRA file needs the backbone kind's layer names, not its class: a produce actor (and `i2l predict`)
    starts ~0.9 s sooner on a CPU without diffusers. Checked in a fresh process, with a file written by each."""
    import subprocess
    import sys

    ck, img = debug_run.checkpoint_dir, tmp_path / "ref.png"
    img.write_bytes(next(iter_rows(debug_run.prepared_dir, "val", ("image",)))["image"])
    code = f"""if True:
        import sys
        from pathlib import Path
        from i2l.produce.producer import LoRAProducer
        from i2l.produce.jobs import StyleJob
        from i2l.cli import main
        p = LoRAProducer({str(ck)!r}, {str(tmp_path / "loras")!r}, "cpu", "test", "0" * 64, "comfyui")
        [row] = p.make([StyleJob("s", ["a"], [Path({str(img)!r}).read_bytes()])])
        assert main(["predict", "--checkpoint", {str(ck)!r}, "--images", {str(img)!r},
                     "--out", {str(tmp_path / "one.safetensors")!r}]) == 0
        print(row["path"], sorted(m for m in sys.modules if m.split(".")[0] == "diffusers"))"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "styles/s.safetensors []", out.stdout[-2000:]
    assert LoRA.load(tmp_path / "one.safetensors").rank == LoRA.load(tmp_path / "loras/styles/s.safetensors").rank


def test_produced_files_load_with_diffusers(debug_run, model, tmp_path):
    """The toy backbone is diffusers' Flux2Transformer2DModel: a file written by the producer (the actor's class,
    run in this process) loads with `load_lora_weights` into a tiny Flux2KleinPipeline around it and gives the same
    velocity as i2l's own LoRA application."""
    refs = [row["image"] for row in iter_rows(debug_run.prepared_dir, "val", ("id", "image"))][:2]
    out = tmp_path / "loras"
    ck = debug_run.checkpoint_dir
    producer = LoRAProducer(str(ck), str(out), "cpu", "test", file_sha256(ck / "predictor.safetensors"))
    [row] = producer.make([StyleJob("user", ["a", "b"], refs)])
    path = out / row["path"]
    assert row["sha256"] == file_sha256(path) and row["n_refs"] == 2
    bb = model.backbone
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=copy.deepcopy(bb.transformer))
    pipe.load_lora_weights(str(path), adapter_name="style")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if ".lora_A." in n}
    assert adapted == set(bb.lora_targets())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g)
    cond = bb.encode_prompts(["one small circle", "two large stars"])
    with torch.no_grad():
        ours = bb.velocity(x, t, cond, LoRA.load(path, backbone=bb))
        base = bb.velocity(x, t, cond)
        own, bb.transformer = bb.transformer, pipe.transformer  # the same adapter, run through diffusers/PEFT
        try:
            theirs = bb._velocity(x, t, cond)
        finally:
            bb.transformer = own
    assert (theirs - ours).abs().max() < 1e-4 and (ours - base).abs().max() > 1e-4


@pytest.mark.slow
def test_killed_actor_is_retried_and_every_lora_exists_once(debug_run, tmp_path, ray_session):
    ray = ray_session
    folder = tmp_path / "user"
    rows = list(iter_rows(debug_run.prepared_dir, "train", ("id", "image")))
    for k in range(6):  # six user styles of two images each
        d = folder / f"style{k}"
        d.mkdir(parents=True)
        for row in rows[8 * k: 8 * k + 2]:
            (d / f"{row['id']}.png").write_bytes(row["image"])
    jobs = jobs_from_images(folder)
    assert [j.style_id for j in jobs] == [f"style{k}" for k in range(6)]
    killed = []

    def kill_once(new_rows, actor):
        if not killed:  # its next batch is submitted after this hook: it must be redone elsewhere
            ray.kill(actor)
            killed.append(actor)
            dead_writer_tmp(out / "styles" / "style3.safetensors")  # the kill can land mid-write: made sure of

    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    s = produce(debug_run.run_dir, jobs, out, Store(db), workers=2, batch_size=1, progress=False,
                on_batch=kill_once)
    assert killed and s.retried_batches >= 1
    assert s.produced == len(jobs) + 1
    assert sorted(p.stem for p in (out / "styles").glob("*")) == [j.style_id for j in jobs]
    catalog = read_catalog(out)
    assert sorted(r["style_id"] or "" for r in catalog) == ["", *[j.style_id for j in jobs]]
    assert all(r["sha256"] == file_sha256(out / r["path"]) for r in catalog)
    refs = dict(Store(db, read_only=True).rows("SELECT style_id, ref_ids FROM loras WHERE style_id IS NOT NULL"))
    assert {k: __import__("json").loads(v) for k, v in refs.items()} == {j.style_id: list(j.ref_ids) for j in jobs}
    stored = Store(db, read_only=True).rows("SELECT style_id, count(*) FROM loras GROUP BY style_id")
    assert sorted((a or "", n) for a, n in stored) == sorted((r["style_id"] or "", 1) for r in catalog)


def test_leftovers_of_a_killed_run_are_removed_and_finished_files_kept(tmp_path):
    """Temp names that do not say their writer (older formats: `<name>.tmp`, `.<name>.<random>.tmp`) are leftovers;
    live writers' files are kept (tests/produce/test_produce_concurrency.py)."""
    out = tmp_path / "loras"
    (out / "styles").mkdir(parents=True)
    left = [out / f"{GRAY_FILE}.tmp", out / ".catalog.parquet.tmp", out / ".catalog.parquet.0123abcd.tmp",
            out / ".production.json.89abcdef.tmp", out / "styles" / "s1.safetensors.tmp",
            out / "styles" / ".s2.safetensors.tmp"]
    kept = [out / GRAY_FILE, out / "catalog.parquet", out / "production.json", out / "styles" / "s1.safetensors"]
    for p in (*left, *kept):
        p.write_bytes(b"x")
    remove_leftovers(out)
    assert [p for p in left if p.exists()] == [] and all(p.is_file() for p in kept)


def test_bad_inputs_are_refused_before_any_work(debug_run, tmp_path):
    folder = tmp_path / "user"
    (folder / "good").mkdir(parents=True)
    row = next(iter_rows(debug_run.prepared_dir, "val", ("id", "image")))
    (folder / "good" / "a.png").write_bytes(row["image"])
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "good" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="2 reference image.*cannot be used") as e:  # every bad file, in one error
        jobs_from_images(folder)
    assert "bad.jpg" in str(e.value) and "empty.png" in str(e.value) and "a.png" not in str(e.value)
    (folder / "bad.jpg").unlink()
    (folder / "good" / "empty.png").unlink()
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="without images.*empty"):
        jobs_from_images(folder)
    store, out = Store(tmp_path / "r.duckdb"), tmp_path / "loras"
    twice = [StyleJob("s1", ["a"], [row["image"]]), StyleJob("s1", ["b"], [row["image"]])]
    for jobs, message in ((twice, "appears twice"), ([StyleJob("../x", ["a"], [row["image"]])], "file name"),
                          ([StyleJob("s2", [], [])], "no reference images"), ([], "no styles")):
        with pytest.raises(ValueError, match=message):
            produce(debug_run.run_dir, jobs, out, store, progress=False)
    assert not out.exists(), "a refused run must not write anything"
    with pytest.raises(FileNotFoundError, match="no validation manifest"):
        jobs_from_manifest(tmp_path)
    # an output directory belongs to one checkpoint
    out.mkdir()
    (out / "production.json").write_text(json.dumps({"checkpoint_sha256": "0" * 64, "checkpoint_id": "other"}))
    with pytest.raises(FileExistsError, match="holds LoRAs of checkpoint other"):
        produce(debug_run.run_dir, [StyleJob("s1", ["a"], [row["image"]])], out, store, progress=False)


@pytest.mark.slow  # one pool whose actors fail to start, one that works
def test_a_checkpoint_that_fails_to_load_does_not_bind_the_folder(debug_run, tmp_path, ray_session):
    """The output folder is bound (production.json) only once the actors have loaded the checkpoint: a truncated
    predictor fails the run and leaves the folder free for the repaired checkpoint."""
    import shutil

    ck = tmp_path / "run" / "checkpoints" / debug_run.checkpoint_dir.name
    shutil.copytree(debug_run.checkpoint_dir, ck)
    weights = ck / "predictor.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a copy cut short
    row = next(iter_rows(debug_run.prepared_dir, "val", ("id", "image")))
    jobs, out, store = [StyleJob("s1", ["a"], [row["image"]])], tmp_path / "loras", Store(tmp_path / "r.duckdb")
    with pytest.raises(Exception):  # noqa: B017  (the actors' load error, or the checkpoint's own check)
        produce(ck, jobs, out, store, workers=1, progress=False)
    assert not (out / "production.json").exists(), "a checkpoint that did not load must not claim the folder"
    weights.write_bytes(good)  # repaired
    s = produce(ck, jobs, out, store, workers=1, progress=False)
    assert s.produced == 2
    assert json.loads((out / "production.json").read_text())["checkpoint_sha256"] == file_sha256(weights)
    assert [r["style_id"] for r in read_catalog(out)].count("s1") == 1
