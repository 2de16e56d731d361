"""A disk that fills during `produce`: the LoRA file an actor is writing (safetensors' real ENOSPC error, after part
of the file went to disk) and then the driver's catalog write (pyarrow's). Each time: no partial file is published,
the command fails with one line naming the file and "no space left", finished LoRAs stay, and a re-run with space back
completes with every LoRA exactly once, the LoRAs an undisturbed producer makes."""

from __future__ import annotations

import errno
import sys

import pytest
import ray.cloudpickle
import torch
from safetensors import SafetensorError

import i2l.model.lora
import i2l.produce.stage
from i2l.cli import main as cli
from i2l.data.shards import iter_rows
from i2l.io import DiskFullError, file_sha256
from i2l.model.lora import LoRA
from i2l.produce.catalog import GRAY_FILE, read_catalog
from i2l.produce.jobs import jobs_from_images
from i2l.produce.producer import LoRAProducer
from i2l.produce.stage import produce
from i2l.store import Store

FULL_AT = "style4"  # the last style's file meets the full disk (no later call can race the error)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors unpickle this module's classes


def _save_file_then_full(tensors, filename, metadata=None):
    """safetensors' save_file on a disk that fills half-way: part of the file is written, then its error."""
    from safetensors.torch import save_file

    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class FullDiskProducer(LoRAProducer):
    """The real actor; in its own process, the write of FULL_AT's file fails as on a full disk."""

    def make(self, jobs, out=None):
        if all(j.style_id != FULL_AT for j in jobs):
            return super().make(jobs, out)
        real = i2l.model.lora.save_file
        i2l.model.lora.save_file = _save_file_then_full
        try:
            return super().make(jobs, out)
        finally:
            i2l.model.lora.save_file = real


def _user_styles(debug_run, folder, n=5):
    rows = list(iter_rows(debug_run.prepared_dir, "train", ("id", "image")))
    for k in range(n):
        d = folder / f"style{k}"
        d.mkdir(parents=True)
        for row in rows[8 * k: 8 * k + 2]:
            (d / f"{row['id']}.png").write_bytes(row["image"])
    return folder


def _published(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix != ".lock")


@pytest.mark.slow  # two pools of one actor each
def test_full_disk_in_produce_publishes_nothing_partial_and_a_rerun_completes(debug_run, tmp_path, ray_session,
                                                                              monkeypatch, capsys):
    folder = _user_styles(debug_run, tmp_path / "user")
    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    argv = ["produce", "--preset", "debug", "--checkpoint", str(debug_run.run_dir), "--images", str(folder),
            "--out", str(out), "--db", str(db), "--workers", "1", "--batch-size", "1", "--no-progress"]

    # 1. the actor's LoRA file: one line, the file named; gray and style0-3 were finished and are kept
    monkeypatch.setattr(i2l.produce.stage, "LoRAProducer", FullDiskProducer)
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left" in err and str(out / "styles" / f"{FULL_AT}.safetensors") in err, err
    finished = [GRAY_FILE, *(f"styles/style{k}.safetensors" for k in range(4))]
    assert _published(out) == sorted(["catalog.parquet", "production.json", *finished]), \
        "no partial or temporary file may be left"
    kept = {r["path"]: r["sha256"] for r in read_catalog(out)}
    assert kept == {p: file_sha256(out / p) for p in finished}
    monkeypatch.undo()

    # 2. the driver's catalog write (space back for the LoRA files): the catalog on disk stays the last whole one
    import pyarrow.parquet as pq

    real_write_table = pq.write_table

    def write_table_then_full(table, where, *args, **kwargs):
        real_write_table(table, where, *args, **kwargs)
        with open(where, "r+b") as f:
            f.truncate(7)
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", write_table_then_full)
    jobs = jobs_from_images(folder)
    with pytest.raises(DiskFullError, match=f"no space left on device writing {out / 'catalog.parquet'}"):
        produce(debug_run.run_dir, jobs, out, Store(db), workers=1, batch_size=1, progress=False)
    monkeypatch.undo()
    assert {r["path"]: r["sha256"] for r in read_catalog(out)} == kept
    assert not [p for p in _published(out) if p.endswith(".tmp")]

    # 3. space back: the files of run 2 are adopted, nothing is made again; every LoRA once, as a clean run's
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = produce(debug_run.run_dir, jobs, out, Store(db), workers=1, batch_size=1, progress=False)
    assert (again.produced, again.workers) == (0, 0)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    catalog = read_catalog(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert sorted(r["path"] for r in catalog) == files == [GRAY_FILE, *(f"styles/style{k}.safetensors"
                                                                          for k in range(5))]
    assert all(r["sha256"] == file_sha256(out / r["path"]) for r in catalog)
    stored = Store(db, read_only=True).rows("SELECT lora_id, sha256 FROM loras")
    assert sorted(stored) == sorted((r["lora_id"], r["sha256"]) for r in catalog)

    ck = debug_run.checkpoint_dir
    clean = LoRAProducer(str(ck), str(tmp_path / "clean"), "cpu", catalog[0]["checkpoint_id"],
                         file_sha256(ck / "predictor.safetensors"))
    reference = [r["path"] for j in jobs for r in clean.make([j])] + [r["path"] for r in clean.make_gray()]
    assert sorted(reference) == files
    for path in files:  # the same LoRA (an actor's torch threads may change the last bits, not more)
        mine, theirs = LoRA.load(out / path), LoRA.load(tmp_path / "clean" / path)
        assert mine.meta == theirs.meta and mine.names == theirs.names
        assert all(torch.allclose(mine.delta(k), theirs.delta(k), atol=1e-6) for k in mine.names)
