"""One unit of `prepare`'s work, run by a pool actor: read its row ranges, validate, upscale, encode, write one
train and one val shard (and its quarantine piece), then its record, last: a unit whose record is on disk is done."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from i2l.config import DataConfig
from i2l.data.megastyle import (
    QUARANTINE_SCHEMA,
    InputShard,
    RowRangeReader,
    ShardWriter,
    encode_image,
    image_bytes,
    style_id_of,
)
from i2l.data.plan import Unit, quarantine_row
from i2l.data.validate import Rejected, validate_row
from i2l.io import write_json_atomic

WORK = ".work"  # per-unit records and quarantine pieces: what makes a re-run resume


def process_unit(unit: Unit, shards: list[InputShard], input_dir, out_dir, cfg: DataConfig, upscaler,
                 fingerprint: str) -> dict:
    """Read, validate, upscale, encode and write one unit; returns (and writes, last) its record."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    reader = RowRangeReader(input_dir)
    writers = {s: ShardWriter(out / s / f"{unit.name}.parquet", s, cfg.row_group_rows) for s in ("train", "val")}
    qwriter = ShardWriter(out / WORK / "quarantine" / f"{unit.name}.parquet", "quarantine", 1 << 16,
                          QUARANTINE_SCHEMA)
    batch: list[tuple[str, str, str, object]] = []  # (id, style_id, source, ValidRow)

    def flush():
        images = upscaler([v.image for *_, v in batch])
        for (rid, sid, source, v), im in zip(batch, images):
            data = encode_image(im, cfg.image_format, cfg.quality)
            split = "val" if sid in unit.val_styles else "train"
            writers[split].write({"id": rid, "style_id": sid, "content": v.content, "style": v.style,
                                  "image": data, "width": im.size[0], "height": im.size[1],
                                  "sha256": hashlib.sha256(data).hexdigest(), "split": split,
                                  "source_file": source})
        batch.clear()

    try:
        for fi, start, stop in unit.segments:
            shard = shards[fi]
            for lo, table in reader.read(shard, start, stop):
                cols = zip(table.column("id").to_pylist(), image_bytes(table),
                           table.column("content").to_pylist(), table.column("style").to_pylist())
                for k, (rid, data, content, style) in enumerate(cols):
                    try:
                        batch.append((rid, style_id_of(rid), shard.path, validate_row(data, content, style, cfg)))
                    except Rejected as e:
                        qwriter.write(quarantine_row(rid, shard.path, lo + k, e.reason, e.detail))
                    if len(batch) >= cfg.batch_size:
                        flush()
        if batch:
            flush()
        shard_records = [r for r in (writers["train"].close(), writers["val"].close()) if r]
        qwriter.close()
    except BaseException:
        for w in (*writers.values(), qwriter):
            w.abort()
        raise
    record = {"fingerprint": fingerprint, "unit": unit.index, "rows_in": unit.rows, "shards": shard_records,
              "quarantined": qwriter.rows, "seconds": round(time.perf_counter() - t0, 3),
              "cpu_seconds": round(time.process_time() - c0, 3)}
    if sum(r["rows"] for r in shard_records) + qwriter.rows != unit.rows:
        raise RuntimeError(f"unit {unit.name}: {unit.rows} rows in but {record} out (a bug; please report)")
    write_json_atomic((out / WORK / "units" / f"{unit.name}.json"), record)  # last: the unit counts as done only now
    return record


def unit_done(out: Path, unit: Unit, fingerprint: str) -> dict | None:
    """The unit's record if an earlier run finished it (same plan, files in place), else None."""
    try:
        rec = json.loads((out / WORK / "units" / f"{unit.name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    files_ok = all((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
                   for s in rec.get("shards", []))
    q_ok = rec["quarantined"] == 0 or (out / WORK / "quarantine" / f"{unit.name}.parquet").is_file()
    return rec if rec.get("fingerprint") == fingerprint and files_ok and q_ok else None


class UnitRunner:
    """Holds one upscaler (loaded once; on a GPU for diffusers) and runs units: the pool's actor class."""

    def __init__(self, input_dir: str, out_dir: str, cfg: DataConfig, shards: list[InputShard], fingerprint: str):
        from i2l.data.upscale import load_upscaler

        self.args = (shards, input_dir, out_dir, cfg)
        self.upscaler, self.fingerprint = load_upscaler(cfg), fingerprint

    def run(self, unit: Unit) -> dict:
        shards, input_dir, out_dir, cfg = self.args
        return process_unit(unit, shards, input_dir, out_dir, cfg, self.upscaler, self.fingerprint)
