"""Flow `produce`: mass-produce LoRAs from a checkpoint (default: the newest) for every style of a validation
manifest on a Ray actor pool (GPU actors on a cluster), into runs/<preset>/loras/<checkpoint>/ and the store."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.stages import TASK_OPTIONS, StageContext, digest, jsonable, path_exists
from i2l.doctor import require_healthy
from i2l.io import file_sha256
from i2l.produce.catalog import CATALOG_FILE
from i2l.produce.jobs import jobs_from_manifest
from i2l.train.checkpoint import checkpoint_identity
from i2l.train.run_key import require_checkpoint


@task(name="produce-loras", **TASK_OPTIONS)
def produce_task(cfg, checkpoint: str, manifest: str, out_dir: str, store, progress: bool) -> dict:
    from i2l.produce.stage import (
        produce as produce_loras,  # torch: only once production runs (flows/__init__)
    )

    p = cfg.produce
    require_healthy(cfg, purpose="produce")  # configs and headers only, before any Ray actor starts
    summary = produce_loras(checkpoint, jobs_from_manifest(manifest), out_dir, store, workers=p.workers,
                            batch_size=p.batch_size, num_gpus=p.num_gpus, max_retries=p.max_retries,
                            progress=progress, fmt=p.format)
    return jsonable(summary)


@flow(name="produce")
def produce(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
            checkpoint: str | None = None, manifest: str | None = None, parent_run_id: str | None = None,
            progress: bool = True, force: list[str] | None = None) -> list[dict]:
    """checkpoint: None = the newest of runs/<preset>/train; manifest: None = the prepared validation manifest."""
    ctx = StageContext.open(preset, overrides, data_root, parent_run_id, progress, force)
    ck = require_checkpoint(checkpoint or ctx.paths.train_dir)
    manifest_path = Path(manifest) if manifest else ctx.paths.val_manifest_path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest at {manifest_path}: run prepare_data first, or pass manifest=FILE")
    ident = checkpoint_identity(ck)
    # One directory per checkpoint: a production directory holds the LoRAs of exactly one checkpoint.
    out = ctx.paths.loras_dir / f"{ck.name}-{ident['sha256'][:12]}"
    key = digest(ident, file_sha256(manifest_path), str(out.resolve()))
    result = ctx.run_stage(
        "produce", key, path_exists(out / CATALOG_FILE),
        lambda run_id: produce_task(ctx.cfg, str(ck), str(manifest_path), str(out), ctx.store, progress))
    return [result.to_dict()]
