"""The rows of the store's tables: one builder per table that checks a record and turns it into the columns the
table holds (JSON text for dicts and lists, UTC times). Callers build rows here; the Store only inserts them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from i2l.io import file_sha256
from i2l.store.schema import parse_method

# The columns each writer fills, in insert order.
COLUMNS: dict[str, list[str]] = {
    "checkpoints": ["checkpoint_id", "run_id", "path", "step", "backbone", "sha256", "meta", "created_at"],
    "stages": ["stage", "key", "info", "done_at"],
    "styles": ["style_id", "split", "description", "dataset_id", "ref_paths"],
    "methods": ["run_id", "method", "family", "budget_steps", "wall_s", "note"],
    "loras": ["lora_id", "style_id", "method", "checkpoint_id", "path", "sha256", "rank", "n_refs", "norms",
              "ref_ids", "created_at"],
    "samples": ["sample_id", "run_id", "method", "style_id", "prompt", "seed", "lora_id", "image_path", "settings",
                "created_at"],
    "scores": ["sample_id", "metric", "value", "scorer", "scorer_version", "status", "reason"],
    "benchmarks": ["bench", "case_name", "metric", "value", "unit", "device", "time", "run_id", "extra"],
    "train_curves": ["run_id", "step", "loss", "lr", "extra", "time"],
    "eval_losses": ["run_id", "method", "style_id", "n_refs", "steps", "wall_s", "loss", "loss_by_t"],
}


def now_utc() -> datetime:
    """Naive UTC timestamp (all store times are UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


def checkpoint_row(run_id: str, path: str | Path, step: int, backbone: str, sha256: str,
                   meta: dict | None = None) -> dict:
    """A training checkpoint, id '<run_id>:<step>'."""
    return {"checkpoint_id": f"{run_id}:{step}", "run_id": run_id, "path": str(path), "step": step,
            "backbone": backbone, "sha256": sha256, "meta": to_json(meta), "created_at": now_utc()}


def stage_row(stage: str, key: str, info: dict | None = None) -> dict:
    return {"stage": stage, "key": key, "info": to_json(info), "done_at": now_utc()}


def style_row(r: dict) -> dict:
    """r: style_id, split, description, dataset_id, ref_paths (list of image files)."""
    return {**r, "ref_paths": to_json(r.get("ref_paths"))}


def method_row(run_id: str, method: str, wall_s: float | None = None, family: str | None = None,
               budget_steps: int | None = None, note: str | None = None) -> dict:
    """A method compared in a run; family and per-style budget default to what its name says (parse_method)."""
    info = parse_method(method)
    return {"run_id": run_id, "method": method, "family": family or info["family"],
            "budget_steps": budget_steps if budget_steps is not None else info["budget_steps"], "wall_s": wall_s,
            "note": note}


def lora_row(lora_id: str | None, style_id: str | None, method: str, lora, *, checkpoint_id: str | None = None,
             path: str | Path | None = None, n_refs: int | None = None, ref_ids: list[str] | None = None) -> dict:
    """The record of a LoRA (an i2l.model.lora.LoRA): rank and layer norms read off it, sha256 of its file when
    it has one. lora_id None: '<method>:<style_id>:<sha256[:12]>' (see stored_lora_row)."""
    return {"lora_id": lora_id, "style_id": style_id, "method": method, "checkpoint_id": checkpoint_id,
            "path": str(path) if path else None, "sha256": file_sha256(path) if path else None,
            "rank": lora.rank, "n_refs": n_refs, "norms": lora.norms(), "ref_ids": ref_ids}


def stored_lora_row(r: dict) -> dict:
    """A lora_row (or a dict of its fields: norms a dict, ref_ids a list) as the `loras` table stores it."""
    lora_id = r.get("lora_id") or f"{r['method']}:{r.get('style_id')}:{(r.get('sha256') or '')[:12]}"
    ref_ids = r.get("ref_ids")
    return {**r, "lora_id": lora_id, "path": _str(r.get("path")), "norms": to_json(r.get("norms")),
            "ref_ids": to_json(list(ref_ids)) if ref_ids is not None else None, "created_at": now_utc()}


def sample_row(r: dict) -> dict:
    """r: sample_id, run_id, method, style_id, prompt, seed, lora_id, image_path, settings (dict)."""
    for key in ("sample_id", "run_id", "method"):
        if not r.get(key):
            raise ValueError(f"sample row needs {key!r}: {r}")
    return {**r, "image_path": _str(r.get("image_path")), "settings": to_json(r.get("settings")),
            "created_at": now_utc()}


def score_row(r: dict) -> dict:
    """r: sample_id, metric, value, scorer, scorer_version, status ('ok'|'skipped'), reason.
    A skipped score must carry a reason and no value; an 'ok' score a finite value."""
    status = r.get("status") or ("ok" if r.get("value") is not None else None)
    value, what = r.get("value"), f"{r.get('sample_id')}/{r.get('metric')}"
    if status == "ok":
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"score {what} has status 'ok' but value {value!r}; record it as "
                             "status='skipped' with a reason instead")
        value = float(value)
    elif status == "skipped":
        if value is not None:
            raise ValueError(f"skipped score {what} must have value None")
        if not r.get("reason"):
            raise ValueError(f"skipped score {what} needs a reason")
    else:
        raise ValueError(f"score status must be 'ok' or 'skipped', got {status!r} in {r}")
    return {**r, "status": status, "value": value}


def benchmark_rows(name: str, rows: Iterable[dict], device: str, run_id: str | None = None) -> list[dict]:
    """Long rows {case, metric, value, unit}; a row without metric/value is wide: each numeric field
    becomes one metric. Unknown fields are kept in `extra`."""
    t = now_utc()
    out = []
    for r in rows:
        case = r.get("case", r.get("case_name"))
        base = {"bench": name, "case_name": None if case is None else str(case), "device": device,
                "time": t, "run_id": run_id}
        if "metric" in r and "value" in r:
            extra = {k: v for k, v in r.items() if k not in ("case", "case_name", "metric", "value", "unit")}
            out.append({**base, "metric": r["metric"], "value": _num(r["value"]), "unit": r.get("unit"),
                        "extra": to_json(extra or None)})
            continue
        fixed = {k: v for k, v in r.items() if k in ("case", "case_name", "unit", "device")}
        extra = {k: v for k, v in r.items() if k not in fixed and not _is_number(v)}
        for k, v in r.items():
            if k not in fixed and _is_number(v):
                out.append({**base, "metric": k, "value": float(v), "unit": r.get("unit"),
                            "extra": to_json(extra or None)})
    return out


def curve_rows(run_id: str, rows: Iterable[dict]) -> list[dict]:
    """Training curve rows: step, loss, lr, anything else (kept in `extra`)."""
    t = now_utc()
    return [{"run_id": run_id, "step": int(r["step"]), "loss": _num(r.get("loss")), "lr": _num(r.get("lr")),
             "time": t, "extra": to_json({k: v for k, v in r.items() if k not in ("step", "loss", "lr")} or None)}
            for r in rows]


def eval_loss_row(run_id: str, r: dict) -> dict:
    """r: method, style_id, n_refs, steps (per-style budget), wall_s, loss, optional loss_by_t (the loss at each t
    of the fixed grid, ascending)."""
    return {"loss_by_t": None, **r, "run_id": run_id}


def dedupe(rows: list[dict], key: str | tuple[str, ...]) -> list[dict]:
    # INSERT OR REPLACE rejects a key twice in one statement: the last row for a key wins.
    keys = (key,) if isinstance(key, str) else key
    return list({tuple(r.get(k) for k in keys): r for r in rows}.values())


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)
