"""`prepare`: a MegaStyle-layout directory -> validated, upscaled, style-disjoint train/val parquet shards, made
by a pool of Ray actors, with a quarantine of rejected rows, a validation manifest and a resumable manifest.

Stages: plan (driver, data/plan.py; reads only the `id` column) -> units (pool actors, data/units.py; read,
validate, upscale, encode, write one train and one val shard each) -> finalize (driver, here; quarantine, val
manifest, manifest.json). Every file is written atomically; a unit whose record is on disk is never redone. A full
disk stops the run with one DiskFullError naming the file; finished units are kept for the re-run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from i2l.cluster.pool import ActorPool, Call, PoolOptions
from i2l.config import Config, DataConfig
from i2l.data.megastyle import find_shards, read_metadata, write_quarantine
from i2l.data.plan import Plan, Unit, make_plan, plan_fingerprint, split_score
from i2l.data.units import WORK, UnitRunner, unit_done
from i2l.data.upscale import upscaler_needs_gpu
from i2l.io import as_disk_full, remove_dead_tmp, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
OUTPUT_NAMES = ("train", "val", WORK, "manifest.json", "quarantine.parquet", "val_manifest.jsonl")


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
    _remove_dead_tmp(out)  # leftovers of a killed run (or a full disk)


def _remove_dead_tmp(out: Path) -> None:
    """Delete the half-written files of writers that are gone; another live run's in-flight files stay."""
    remove_dead_tmp(p for d in ("train", "val", WORK, f"{WORK}/units", f"{WORK}/quarantine", ".")
                    for p in (out / d).glob(".*.tmp"))


def _run_units(todo: list[Unit], plan: Plan, input_dir: Path, out: Path, cfg: DataConfig, progress: bool):
    """Yield each unit's record as its actor finishes it (a unit whose actor died runs again on a fresh one)."""
    options = PoolOptions(workers=cfg.concurrency, num_gpus=1.0 if upscaler_needs_gpu(cfg) else 0.0,
                          queue_depth=1,  # units are long: one each balances the actors best at the end
                          name="prepare", unit="row", progress=progress,
                          cpu_hint="data.upscaler_device=cpu for the diffusers upscaler (slow)",
                          start_hint=f"can every node read {input_dir} and the upscaler?")
    init = (str(input_dir), str(out), cfg, plan.shards, plan.fingerprint)
    try:
        with ActorPool(UnitRunner, init, options) as pool:
            for done in pool.map(Call("run", (u,), size=u.rows) for u in todo):
                yield done.value
    except Exception as e:  # an actor's full disk: its DiskFullError names the shard, not Ray's traceback
        full = as_disk_full(e, out)
        if full is None or full is e:
            raise
        raise full from e


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
    write_text_atomic(Path(out_dir) / "val_manifest.jsonl", "".join(json.dumps(x) + "\n" for x in samples))
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
        try:
            for rec in _run_units(todo, plan, input_dir, out, dcfg, progress):
                done[rec["unit"]] = rec
        finally:  # an actor that died mid-shard left its temporary file; its unit ran again on another
            _remove_dead_tmp(out)
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
