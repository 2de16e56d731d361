"""Flow `pretrain_toy`: the toy world's own models, trained on the prepared train split — the toy backbone,
the toy image encoder and the toy scorer (CLIP). Toy presets only; real presets load theirs from local dirs."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.stages import TASK_OPTIONS, StageContext, data_id, digest, path_exists
from i2l.cluster.child import call_in_child
from i2l.config.sections import TOY_CLIP_NAME
from i2l.layout import SCORER_FILE

# Scorer fields that change how it runs, not what it learns.
_SCORER_RUNTIME = ("device", "batch_size", "clip_checkpoint")


@task(name="pretrain-backbone", **TASK_OPTIONS)
def backbone_task(cfg, data_dir: str, out_dir: str, progress: bool) -> dict:
    # each in a process of its own: torch and the trainer's heap leave with it (flows/__init__)
    return call_in_child("i2l.toy.backbone_pretrain:pretrain_backbone", cfg, data_dir, out_dir, progress=progress)


@task(name="pretrain-encoder", **TASK_OPTIONS)
def encoder_task(cfg, data_dir: str, out_dir: str, progress: bool) -> dict:
    return call_in_child("i2l.toy.encoder_pretrain:pretrain_encoder", cfg, data_dir, out_dir, progress=progress)


@task(name="pretrain-scorer", **TASK_OPTIONS)
def scorer_task(cfg, data_dir: str, out_dir: str, progress: bool) -> dict:
    return call_in_child("i2l.toy.scorer:pretrain_toy_clip", cfg, data_dir, out_dir, progress=progress)


def toy_model_keys(ctx: StageContext, data: str) -> dict[str, str]:
    """Stage keys of the toy models that exist for this config (downstream keys build on them)."""
    cfg, train = ctx.cfg, ctx.keyed["train"]
    keys = {}
    if cfg.backbone.kind == "toy":
        seed_and_budget = {k: train[k] for k in ("seed", "backbone_steps", "backbone_lr", "backbone_batch_size",
                                                 "grad_clip")}
        keys["pretrain_backbone"] = digest(data, ctx.section("backbone"), seed_and_budget)
    if cfg.encoder.kind == "toy":
        keys["pretrain_encoder"] = digest(data, ctx.section("encoder"), train["seed"])
    if cfg.scorer.clip_model == TOY_CLIP_NAME:
        scorer = {k: v for k, v in ctx.keyed["scorer"].items() if k not in _SCORER_RUNTIME}
        keys["pretrain_scorer"] = digest(data, scorer)
    return keys


@flow(name="pretrain_toy")
def pretrain_toy(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
                 parent_run_id: str | None = None, progress: bool = True, force: list[str] | None = None
                 ) -> list[dict]:
    ctx = StageContext.open(preset, overrides, data_root, parent_run_id, progress, force)
    cfg, paths = ctx.cfg, ctx.paths
    keys = toy_model_keys(ctx, data_id(ctx))
    if not keys:
        get_run_logger().info(f"preset {preset!r} uses no toy models: nothing to pretrain")
        return []
    data = str(paths.prepared_dir)
    # The file each trainer writes last marks a finished model.
    stages = {
        "pretrain_backbone": (cfg.backbone.path, "pretrain.json", backbone_task),
        "pretrain_encoder": (cfg.encoder.path, "encoder.json", encoder_task),
        "pretrain_scorer": (cfg.scorer.clip_checkpoint, SCORER_FILE, scorer_task),
    }
    results = []
    for stage, key in keys.items():
        out, marker, fn = stages[stage]
        # One folder per preset whatever the key: it records the key of the model it holds (keyed_dir).
        results.append(ctx.run_stage(stage, key, path_exists(f"{out}/{marker}"),
                                     lambda run_id, fn=fn, out=out: {"dir": str(out), **fn(cfg, data, out, progress)},
                                     keyed_dir=out))
    return [r.to_dict() for r in results]
