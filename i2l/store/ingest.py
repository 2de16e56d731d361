"""Read a prepared data directory (`<out>/manifest.json`, `<out>/quarantine.parquet`) into store rows, and name
it (`dataset_id`: what the data is, the one id the store and evaluation keys use). Tolerant of extra or missing
keys; opens only those two files, never paths written inside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from i2l.io import json_digest

_QUARANTINE_COLS = {"id": pa.string(), "source_file": pa.string(), "row_index": pa.int64(),
                    "reason": pa.string(), "detail": pa.string()}


def dataset_id(manifest: dict) -> str:
    """The prepared data's identity (16 hex digits): its plan fingerprint (inputs + data config) and its shards'
    sha256, never the manifest's bytes: a re-run of `i2l prepare` with nothing to do rewrites `timings` only."""
    ident = {"fingerprint": manifest.get("fingerprint"),
             "shards": sorted([_s(r.get("name")), _s(r.get("sha256"))] for r in _records(manifest.get("shards"), "name"))}
    if ident["fingerprint"] is None and not ident["shards"]:  # not written by `i2l prepare`: all it says but when
        ident = {k: v for k, v in manifest.items() if k != "timings"}
    return json_digest(ident)


def read_manifest(out_dir: str | Path) -> dict:
    """A prepared directory's manifest.json, with a clear message when it is missing or unreadable."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; prepare the data first (`i2l prepare`) or pass "
                                "the directory that holds manifest.json")
    try:
        return json.loads(manifest_path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); re-run `i2l prepare`") from e


def read_prepared(out_dir: Path) -> dict[str, Any]:
    """{dataset: row, dataset_inputs: rows, shards: rows, quarantine_counts: rows, quarantine: table}."""
    manifest = read_manifest(out_dir)
    counts = manifest.get("counts") or {}
    quarantine = _read_quarantine(out_dir / "quarantine.parquet")
    by_reason = counts.get("by_reason")
    if not by_reason and quarantine is not None:
        reasons = quarantine.column("reason").to_pylist()
        by_reason = {r: reasons.count(r) for r in sorted(set(reasons), key=str)}
    dataset = {
        "dataset_id": dataset_id(manifest), "out_dir": str(out_dir),
        "rows_in": _int(counts.get("rows_in")), "rows_written": _int(counts.get("rows_written")),
        "rows_quarantined": _int(counts.get("rows_quarantined",
                                          None if quarantine is None else quarantine.num_rows)),
        "styles_train": _int(counts.get("styles_train")), "styles_val": _int(counts.get("styles_val")),
        "manifest": json.dumps(manifest, sort_keys=True, default=str),
    }
    inputs = [{"file": _s(i.get("file")), "rows": _int(i.get("rows")), "bytes": _int(i.get("bytes"))}
              for i in _records(manifest.get("inputs"), "file")]
    shards = [{"name": _s(s.get("name")), "split": _s(s.get("split")), "rows": _int(s.get("rows")),
                   "bytes": _int(s.get("bytes")), "sha256": _s(s.get("sha256"))}
              for s in _records(manifest.get("shards"), "name")]
    counts_rows = [{"reason": str(r), "n": _int(n)} for r, n in (by_reason or {}).items()]
    return {"dataset": dataset, "dataset_inputs": inputs, "shards": shards, "quarantine_counts": counts_rows,
                "quarantine": quarantine}


def _read_quarantine(path: Path) -> pa.Table | None:
    if not path.is_file():
        return None
    table = pq.read_table(path)
    cols = {}
    for name, typ in _QUARANTINE_COLS.items():
        if name in table.column_names:
            cols[name] = table.column(name).cast(typ)
        else:
            cols[name] = pa.nulls(table.num_rows, typ)
    return pa.table(cols)


def _records(value: Any, key: str) -> list[dict]:
    # Accept a list of dicts or a {key: {...}} mapping; skip anything else.
    if isinstance(value, dict):
        return [{key: k, **(v if isinstance(v, dict) else {})} for k, v in value.items()]
    return [v for v in (value or []) if isinstance(v, dict)]


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _s(v: Any) -> str | None:
    return None if v is None else str(v)
