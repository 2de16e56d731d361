"""The plan of `prepare`, made in the driver from the `id` column alone: bad and duplicate ids, the style-disjoint
train/val split (a function of style id and seed only) and the units of work, each holding whole styles."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from i2l.config import DataConfig
from i2l.data.megastyle import InputShard, RowRangeReader, find_shards, style_id_of

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


def split_score(style_id: str, seed: int) -> float:
    """Uniform in [0, 1) from (seed, style_id) alone: the split depends on no order and no worker count."""
    h = hashlib.blake2b(f"{seed}:{style_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def plan_fingerprint(shards: list[InputShard], cfg: DataConfig) -> str:
    data = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    inputs = [s.to_dict() for s in shards]
    return hashlib.sha256(json.dumps([inputs, data], sort_keys=True).encode()).hexdigest()[:16]


def quarantine_row(row_id, source: str, row: int, reason: str, detail: str) -> dict:
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
                    rejects.append(quarantine_row(rid, shard.path, lo + k, "bad_id", repr(rid)[:80]))
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
            rejects.append(quarantine_row(None, shards[fi].path, row, "duplicate_id",
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
