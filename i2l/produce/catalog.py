"""A production directory's bookkeeping: it is bound to one checkpoint and one LoRA file format (production.json), its
catalog.parquet says which LoRA files are finished (one row per file, merged under a lock so that concurrent producers lose none), files a
killed run wrote are adopted, and half-written ones removed once their writer is gone."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from i2l.io import atomic_path, file_sha256, remove_dead_tmp, write_json_atomic

PRODUCTION_FILE = "production.json"
CATALOG_FILE = "catalog.parquet"
GRAY_FILE = "gray.safetensors"
LOCK_FILE = ".catalog.lock"  # flock'ed for each read-merge-write of the catalog and for the binding


def style_path(out: Path, style_id: str) -> Path:
    return out / "styles" / f"{style_id}.safetensors"


def lora_id(style_id: str | None, checkpoint_sha: str) -> str:
    """Catalog key: one LoRA per (style, checkpoint); the gray LoRA is the checkpoint's own."""
    return f"{'gray_lora' if style_id is None else 'i2l:' + style_id}@{checkpoint_sha[:12]}"


def catalog_row(out: Path, path: Path, lora, fmt: str) -> dict:
    """The catalog row of a written LoRA file, from the LoRA, the metadata and the format it was saved with."""
    m = lora.meta
    style_id, ref_ids = m["style_id"] or None, json.loads(m["ref_ids"])
    return {"lora_id": lora_id(style_id, m["checkpoint_sha256"]), "style_id": style_id, "method": m["method"],
            "checkpoint_id": m["checkpoint_id"], "checkpoint_sha256": m["checkpoint_sha256"], "ref_ids": ref_ids,
            "n_refs": len(ref_ids), "rank": lora.rank, "path": str(path.relative_to(out)),
            "sha256": file_sha256(path), "bytes": path.stat().st_size, "norms": lora.norms(), "format": fmt}


def adopt(out: Path, path: Path, ref_ids: list[str], sha: str, fmt: str) -> dict | None:
    """The row of a complete file this checkpoint made for these references in this format but the catalog lacks (a
    run killed before its catalog was written); None for a file that is not ours or is unreadable: it is made again."""
    from i2l.model.lora import LoRA
    from i2l.model.lora_formats import file_format

    try:
        lora = LoRA.load(path)
        ok = (lora.meta.get("checkpoint_sha256") == sha and json.loads(lora.meta.get("ref_ids", "null")) == ref_ids
              and file_format(path) == fmt)
        return catalog_row(out, path, lora, fmt) if ok else None
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
        r["format"] = r.get("format") or "diffusers"  # catalogs from before formats: diffusers files
    return rows


def write_catalog(out: Path, rows: list[dict]) -> None:
    """Replace the catalog: readers see the old or the new one, never half of one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "norms": json.dumps(r["norms"], sort_keys=True)} for r in rows])
    with atomic_path(out / CATALOG_FILE) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def catalog_lock(out: Path) -> Iterator[None]:
    """Exclusive lock of a production directory's bookkeeping, between processes (and Ray actors) of this host
    and, where the file system supports flock, of others. Held for a read-merge-write, never for a whole run."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def merge_catalog(out: Path, rows: dict[str, dict],
                  then: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
    """Write the union of the catalog on disk and `rows` (by lora_id), under the lock; returns the union, which
    `rows` is updated to. A row joins it only as the catalog's own (the same hash) or when its file on disk has its
    hash: files are renamed into place, and the last rename is what is there. So when two producers made the same
    style, the row whose hash is the file's wins; a row whose file another writer has replaced since, or that is
    gone, is left out (that writer merges its own row; if it died, the next run adopts the file with a row of its
    true hash), so the catalog never names a hash its file does not have.
    `then(union)` runs before the lock is released: the results store is written there, so that the last writer of
    a row in the store is the last in the catalog (written after the lock, another producer's newer row could land
    in the catalog between one producer's merge and its store write, and that older row would win the store)."""
    with catalog_lock(out):
        merged = {r["lora_id"]: r for r in read_catalog(out)}
        for k, mine in rows.items():
            theirs = merged.get(k)
            if theirs is not None and theirs["sha256"] == mine["sha256"]:
                merged[k] = mine
            elif (out / mine["path"]).is_file() and file_sha256(out / mine["path"]) == mine["sha256"]:
                merged[k] = mine  # else theirs, or none: the file is another writer's, who will merge its row
        write_catalog(out, list(merged.values()))
        if then is not None:
            then(merged)
    rows.clear()
    rows.update(merged)
    return merged


def _binding(out: Path, ck: Path, sha: str, fmt: str) -> bool:
    """Whether `out` is bound to the checkpoint of `sha` and to `fmt` (True) or to none yet (False); refuses
    another's. One format per folder: files and catalog rows are keyed by style, so a second format would replace
    the first one's files under the same names and catalog rows."""
    meta = out / PRODUCTION_FILE
    if not meta.is_file():
        return False
    theirs = json.loads(meta.read_text())
    if theirs.get("checkpoint_sha256") != sha:
        raise FileExistsError(f"{out} holds LoRAs of checkpoint {theirs.get('checkpoint_id')} "
                              f"({theirs.get('checkpoint_dir')}); choose another --out for {ck}")
    if (have := theirs.get("format", "diffusers")) != fmt:  # folders from before formats hold diffusers files
        raise FileExistsError(f"{out} holds LoRA files in {have} format; this run writes {fmt}: choose another --out "
                              f"for the {fmt} files (or --format {have} to complete this folder)")
    return True


def check_binding(out: Path, ck: Path, sha: str, fmt: str = "diffusers") -> None:
    """Refuse, before anything is loaded or written, an output directory bound to another checkpoint or format."""
    _binding(out, ck, sha, fmt)


def bind_checkpoint(out: Path, ck: Path, sha: str, checkpoint_id: str, backbone: str, fmt: str = "diffusers") -> None:
    """An output directory holds the LoRAs of one checkpoint, in one file format: bind it to this one (call once the
    checkpoint has loaded: a checkpoint that fails to load must not claim the folder) or refuse if it is another's."""
    with catalog_lock(out):  # two producers of different checkpoints: one binds, the other is refused
        if not _binding(out, ck, sha, fmt):
            write_json_atomic(out / PRODUCTION_FILE, {"checkpoint_dir": str(ck), "checkpoint_id": checkpoint_id,
                                                      "checkpoint_sha256": sha, "backbone": backbone, "format": fmt},
                              indent=2, sort_keys=False)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete what killed runs left half-written (never catalogued): `.<name>.<host>.<pid>.<random>.tmp` files
    (i2l.io.atomic_tmp: LoRA files, catalog, production.json) whose writer is gone, and older formats' `*.tmp`;
    another live run's in-flight files stay, and so do finished files (never named .tmp). Returns what went."""
    return remove_dead_tmp([*out.glob("*.tmp"), *(out / "styles").glob("*.tmp")])
