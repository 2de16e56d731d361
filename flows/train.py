"""Flow `train`: train the i2L predictor on Ray Train (TorchTrainer; RAY_ADDRESS = a cluster, else a local Ray),
always resuming from the latest checkpoint, so a killed or retried run continues where it stopped. The run dir
records the stage key: a run of other settings is moved aside first (and moved back when they return), never
resumed under this key. Records the final checkpoint and the loss curve in the results store."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.pretrain_toy import toy_model_keys
from flows.stages import TASK_OPTIONS, StageContext, data_id, digest, jsonable
from i2l.cluster.child import call_in_child
from i2l.train.checkpoint import checkpoint_identity, finished_checkpoint
from i2l.train.launcher import launch_training
from i2l.train.run_key import claim_run_dir, read_run_key


@task(name="train-predictor", **TASK_OPTIONS)
def train_task(cfg, data_dir: str, out_dir: str, progress: bool) -> dict:
    # resume=True always: a retry of this task, or a re-run of a killed flow, resumes from the last checkpoint.
    return jsonable(launch_training(cfg, data_dir, out_dir, resume=True, progress=progress))


def train_key(ctx: StageContext) -> str:
    data = data_id(ctx)
    return digest(data, toy_model_keys(ctx, data), ctx.section("backbone", "encoder", "predictor", "train"))


def run_finished(run_dir: Path, steps: int, key: str) -> bool:
    """The stage's outputs: run_dir is the run of `key` (a store mark for one key must not accept another key's
    checkpoint) and it reached `steps`."""
    return read_run_key(run_dir) == key and finished_checkpoint(run_dir, steps) is not None


def record_training(ctx: StageContext, run_id: str, info: dict) -> None:
    """The final checkpoint and the loss curve, into the store (inside the stage's transaction)."""
    ck = finished_checkpoint(ctx.paths.train_dir, ctx.cfg.train.steps)
    if ck is None:
        raise RuntimeError(f"training ended without a checkpoint at step {ctx.cfg.train.steps} in "
                           f"{ctx.paths.train_dir}; see the Ray Train logs under its ray_results/")
    ident = checkpoint_identity(ck)
    info["checkpoint_id"] = ctx.store.record_checkpoint(run_id, ck, ident["step"], ident["backbone"],
                                                        ident["sha256"], meta={"preset": ctx.cfg.name})
    info["checkpoint"] = str(ck)
    curve = json.loads((ck / "curve.json").read_text())
    ctx.store.record_curve(run_id, curve)


@flow(name="train")
def train(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
          parent_run_id: str | None = None, progress: bool = True, force: list[str] | None = None) -> list[dict]:
    ctx = StageContext.open(preset, overrides, data_root, parent_run_id, progress, force)
    cfg, paths = ctx.cfg, ctx.paths
    key = train_key(ctx)
    # Before the done-check: switching settings back restores their run, which the check then finds finished.
    for note in claim_run_dir(paths.train_dir, key, fresh="train" in ctx.force):
        get_run_logger().warning(f"train: {note}")

    def run(run_id: str) -> dict:
        # configs and headers only, before Ray Train starts; in a child process: checking a checkpoint's shapes
        # builds its classes (diffusers, torch), which this process would then hold through training (flows/__init__)
        call_in_child("i2l.doctor:require_healthy", cfg, purpose="train")
        return train_task(cfg, str(paths.prepared_dir), str(paths.train_dir), progress)

    result = ctx.run_stage(
        "train", key,
        lambda: run_finished(paths.train_dir, cfg.train.steps, key),
        run,
        record=lambda run_id, info: record_training(ctx, run_id, info))
    return [result.to_dict()]
