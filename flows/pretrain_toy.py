"""Flow `pretrain_toy`: the toy world's own models, trained on the prepared train split — the toy backbone,
the toy image encoder and the toy scorer (CLIP). Toy presets only; real presets load theirs from local dirs."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.stages import TASK_OPTIONS, StageContext, data_id, digest, path_exists
from i2l.cluster.child import ChildCall, call_in_child, start_in_child
from i2l.config.sections import TOY_CLIP_NAME
from i2l.layout import SCORER_FILE

SCORER = "i2l.toy.scorer:pretrain_toy_clip"
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
def scorer_task(cfg, data_dir: str, out_dir: str, progress: bool, started: ChildCall | None = None) -> dict:
    # started: the same call, started beside the encoder (pretrain_toy); a retry of it (transient failures only,
    # which a child training on local files does not raise) gets its outcome again
    if started is not None:
        return started.result()
    return call_in_child(SCORER, cfg, data_dir, out_dir, progress=progress)


def start_scorer(cfg, data_dir: str, out_dir: str) -> ChildCall:
    """The scorer's training started in a child of its own, to run beside the encoder's. Without its progress bars:
    two processes' bars would draw over each other on one line (the encoder's shows)."""
    return start_in_child(SCORER, cfg, data_dir, out_dir, progress=False)


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
    results, beside = [], None
    try:
        for stage, key in keys.items():
            out, marker, fn = stages[stage]
            if stage == "pretrain_encoder" and "pretrain_scorer" in keys:
                beside = _scorer_beside_encoder(ctx, keys["pretrain_scorer"], data)
            early = stage == "pretrain_scorer" and beside is not None
            extra, note = ({"started": beside}, {"trained_beside": "pretrain_encoder"}) if early else ({}, {})
            # One folder per preset whatever the key: it records the key of the model it holds (keyed_dir).
            results.append(ctx.run_stage(
                stage, key, path_exists(f"{out}/{marker}"),
                lambda run_id, fn=fn, out=out, extra=extra, note=note: {
                    "dir": str(out), **fn(cfg, data, out, progress, **extra), **note},
                keyed_dir=out))
    finally:
        if beside is not None:  # the run stopped before the scorer's turn (an error, a signal): it stops too
            beside.terminate()
    return [r.to_dict() for r in results]


def _scorer_beside_encoder(ctx: StageContext, key: str, data: str) -> ChildCall | None:
    """The scorer's training started now, as the encoder's starts, when its turn would run it. Each trains on one
    thread (their matmuls are too small for two): side by side they take the time of the longer (~65 against
    108 s one after the other, on 2 cores). The scorer learns the same either way."""
    out = ctx.cfg.scorer.clip_checkpoint
    return ctx.start_early("pretrain_scorer", key, path_exists(f"{out}/{SCORER_FILE}"), out,
                           lambda: start_scorer(ctx.cfg, data, out))
