"""Flow `prepare_data`: (toy presets) write the toy world, then prepare a MegaStyle-layout directory into
training-ready shards on Ray and record the dataset in the results store. Re-runs skip what is done."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.stages import TASK_OPTIONS, StageContext, StageResult, digest, jsonable, path_exists, prepared_key
from i2l.data.megastyle import find_shards
from i2l.data.plan import plan_fingerprint
from i2l.data.prepare import prepare
from i2l.toy.world import write_toyworld


@task(name="write-toyworld", **TASK_OPTIONS)
def write_toyworld_task(cfg, out_dir: str, progress: bool) -> dict:
    return jsonable(write_toyworld(cfg.toyworld, out_dir, progress=progress))


@task(name="prepare-shards", **TASK_OPTIONS)
def prepare_task(cfg, input_dir: str, out_dir: str, progress: bool) -> dict:
    # force: a flow re-prepares when its inputs changed (e.g. the weekly refresh) instead of refusing.
    return jsonable(prepare(cfg, input_dir, out_dir, progress=progress, force=True))


def toyworld_stage(ctx: StageContext) -> StageResult:
    """The preset's toy world. Its folder is one per preset whatever the toy world settings: it records the key of
    the world it holds (keyed_dir)."""
    out = ctx.paths.toyworld_dir
    return ctx.run_stage(
        "toyworld", digest(ctx.section("toyworld")), path_exists(out / "metadata.csv"),
        lambda run_id: write_toyworld_task(ctx.cfg, str(out), ctx.progress), keyed_dir=out)


@flow(name="prepare_data")
def prepare_data(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
                 input_dir: str | None = None, parent_run_id: str | None = None, progress: bool = True,
                 force: list[str] | None = None) -> list[dict]:
    """input_dir: a MegaStyle-layout directory; None = the preset's toy world (toy presets only)."""
    ctx = StageContext.open(preset, overrides, data_root, parent_run_id, progress, force)
    cfg, paths, results = ctx.cfg, ctx.paths, []
    if input_dir is None:
        if cfg.backbone.kind != "toy":
            raise ValueError(f"preset {preset!r} trains on real data: pass input_dir (a MegaStyle directory)")
        results.append(toyworld_stage(ctx))
        input_dir = str(paths.toyworld_dir)
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input directory {input_dir} not found: pass a MegaStyle-layout directory")
    out = paths.prepared_dir
    # The key is prepare's own plan fingerprint: the input shards (size, mtime) and the data config. The folder is
    # one per preset, so its manifest must hold this key (other data settings may have been prepared over it).
    key = plan_fingerprint(find_shards(input_dir), cfg.data)
    results.append(ctx.run_stage(
        "prepare", key, lambda: prepared_key(out) == key,
        lambda run_id: prepare_task(cfg, input_dir, str(out), progress),
        record=lambda run_id, info: info.update(dataset_id=ctx.store.record_dataset(out, run_id=run_id))))
    return [r.to_dict() for r in results]
