"""Read a prepared data directory (`<out>/manifest.json`, `<out>/quarantine.parquet`) into store rows.
Tolerant of extra or missing keys; opens only those two files, never paths written inside them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_QUARANTINE_COLS = {"id": pa.string(), "source_file": pa.string(), "row_index": pa.int64(),
                    "reason": pa.string(), "detail": pa.string()}


def read_prepared(out_dir: Path) -> dict[str, Any]:
    """{dataset: row, dataset_inputs: rows, shards: rows, quarantine_counts: rows, quarantine: table}."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; prepare the data first (`i2l prepare`) or pass "
                                "the directory that holds manifest.json")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); re-run `i2l prepare`") from e
    counts = manifest.get("counts") or {}
    quarantine = _read_quarantine(out_dir / "quarantine.parquet")
    by_reason = counts.get("by_reason")
    if not by_reason and quarantine is not None:
        reasons = quarantine.column("reason").to_pylist()
        by_reason = {r: reasons.count(r) for r in sorted(set(reasons), key=str)}
    dataset = {
        "dataset_id": hashlib.sha256(raw).hexdigest()[:16], "out_dir": str(out_dir),
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
