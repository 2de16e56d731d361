"""`prepare`: a MegaStyle-layout directory -> validated, upscaled, style-disjoint train/val parquet shards, made
by a pool of Ray actors, with a quarantine of rejected rows, a validation manifest and a resumable manifest.

Stages: plan (driver; reads only the `id` column) -> units (actors; read, validate, upscale, encode, write one
train and one val shard each) -> finalize (driver; quarantine, val manifest, manifest.json). Every file is
written under a temporary name and renamed; a unit whose record is on disk is never redone.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from i2l.config import Config, DataConfig
from i2l.data.megastyle import (
    QUARANTINE_SCHEMA,
    InputShard,
    RowRangeReader,
    ShardWriter,
    encode_image,
    find_shards,
    image_bytes,
    read_metadata,
    style_id_of,
    write_quarantine,
)
from i2l.data.upscale import upscaler_needs_gpu
from i2l.data.validate import Rejected, validate_row
from i2l.io import atomic_tmp, write_json_atomic

log = logging.getLogger(__name__)
WORK = ".work"  # per-unit records and quarantine pieces: what makes a re-run resume
OUTPUT_NAMES = ("train", "val", WORK, "manifest.json", "quarantine.parquet", "val_manifest.jsonl")
# DataConfig fields that change how fast, not what is written: a change of them keeps finished shards valid.
_RUNTIME_FIELDS = ("batch_size", "concurrency", "val_samples", "val_refs")
_ROW_MASK = (1 << 40) - 1  # positions pack (shard index << 40) | row


@dataclass(frozen=True)
class Unit:
    """One piece of work: input row ranges holding whole styles; writes train/ and val/ part-{index}."""

    index: int
    segments: tuple[tuple[int, int, int], ...]  # (input shard, start row, stop row); a style's rows adjacent
    val_styles: frozenset[str]
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass
class Plan:
    shards: list[InputShard]
    units: list[Unit]
    rejects: list[dict]  # rows refused before reading images: bad_id, duplicate_id
    fingerprint: str


@dataclass
class PrepareSummary:
    out_dir: str
    rows_in: int
    rows_written: int
    rows_quarantined: int
    by_reason: dict[str, int]
    styles_train: int
    styles_val: int
    shards: int
    bytes: int
    val_samples: int
    units: int
    units_skipped: int  # finished by an earlier run
    rows_processed: int  # by this run
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_processed / max(self.timings.get("units", 0.0), 1e-9)

    def format(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items())) or "none"
        return (f"prepared {self.out_dir}: {self.rows_written}/{self.rows_in} rows written, "
                f"{self.rows_quarantined} quarantined ({reasons})\n"
                f"  styles: {self.styles_train} train, {self.styles_val} val; {self.val_samples} val samples\n"
                f"  shards: {self.shards} ({self.bytes / 2**20:.1f} MiB); units: {self.units} "
                f"({self.units_skipped} already done)\n"
                f"  time: {self.seconds:.1f} s; {self.rows_processed} rows processed at {self.rows_per_s:.1f} rows/s")


def split_score(style_id: str, seed: int) -> float:
    """Uniform in [0, 1) from (seed, style_id) alone: the split depends on no order and no worker count."""
    h = hashlib.blake2b(f"{seed}:{style_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def plan_fingerprint(shards: list[InputShard], cfg: DataConfig) -> str:
    data = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    inputs = [s.to_dict() for s in shards]
    return hashlib.sha256(json.dumps([inputs, data], sort_keys=True).encode()).hexdigest()[:16]


def _reject(row_id, source: str, row: int, reason: str, detail: str) -> dict:
    rid = row_id if isinstance(row_id, str) else None
    return {"id": rid[:200] if rid else rid, "source_file": source, "row_index": row, "reason": reason,
            "detail": detail[:500]}


def make_plan(input_dir: str | os.PathLike, cfg: DataConfig, shards: list[InputShard] | None = None,
              progress: bool = True) -> Plan:
    """Read the id column only: bad and duplicate ids, style runs, the style-disjoint split and the units."""
    from tqdm import tqdm

    shards = shards if shards is not None else find_shards(input_dir)
    reader = RowRangeReader(input_dir, columns=["id"])
    runs: list[list] = []  # [style_id, shard, start, stop]: maximal consecutive rows of one style
    rejects, digests, positions = [], [], []
    for fi, shard in enumerate(tqdm(shards, desc="plan", unit="shard", disable=not progress)):
        cur = None
        for lo, table in reader.read(shard, 0, shard.rows):
            ids = table.column("id").to_pylist()
            keys, pos = [], []
            for k, rid in enumerate(ids):
                sid = style_id_of(rid)
                if sid is None:
                    rejects.append(_reject(rid, shard.path, lo + k, "bad_id", repr(rid)[:80]))
                    cur = None
                    continue
                if cur is not None and cur[0] == sid and cur[3] == lo + k:
                    cur[3] += 1
                else:
                    cur = [sid, fi, lo + k, lo + k + 1]
                    runs.append(cur)
                keys.append(hashlib.blake2b(rid.encode(), digest_size=16).digest())
                pos.append((fi << 40) | (lo + k))
            digests.append(np.frombuffer(b"".join(keys), dtype="S16"))
            positions.append(np.asarray(pos, dtype=np.int64))
    # Duplicates: 16-byte digests (24 B/row with positions), first occurrence in input order wins.
    dup: dict[int, int] = {}
    if digests:
        d, p = np.concatenate(digests), np.concatenate(positions)
        _, first, inverse = np.unique(d, return_index=True, return_inverse=True)
        is_dup = np.ones(len(d), bool)
        is_dup[first] = False
        dup = dict(zip(p[is_dup].tolist(), p[first[inverse[is_dup]]].tolist()))
    dup_pos = sorted(dup)
    styles: dict[str, list[tuple[int, int, int]]] = {}  # insertion order = first appearance
    for sid, fi, start, stop in runs:
        segs = styles.setdefault(sid, [])
        i = bisect.bisect_left(dup_pos, (fi << 40) | start)
        while i < len(dup_pos) and dup_pos[i] < (fi << 40) | stop:  # cut the run around its duplicates
            row, seen = dup_pos[i] & _ROW_MASK, dup[dup_pos[i]]
            rejects.append(_reject(None, shards[fi].path, row, "duplicate_id",
                                   f"first seen in {shards[seen >> 40].path} row {seen & _ROW_MASK}"))
            if start < row:
                segs.append((fi, start, row))
            start, i = row + 1, i + 1
        if start < stop:
            segs.append((fi, start, stop))
    _fill_ids(input_dir, [r for r in rejects if r["reason"] == "duplicate_id"])
    val = _val_styles([s for s, segs in styles.items() if segs], cfg)
    return Plan(shards, _make_units(styles, val, cfg.rows_per_shard), rejects, plan_fingerprint(shards, cfg))


def _fill_ids(input_dir, rejects: list[dict]) -> None:
    """Duplicates are found after the pass, by position: read their ids back (id column of those files only)."""
    for source in {r["source_file"] for r in rejects}:
        ids = pq.read_table(Path(input_dir) / source, columns=["id"]).column("id")
        for r in (r for r in rejects if r["source_file"] == source):
            r["id"] = ids[r["row_index"]].as_py()


def _val_styles(style_ids: list[str], cfg: DataConfig) -> set[str]:
    val = {s for s in style_ids if split_score(s, cfg.seed) < cfg.val_fraction}
    if len(style_ids) >= 2 and not val:  # tiny inputs: still hold one style out
        val = {min(style_ids, key=lambda s: split_score(s, cfg.seed))}
    if len(style_ids) >= 2 and len(val) == len(style_ids):
        val.discard(max(style_ids, key=lambda s: split_score(s, cfg.seed)))
    return val


def _make_units(styles: dict[str, list], val: set[str], rows_per_shard: int) -> list[Unit]:
    """Walk styles in input order; close a unit at a style boundary once a split holds rows_per_shard rows."""
    units, segs, vals, n = [], [], set(), Counter()
    for sid, style_segs in styles.items():
        if not style_segs:
            continue
        rows = sum(stop - start for _, start, stop in style_segs)
        segs += style_segs
        n["val" if sid in val else "train"] += rows
        if sid in val:
            vals.add(sid)
        if max(n.values()) >= rows_per_shard:
            units.append(Unit(len(units), tuple(segs), frozenset(vals), sum(n.values())))
            segs, vals, n = [], set(), Counter()
    if segs:
        units.append(Unit(len(units), tuple(segs), frozenset(vals), sum(n.values())))
    return units


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
                        qwriter.write(_reject(rid, shard.path, lo + k, e.reason, e.detail))
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


class UnitActor:
    """A Ray actor holding one upscaler (loaded once; on a GPU for diffusers) and running units."""

    def __init__(self, input_dir: str, out_dir: str, cfg: DataConfig, shards: list[InputShard], fingerprint: str):
        from i2l.data.upscale import load_upscaler

        self.args = (shards, input_dir, out_dir, cfg)
        self.upscaler, self.fingerprint = load_upscaler(cfg), fingerprint

    def run(self, unit: Unit) -> dict:
        shards, input_dir, out_dir, cfg = self.args
        return process_unit(unit, shards, input_dir, out_dir, cfg, self.upscaler, self.fingerprint)


def _check_out_dir(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse to mix shards of another plan (other inputs or config) into out, unless force clears them."""
    stale = []
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
        stale.append("manifest.json")
    for rec in (out / WORK / "units").glob("*.json"):
        if json.loads(rec.read_text()).get("fingerprint") != fingerprint:
            stale.append(str(rec.relative_to(out)))
            break
    if not (out / WORK).is_dir() and any(any((out / s).glob("*.parquet")) for s in ("train", "val")):
        stale.append("train/ or val/ shards of unknown origin")
    if stale and not force:
        raise FileExistsError(f"{out} holds output of a different input or data config ({stale[0]}); "
                              "choose another --out, or pass --force to delete it and rebuild")
    if stale:
        import shutil

        for name in OUTPUT_NAMES:  # only what prepare writes: never the rest of a user's folder
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for tmp in (p for d in ("train", "val", WORK, f"{WORK}/units", f"{WORK}/quarantine", ".")
                for p in (out / d).glob(".*.tmp")):
        tmp.unlink(missing_ok=True)  # leftovers of a killed run


def _run_units(todo: list[Unit], plan: Plan, input_dir: Path, out: Path, cfg: DataConfig, progress: bool):
    from tqdm import tqdm

    from i2l.cluster import ensure_ray

    ray = ensure_ray()
    res = ray.cluster_resources()
    if upscaler_needs_gpu(cfg):
        if res.get("GPU", 0) < 1:
            raise ValueError("data.upscaler is a diffusers pipeline on cuda but the Ray cluster has no GPU; set "
                             "RAY_ADDRESS to a GPU cluster, or data.upscaler_device=cpu (slow)")
        options, slots = {"num_gpus": 1, "num_cpus": 1}, int(res["GPU"])
    else:
        options, slots = {"num_cpus": 1}, int(res.get("CPU", 1))
    n = max(1, min(cfg.concurrency, len(todo), slots))  # more actors than slots would wait forever
    actor_cls = ray.remote(UnitActor).options(**options)
    actors = [actor_cls.remote(str(input_dir), str(out), cfg, plan.shards, plan.fingerprint) for _ in range(n)]
    pool = ray.util.ActorPool(actors)
    bar = tqdm(total=sum(u.rows for u in todo), desc=f"prepare ({n} workers)", unit="row", disable=not progress)
    try:
        for rec in pool.map_unordered(lambda a, u: a.run.remote(u), todo):
            bar.update(rec["rows_in"])
            yield rec
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)


def write_val_manifest(out_dir: str | os.PathLike, cfg: DataConfig, progress: bool = False) -> int:
    """val_manifest.jsonl: cfg.val_samples samples, round-robin over held-out styles, each = the content of a
    target row as prompt + cfg.val_refs OTHER rows of its style as references. Deterministic from cfg.seed."""
    from tqdm import tqdm

    from i2l.data.shards import prepared_files

    files = prepared_files(out_dir, "val")
    if not files:  # one input style, or every held-out row quarantined: the data still trains
        log.warning(f"{out_dir} has no val shards (no held-out style kept a row): val_manifest.jsonl is empty, so "
                    "evaluation and production have no held-out samples; prepare more than one style to get them")
    rows: dict[str, list[tuple[str, str, str]]] = {}  # style_id -> [(id, content, style)], no image bytes
    for path in tqdm(files, desc="val manifest", unit="shard", disable=not progress):
        t = pq.read_table(path, columns=["id", "style_id", "content", "style"])
        for rid, sid, content, style in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            rows.setdefault(sid, []).append((rid, content, style))
    eligible = sorted((s for s, r in rows.items() if len(r) > cfg.val_refs),
                      key=lambda s: (split_score(s + ":order", cfg.seed), s))
    key = {s: int(split_score(s, cfg.seed) * 2**53) for s in eligible}
    # each style's targets in a seeded order, one per round
    order = {s: np.random.default_rng([cfg.seed, key[s]]).permutation(len(rows[s])) for s in eligible}
    samples, k = [], 0
    while len(samples) < cfg.val_samples and any(k < len(rows[s]) for s in eligible):
        for s in eligible:
            if len(samples) == cfg.val_samples or k >= len(rows[s]):
                continue
            t = int(order[s][k])
            rng = np.random.default_rng([cfg.seed, key[s], k])
            others = [i for i in range(len(rows[s])) if i != t]
            refs = [rows[s][i][0] for i in rng.choice(others, size=cfg.val_refs, replace=False)]
            rid, content, style = rows[s][t]
            samples.append({"sample_id": f"v{len(samples):06d}", "style_id": s, "prompt": content, "target_id": rid,
                            "style": style, "reference_ids": refs})
        k += 1
    path = Path(out_dir) / "val_manifest.jsonl"
    tmp = atomic_tmp(path)
    tmp.write_text("".join(json.dumps(x) + "\n" for x in samples))
    os.replace(tmp, path)
    return len(samples)


def prepare(cfg: Config, input_dir: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
            force: bool = False) -> PrepareSummary:
    """Prepare a MegaStyle-layout directory into training-ready shards under out_dir (resumable; see module doc)."""
    t0 = time.perf_counter()
    dcfg = cfg.data if isinstance(cfg, Config) else cfg
    input_dir, out = Path(input_dir).resolve(), Path(out_dir).resolve()
    if out == input_dir or out.is_relative_to(input_dir) or input_dir.is_relative_to(out):
        raise ValueError(f"--out {out} and --input {input_dir} must not contain one another")
    upscaler_needs_gpu(dcfg)  # a bad data.upscaler fails now, not after the plan
    shards = find_shards(input_dir)
    fingerprint = plan_fingerprint(shards, dcfg)
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out, fingerprint, force)
    plan = make_plan(input_dir, dcfg, shards, progress)
    timings = {"plan": time.perf_counter() - t0}
    done = {u.index: unit_done(out, u, fingerprint) for u in plan.units}
    todo = [u for u in plan.units if done[u.index] is None]
    if todo:
        from i2l.cluster import ensure_ray

        t = time.perf_counter()
        ensure_ray()  # cluster start-up (seconds) is not the pipeline's throughput
        timings["ray_start"] = time.perf_counter() - t
    t1 = time.perf_counter()
    if todo:
        for rec in _run_units(todo, plan, input_dir, out, dcfg, progress):
            done[rec["unit"]] = rec
    timings["units"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    records = [done[u.index] for u in plan.units]
    pieces = [out / WORK / "quarantine" / f"{u.name}.parquet" for u, r in zip(plan.units, records) if r["quarantined"]]
    by_reason = write_quarantine(out / "quarantine.parquet", plan.rejects, pieces, progress)
    n_val = write_val_manifest(out, dcfg, progress)
    timings["finalize"] = time.perf_counter() - t2
    shard_recs = [s for r in records for s in r["shards"]]
    counts = {
        "rows_in": sum(s.rows for s in shards),
        "rows_written": sum(s["rows"] for s in shard_recs),
        "rows_quarantined": sum(by_reason.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "styles_train": sum(s["styles"] for s in shard_recs if s["split"] == "train"),
        "styles_val": sum(s["styles"] for s in shard_recs if s["split"] == "val"),
        "val_samples": n_val,
    }
    if counts["rows_in"] != counts["rows_written"] + counts["rows_quarantined"]:
        raise RuntimeError(f"counts do not reconcile: {counts} (a bug; please report)")
    timings["total"] = time.perf_counter() - t0
    manifest = {"fingerprint": fingerprint, "input_dir": str(input_dir), "inputs": [s.to_dict() for s in shards],
                "shards": shard_recs, "counts": counts, "data_config": asdict(dcfg),
                "timings": {k: round(v, 3) for k, v in timings.items()}}
    if (input_dir / "metadata.csv").is_file():
        st = (input_dir / "metadata.csv").stat()
        manifest["inputs"].append({"file": "metadata.csv", "rows": len(read_metadata(input_dir)),
                                   "bytes": st.st_size, "fingerprint": f"{st.st_size}:{st.st_mtime_ns}"})
    write_json_atomic(out / "manifest.json", manifest)
    return PrepareSummary(
        out_dir=str(out), shards=len(shard_recs), bytes=sum(s["bytes"] for s in shard_recs),
        units=len(plan.units), units_skipped=len(plan.units) - len(todo),
        rows_processed=sum(u.rows for u in todo), seconds=timings["total"], timings=timings,
        **{k: v for k, v in counts.items()})
