"""Mass production of style LoRAs: the Ray actor pool (the predictor loaded once per actor; GPU actors with
`num_gpus` on a cluster, CPU actors here) predicts LoRAs in batches for every style of a validation manifest or a
folder of user images. One file per style (diffusers, diffsynth or comfyui format: `fmt`), the gray-image LoRA once
per checkpoint, and a catalog.

Output directory (bound to one checkpoint and one format): production.json, gray.safetensors,
styles/<style_id>.safetensors and catalog.parquet (lora_id, style_id, ref_ids, checkpoint_id, path, sha256, bytes,
rank, n_refs, per-layer norms, format); the same rows go to the results store's `loras` table. Idempotent: a re-run skips what the catalog holds; a batch whose
actor died is retried on a fresh actor; files and catalog rows are keyed by style, so each exists exactly once, also
with several producers on one directory (the catalog is merged with what is on disk under a lock). The directory is
bound to the checkpoint once the actors have loaded it; a full disk stops the run with finished files catalogued.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from i2l.cluster.pool import ActorPool, Call, PoolOptions
from i2l.io import as_disk_full, file_sha256
from i2l.model.lora_formats import check_format
from i2l.produce.catalog import (
    CATALOG_FILE,
    GRAY_FILE,
    adopt,
    bind_checkpoint,
    catalog_lock,
    check_binding,
    lora_id,
    merge_catalog,
    read_catalog,
    remove_leftovers,
    style_path,
)
from i2l.produce.jobs import StyleJob, check_jobs
from i2l.produce.producer import LoRAProducer
from i2l.store import Store
from i2l.store.production import checkpoint_id_by_sha, lora_ids_ending
from i2l.train.checkpoint import read_state, require_checkpoint

FLUSH_S = 2.0  # catalog + store are written at most this late (always at the end; a kill's files are adopted)


@dataclass
class ProduceSummary:
    out_dir: Path
    checkpoint_id: str
    styles: int  # styles asked for
    produced: int  # LoRAs made by this call (gray included)
    skipped: int  # already in the catalog
    retried_batches: int  # batches re-run after their actor died
    workers: int
    seconds: float  # whole call, actor start-up included
    pool_seconds: float  # from the first batch submitted to the last result

    @property
    def loras_per_s(self) -> float:
        return self.produced / self.pool_seconds if self.pool_seconds else 0.0

    def format(self) -> str:
        return (f"produce -> {self.out_dir} (checkpoint {self.checkpoint_id})\n"
                f"  styles: {self.styles}; LoRAs made: {self.produced}, already there: {self.skipped}; "
                f"batches retried: {self.retried_batches}\n"
                f"  {self.workers} actor(s), {self.seconds:.1f} s ({self.loras_per_s:.2f} LoRAs/s in the pool)")


def produce(checkpoint_dir: str | os.PathLike, jobs: list[StyleJob], out_dir: str | os.PathLike, store: Store,
            workers: int = 2, batch_size: int = 8, num_gpus: float = 0.0, max_retries: int = 3,
            progress: bool = True, on_batch: Callable[[list[dict], object], None] | None = None,
            fmt: str = "diffusers") -> ProduceSummary:
    """Make the LoRAs of `jobs` (and the gray LoRA) that `out_dir`'s catalog lacks, on a pool of Ray actors, as
    files of format `fmt` (i2l.model.lora_formats); a folder bound to another format is refused.

    on_batch(rows, actor) runs in the driver after each batch returns (tests kill that actor here)."""
    t0 = time.perf_counter()
    check_jobs(jobs)
    ck = require_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    sha = file_sha256(ck / "predictor.safetensors")
    checkpoint_id = checkpoint_id_by_sha(store, sha) or f"{ck.parent.parent.name}/{ck.name}@{sha[:12]}"
    check_format(fmt)
    check_binding(out, ck, sha, fmt)  # another checkpoint's (format's) folder is refused now; binding waits for a load

    def bind() -> None:
        bind_checkpoint(out, ck, sha, checkpoint_id, read_state(ck)["backbone_id"], fmt)

    remove_leftovers(out)

    catalog = _catalog_with_adopted(out, jobs, sha, fmt)
    todo = [j for j in jobs if not _done(out, catalog, j.style_id, j.ref_ids, sha)]
    need_gray = not _done(out, catalog, None, ["gray"], sha)
    _record_missing(store, out, {lora_id(j.style_id, sha) for j in todo}, sha)
    summary = ProduceSummary(out, checkpoint_id, len(jobs), 0, len(jobs) - len(todo), 0, 0, 0.0, 0.0)
    if not (todo or need_gray):
        bind()  # nothing to load: every LoRA here is already this checkpoint's
    else:
        calls = [Call("make_gray")] if need_gray else []  # the gray LoRA first: one small call
        calls += [Call("make", (todo[i:i + batch_size],), size=len(todo[i:i + batch_size]))
                  for i in range(0, len(todo), batch_size)]
        options = PoolOptions(workers=workers, num_gpus=num_gpus, max_retries=max_retries, name="produce",
                              unit="LoRA", progress=progress, cpu_hint="produce.num_gpus=0 for CPU actors",
                              start_hint=f"are checkpoint {ck} and its encoder readable on every node?")
        init = (str(ck), str(out), "cuda" if num_gpus > 0 else "cpu", checkpoint_id, sha, fmt)
        try:
            _run_pool(ActorPool(LoRAProducer, init, options), calls, out, store, catalog, summary, on_batch, bind)
        except Exception as e:  # a full disk, in an actor (a LoRA file) or here (the catalog): one clear error
            full = as_disk_full(e, out)
            if full is None or full is e:
                raise
            raise full from e
        finally:
            # an actor that died mid-write (killed, OOM, node lost) left its temporary file; its batch was redone
            # by another, so the folder holds only finished files once the pool is done
            remove_leftovers(out)
    summary.seconds = time.perf_counter() - t0
    return summary


def _done(out: Path, catalog: dict, style_id: str | None, ref_ids: list[str], sha: str) -> bool:
    """Whether the catalog holds this LoRA, made from these references, and its file is there, whole."""
    r = catalog.get(lora_id(style_id, sha))
    return (r is not None and list(r["ref_ids"]) == list(ref_ids) and (out / r["path"]).is_file()
            and (out / r["path"]).stat().st_size == r["bytes"])


def _catalog_with_adopted(out: Path, jobs: list[StyleJob], sha: str, fmt: str) -> dict[str, dict]:
    """The catalog by lora_id, plus the finished files a killed run left uncatalogued (written back at once)."""
    catalog = {r["lora_id"]: r for r in read_catalog(out)}
    adopted = []
    for style_id, ref_ids, path in [(None, ["gray"], out / GRAY_FILE),
                                    *((j.style_id, j.ref_ids, style_path(out, j.style_id)) for j in jobs)]:
        if _done(out, catalog, style_id, ref_ids, sha) or not path.is_file():
            continue
        if row := adopt(out, path, ref_ids, sha, fmt):
            catalog[row["lora_id"]] = row
            adopted.append(row)
    if adopted:
        merge_catalog(out, catalog)
    return catalog


def _record_missing(store: Store, out: Path, redo: set[str], sha: str) -> None:
    """Record the LoRAs catalogued here (or adopted) that this store lacks (another --db, or a kill between
    writes), except those about to be redone. Under the catalog lock, from the catalog as it is then: another
    producer flushing one of these styles meanwhile writes its store row under that lock too, and an older row
    read before it must not replace it in the store."""
    if not (out / CATALOG_FILE).is_file():
        return  # nothing catalogued (yet): rows catalogued from now on are recorded by their producer
    with catalog_lock(out):
        in_store = lora_ids_ending(store, f"@{sha[:12]}")
        missing = [r for r in read_catalog(out) if r["lora_id"] not in redo and r["lora_id"] not in in_store]
        if missing:
            _record(store, out, missing)


def _record(store: Store, out: Path, rows: list[dict]) -> None:
    store.record_loras([{**r, "path": str((out / r["path"]).resolve())} for r in rows])


def _run_pool(pool: ActorPool, calls: list[Call], out: Path, store: Store, catalog: dict[str, dict],
              summary: ProduceSummary, on_batch, bind: Callable[[], None]) -> None:
    """Run the calls; bind the directory at the first result (an actor has loaded the checkpoint); write catalog +
    store every FLUSH_S seconds and at the end, also after a failure."""
    unrecorded: list[dict] = []
    last_flush = time.perf_counter()

    def flush() -> None:
        # the catalog decides what a re-run skips; other producers' rows are kept; the store gets the row the
        # catalog kept, under the same lock
        # (a row the merge left out, its file replaced by another writer's since, is that writer's to record)
        merge_catalog(out, catalog, then=lambda kept: _record(store, out, [kept[r["lora_id"]] for r in unrecorded
                                                                          if r["lora_id"] in kept]))

    with pool:
        try:
            for done in pool.map(calls):
                if not summary.produced:
                    bind()
                for r in done.value:
                    catalog[r["lora_id"]] = r
                unrecorded += done.value
                if time.perf_counter() - last_flush > FLUSH_S:  # writes cost the driver ~0.1 s: batch them
                    flush()
                    unrecorded, last_flush = [], time.perf_counter()
                summary.produced += len(done.value)
                if on_batch:
                    on_batch(done.value, done.actor)
            summary.pool_seconds = pool.seconds
        finally:
            if unrecorded:  # also after a failure: what was made is catalogued
                flush()
            summary.workers, summary.retried_batches = pool.workers, pool.retried
