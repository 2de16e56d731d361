"""A production directory's bookkeeping: it is bound to one checkpoint (production.json), its catalog.parquet says
which LoRA files are finished (one row per file), files a killed run wrote are adopted, half-written ones removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from i2l.io import atomic_path, file_sha256, write_json_atomic

PRODUCTION_FILE = "production.json"
CATALOG_FILE = "catalog.parquet"
GRAY_FILE = "gray.safetensors"


def style_path(out: Path, style_id: str) -> Path:
    return out / "styles" / f"{style_id}.safetensors"


def lora_id(style_id: str | None, checkpoint_sha: str) -> str:
    """Catalog key: one LoRA per (style, checkpoint); the gray LoRA is the checkpoint's own."""
    return f"{'gray_lora' if style_id is None else 'i2l:' + style_id}@{checkpoint_sha[:12]}"


def catalog_row(out: Path, path: Path, lora) -> dict:
    """The catalog row of a written LoRA file, from the LoRA and the metadata it was saved with."""
    m = lora.meta
    style_id, ref_ids = m["style_id"] or None, json.loads(m["ref_ids"])
    return {"lora_id": lora_id(style_id, m["checkpoint_sha256"]), "style_id": style_id, "method": m["method"],
            "checkpoint_id": m["checkpoint_id"], "checkpoint_sha256": m["checkpoint_sha256"], "ref_ids": ref_ids,
            "n_refs": len(ref_ids), "rank": lora.rank, "path": str(path.relative_to(out)),
            "sha256": file_sha256(path), "bytes": path.stat().st_size, "norms": lora.norms()}


def adopt(out: Path, path: Path, ref_ids: list[str], sha: str) -> dict | None:
    """The row of a complete file this checkpoint made for these references but the catalog lacks (a run killed
    before its catalog was written); None for a file that is not ours or is unreadable: it is made again."""
    from i2l.model.lora import LoRA

    try:
        lora = LoRA.load(path)
        ok = lora.meta.get("checkpoint_sha256") == sha and json.loads(lora.meta.get("ref_ids", "null")) == ref_ids
        return catalog_row(out, path, lora) if ok else None
    except (ValueError, KeyError, OSError):
        return None


def read_catalog(out_dir: str | os.PathLike) -> list[dict]:
    """The catalog rows of a production directory (norms as dict, ref_ids as list); [] if none yet."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / CATALOG_FILE
    if not path.is_file():
        return []
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["norms"] = json.loads(r["norms"])
    return rows


def write_catalog(out: Path, rows: list[dict]) -> None:
    """Replace the catalog: readers see the old or the new one, never half of one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "norms": json.dumps(r["norms"], sort_keys=True)} for r in rows])
    with atomic_path(out / CATALOG_FILE) as tmp:
        pq.write_table(table, tmp)


def bind_checkpoint(out: Path, ck: Path, sha: str, checkpoint_id: str, backbone: str) -> None:
    """An output directory holds the LoRAs of one checkpoint: refuse to mix in another's."""
    meta = out / PRODUCTION_FILE
    if meta.is_file():
        theirs = json.loads(meta.read_text())
        if theirs.get("checkpoint_sha256") != sha:
            raise FileExistsError(f"{out} holds LoRAs of checkpoint {theirs.get('checkpoint_id')} "
                                  f"({theirs.get('checkpoint_dir')}); choose another --out for {ck}")
        return
    write_json_atomic(meta, {"checkpoint_dir": str(ck), "checkpoint_id": checkpoint_id, "checkpoint_sha256": sha,
                             "backbone": backbone}, indent=2, sort_keys=False)


def remove_leftovers(out: Path) -> None:
    """Delete what a killed run left half-written (never catalogued): the catalog's and production.json's
    `.<name>.<random>.tmp` and LoRA.save's `<name>.tmp` (pathlib's `*` matches dot-names too); finished files never
    end in .tmp, so they stay."""
    for tmp in [*out.glob("*.tmp"), *(out / "styles").glob("*.tmp")]:
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
