"""Predictor checkpoints: `<run>/checkpoints/step_XXXXXXX/{predictor,optimizer}.safetensors + state.json`,
written under a temporary name and renamed, so a kill never leaves a half checkpoint. A checkpoint records
the backbone, the adapted layers and the config it was made with; loading it elsewhere, or resuming it with
other run-defining settings, is refused with a clear message. A run directory may record the key of the
stage that owns it (`run_key.json`, see i2l.train.run_key): a run of another key is moved aside, never resumed nor
deleted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from i2l.config import Config, config_from_dict
from i2l.io import file_sha256
from i2l.layout import resolve_paths
from i2l.train.run_key import (  # noqa: F401  (re-exported: the run-key pieces live in the torch-free i2l.train.run_key)
    RUN_KEY_FILE,
    claim_run_dir,
    forget_run_key,
    latest_checkpoint,
    read_run_key,
    require_checkpoint,
    write_run_key,
)


def targets_digest(targets: dict[str, tuple[int, int]]) -> str:
    blob = json.dumps(sorted((k, list(v)) for k, v in targets.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir, step: int, predictor, opt, backbone, encoder, cfg: Config, curve: list[dict]) -> Path:
    ck_root = Path(run_dir) / "checkpoints"
    final = ck_root / f"step_{step:07d}"
    tmp = ck_root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()},
              str(tmp / "predictor.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "backbone_id": backbone.backbone_id, "targets": {k: list(v) for k, v in
             backbone.lora_targets().items()}, "targets_digest": targets_digest(backbone.lora_targets()),
             "encoder_id": encoder.encoder_id, "token_dim": encoder.dim, "optimizer": opt_meta,
             "config": cfg.to_dict()}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "curve.json").write_text(json.dumps(curve))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: the checkpoint appears whole
    return final


def read_state(ck: Path) -> dict:
    return json.loads((Path(ck) / "state.json").read_text())


def check_fits(state: dict, backbone, source: str) -> None:
    """Refuse a checkpoint made for another backbone or another set of adapted layers."""
    if state["backbone_id"] != backbone.backbone_id:
        raise ValueError(f"checkpoint {source} was trained for backbone {state['backbone_id']!r}, but the "
                         f"configured backbone is {backbone.backbone_id!r}: use the matching --preset")
    if state["targets_digest"] != targets_digest(backbone.lora_targets()):
        theirs, ours = set(state["targets"]), set(backbone.lora_targets())
        raise ValueError(f"checkpoint {source} adapts a different set of layers ({len(theirs)} vs {len(ours)}; "
                         f"e.g. only in checkpoint: {sorted(theirs - ours)[:3]}, only here: {sorted(ours - theirs)[:3]})"
                         f": set backbone.targets as it was at training time")


# What defines a run: resuming with any of these changed would continue another optimisation than the one saved.
# train.steps may grow (extending a run); workers, checkpoint period, retries and device only change how it runs.
RUN_TRAIN_FIELDS = ("seed", "lr", "batch_size", "targets_per_lora", "warmup", "weight_decay", "grad_clip")


def run_config_changes(saved: dict, cfg: Config) -> list[str]:
    """The run-defining fields (`predictor.*`, `train.{RUN_TRAIN_FIELDS}`) where the checkpoint's saved config
    differs from cfg, as 'section.field: saved -> now'. Fields an older checkpoint did not record are not compared."""
    now = cfg.to_dict()
    fields = [("predictor", f) for f in now["predictor"]] + [("train", f) for f in RUN_TRAIN_FIELDS]
    changes = []
    for section, name in fields:
        old = saved.get(section, {})
        if name in old and _norm(old[name]) != _norm(now[section][name]):
            changes.append(f"{section}.{name}: {old[name]!r} -> {now[section][name]!r}")
    return changes


def _norm(v):
    return json.loads(json.dumps(v, default=str))  # tuples and lists compare equal, as state.json stores them


def check_same_run(state: dict, cfg: Config, source: str) -> None:
    """Refuse to resume a checkpoint with other run-defining settings than it was trained with."""
    changes = run_config_changes(state.get("config") or {}, cfg)
    if changes:
        raise ValueError(f"cannot resume {source}: it was trained with other settings ({'; '.join(changes)}). "
                         "Resume with the original settings, or start a new run with another --out")


def load_checkpoint(ck: Path, predictor, opt, backbone, cfg: Config) -> tuple[int, list[dict]]:
    state = read_state(ck)
    check_fits(state, backbone, str(ck))
    predictor.load_state_dict(load_file(str(Path(ck) / "predictor.safetensors")))
    if opt is not None:
        opt.load_state_dict(_unflatten_optimizer(load_file(str(Path(ck) / "optimizer.safetensors")),
                                                 state["optimizer"]))
    curve = json.loads((Path(ck) / "curve.json").read_text())
    return state["step"], curve


def checkpoint_config(ck: Path, data_root: str | None = None) -> Config:
    """The config a checkpoint was trained with.

    It records the toy world's models (backbone, encoder) by their paths under the training's data root.
    When that root has moved since (a renamed clone, a data folder copied elsewhere), each part gone from its
    recorded place is looked up at the same place under the data root in use: `data_root`, else I2L_DATA_ROOT,
    else the root the checkpoint itself lies in (`<root>/runs/<preset>/<run>/checkpoints/step_X`). A user's own
    path outside the data root is never changed; a part found nowhere keeps its recorded path (and its error).
    A path the checkpoint left empty is resolved under `data_root` (else its own), as i2l.layout.resolve_paths does.
    A config key this version does not know (renamed or removed since) is refused, naming it."""
    cfg = config_from_dict(read_state(ck)["config"], f"{Path(ck) / 'state.json'}")
    ck = Path(ck).absolute()
    roots = [Path(r) for r in (data_root, os.environ.get("I2L_DATA_ROOT")) if r]
    if len(ck.parents) > 4 and ck.parents[3].name == "runs":
        roots.append(ck.parents[4])
    old = Path(cfg.data_root)
    for part in (cfg.backbone, cfg.encoder):  # the scorer is the caller's own (eval_config replaces it)
        recorded = Path(part.path)
        if not part.path or recorded.exists() or not recorded.is_relative_to(old):
            continue
        moved = (r / recorded.relative_to(old) for r in roots)
        part.path = str(next((p for p in moved if p.exists()), recorded))
    resolved = resolve_paths(replace(cfg, data_root=data_root or cfg.data_root))
    return replace(resolved, data_root=cfg.data_root)


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The latest checkpoint of run_dir if it reached `steps`, else None."""
    ck = latest_checkpoint(run_dir)
    return ck if ck is not None and read_state(ck)["step"] >= steps else None


def checkpoint_identity(ck: Path) -> dict:
    """What a checkpoint is, for the keys of the stages that use it: its step and its weights' sha256."""
    state = read_state(ck)
    return {"path": str(ck), "step": state["step"], "backbone": state["backbone_id"],
            "sha256": file_sha256(Path(ck) / "predictor.safetensors")}
