"""What an evaluation is: the settings it runs with (the checkpoint's model, the caller's eval and scorer settings)
and the key that names it in the store, so the same evaluation is never run twice."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from i2l.config import Config
from i2l.io import file_sha256, json_digest
from i2l.train.checkpoint import checkpoint_config, read_state


def eval_config(cfg: Config, ck: Path) -> Config:
    """The checkpoint's model config with the caller's eval and scorer settings and data root."""
    from i2l.eval.metrics import default_scorer_dir
    from i2l.layout import require_paths

    require_paths(cfg, "scorer.clip_checkpoint")
    ecfg = checkpoint_config(ck, cfg.data_root)
    ecfg.eval, ecfg.scorer, ecfg.data_root = replace(cfg.eval), replace(cfg.scorer), cfg.data_root
    clip = Path(ecfg.scorer.clip_checkpoint)
    # the command's preset names its own toy scorer dir; a checkpoint made under another preset has its scorer in
    # <data_root>/toy/<checkpoint's preset>/scorer
    if not clip.exists() and Path(default_scorer_dir(ecfg)).exists():
        ecfg.scorer.clip_checkpoint = default_scorer_dir(ecfg)
    return ecfg


def dataset_fingerprint(prepared_dir: str | Path) -> str:
    """The prepared data's id as the store names it (i2l.store.ingest.dataset_id: what the data is, not when it
    was written), so evaluation keys and the store's dataset rows agree."""
    from i2l.store.ingest import dataset_id, read_manifest

    return dataset_id(read_manifest(prepared_dir))


def eval_key(ecfg: Config, ck: Path, dataset_id: str, families: tuple[str, ...]) -> str:
    """Same predictor weights, data, eval + scorer settings, baselines' budget and methods => same key."""
    from i2l.eval.metrics.clip import clip_version

    # how generation and scoring run, not their numbers (an image does not depend on its batch)
    scorer = {k: v for k, v in asdict(ecfg.scorer).items() if k not in ("device", "batch_size")}
    ev = {k: v for k, v in asdict(ecfg.eval).items() if k not in ("gen_batch", "baseline_workers")}
    return json_digest({"predictor": file_sha256(Path(ck) / "predictor.safetensors"), "data": dataset_id,
                        "eval": ev, "scorer": scorer, "families": sorted(families),
                        "clip": clip_version(ecfg.scorer.clip_checkpoint, ecfg.scorer.clip_model),
                        "baselines": [baseline_budget(ecfg, ck, dataset_id, k) for k in ("mean_lora", "adapter")]})


def baseline_budget(ecfg: Config, ck: Path, dataset_id: str, kind: str) -> dict:
    """What a baseline's training depends on: the predictor's budget, backbone, encoder, data."""
    state = read_state(ck)
    t = ecfg.train
    out = {"kind": kind, "backbone": state["backbone_id"], "backbone_path": ecfg.backbone.path,
           "encoder": state["encoder_id"], "encoder_path": ecfg.encoder.path, "data": dataset_id,
           "steps": ecfg.eval.baseline_steps or t.steps, "batch_size": t.batch_size, "warmup": t.warmup,
           "seed": t.seed, "rank": ecfg.predictor.rank, "max_refs": ecfg.predictor.max_refs}
    if (t.timesteps, t.loss_weighting) != ("logit_normal", "none"):
        # the baselines draw t by the run's law (since 80e15f6); before, always logit-normal: keys recorded then
        # stand for that law, so it adds nothing to the key and those baselines stay valid
        out.update(timesteps=t.timesteps, loss_weighting=t.loss_weighting)
    if kind == "mean_lora":
        out["lr"] = ecfg.eval.mean_lora_lr
    else:
        e, p = ecfg.eval, ecfg.predictor
        out.update(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, tokens=e.adapter_tokens,
                   hidden=e.adapter_hidden or p.hidden, depth=e.adapter_depth or p.depth,
                   heads=e.adapter_heads or p.heads)
    return out
