"""A disk that fills during `prepare`: a pool actor's parquet shard write fails with pyarrow's real ENOSPC error after
part of the shard went to disk. No partial shard is published, the command fails with one line naming the shard and
"no space left", finished units are kept, and a re-run with space back gives the same outputs as an undisturbed run."""

from __future__ import annotations

import errno
import json
import sys

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

import i2l.data.prepare
from i2l.cli import main as cli
from i2l.config import get_config
from i2l.data.plan import make_plan
from i2l.data.prepare import prepare
from i2l.data.units import UnitRunner
from i2l.toy.world import write_toyworld

FULL_AT = 1  # the unit whose first shard write meets the full disk
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors unpickle this module's class


class FullDiskUnitRunner(UnitRunner):
    """The real actor; in its own process, unit FULL_AT's shard write fails as on a full disk, half written."""

    def run(self, unit):
        if unit.index != FULL_AT:
            return super().run(unit)
        real = pq.ParquetWriter.write_table

        def write_then_full(writer, *args, **kwargs):
            real(writer, *args, **kwargs)  # bytes reach the temporary file, then the disk is full
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

        pq.ParquetWriter.write_table = write_then_full
        try:
            return super().run(unit)
        finally:
            pq.ParquetWriter.write_table = real


def _outputs(out):
    m = json.loads((out / "manifest.json").read_text())
    return {"shards": sorted((s["name"], s["sha256"], s["rows"]) for s in m["shards"]),
            "quarantine": pq.read_table(out / "quarantine.parquet").to_pylist(),
            "val_manifest": (out / "val_manifest.jsonl").read_text(), "counts": m["counts"]}


@pytest.mark.slow  # three prepare runs on the session's cluster
def test_full_disk_in_prepare_publishes_no_partial_shard_and_a_rerun_completes(ray_session, tmp_path, monkeypatch,
                                                                               capsys):
    tw = get_config("debug").toyworld
    inp = tmp_path / "in"
    write_toyworld(tw, inp, progress=False)
    cfg = get_config("debug", {"data.concurrency": 1})  # one actor: unit 0 is finished when unit 1 fails
    units = make_plan(inp, cfg.data, progress=False).units
    assert len(units) > FULL_AT + 1
    clean = tmp_path / "clean"
    prepare(cfg, inp, clean, progress=False)

    out = tmp_path / "out"
    monkeypatch.setattr(i2l.data.prepare, "UnitRunner", FullDiskUnitRunner)
    assert cli(["prepare", "--preset", "debug", "--input", str(inp), "--out", str(out), "--workers", "1",
                "--no-progress"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    name = units[FULL_AT].name
    assert "no space left" in err and any(f"{out / s / name}.parquet" in err for s in ("train", "val")), err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [p for p in left if p.endswith(".tmp") or name in p], left  # nothing of the failed unit, no temp
    assert f".work/units/{units[0].name}.json" in left and "manifest.json" not in left
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")}
    assert finished, "unit 0's shards are kept"

    again = prepare(cfg, inp, out, progress=False)  # space back
    assert again.units_skipped == FULL_AT
    assert finished == {p: p.stat().st_mtime_ns for p in finished}, "finished shards are not rewritten"
    assert _outputs(out) == _outputs(clean)
    assert not list(out.rglob("*.tmp"))
