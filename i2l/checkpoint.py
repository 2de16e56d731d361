"""Predictor checkpoints: `<run>/checkpoints/step_XXXXXXX/{predictor,optimizer}.safetensors + state.json`,
written under a temporary name and renamed, so a kill never leaves a half checkpoint. A checkpoint records
the backbone and the adapted layers it was made for; loading it elsewhere is refused with a clear message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from i2l.config import Config, config_from_dict


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


def latest_checkpoint(run_dir) -> Path | None:
    d = Path(run_dir)
    if (d / "state.json").is_file():  # a checkpoint directory itself
        return d
    cks = sorted((d / "checkpoints").glob("step_*")) if (d / "checkpoints").is_dir() else []
    return cks[-1] if cks else None


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


def load_checkpoint(ck: Path, predictor, opt, backbone, cfg: Config) -> tuple[int, list[dict]]:
    state = read_state(ck)
    check_fits(state, backbone, str(ck))
    predictor.load_state_dict(load_file(str(Path(ck) / "predictor.safetensors")))
    if opt is not None:
        opt.load_state_dict(_unflatten_optimizer(load_file(str(Path(ck) / "optimizer.safetensors")),
                                                 state["optimizer"]))
    curve = json.loads((Path(ck) / "curve.json").read_text())
    return state["step"], curve


def checkpoint_config(ck: Path) -> Config:
    return config_from_dict(read_state(ck)["config"])
