"""Predictor checkpoints: `<run>/checkpoints/step_XXXXXXX/{predictor,optimizer}.safetensors + state.json`,
written under a temporary name and renamed, so a kill never leaves a half checkpoint. A checkpoint records
the backbone, the adapted layers and the config it was made with; loading it elsewhere, or resuming it with
other run-defining settings, is refused with a clear message. A run directory may record the key of the
stage that owns it (`run_key.json`): a run of another key is moved aside, never resumed nor deleted."""

from __future__ import annotations

import hashlib
import itertools
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


def checkpoint_config(ck: Path) -> Config:
    return config_from_dict(read_state(ck)["config"])


# ----- which stage key a run directory belongs to --------------------------------------------------------------

RUN_KEY_FILE = "run_key.json"


def read_run_key(run_dir) -> str | None:
    """The key recorded in run_dir (by `claim_run_dir` or `write_run_key`), or None (no run, or one started by
    hand)."""
    try:
        return json.loads((Path(run_dir) / RUN_KEY_FILE).read_text())["key"]
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError, TypeError):
        return None


def claim_run_dir(run_dir, key: str, fresh: bool = False) -> list[str]:
    """Make run_dir the run of `key` before training resumes into it. A run of another key (or of no recorded key,
    or any run when `fresh`) is renamed to the sibling `<name>.<its key>`; a sibling `<name>.<key>` left by an
    earlier switch of settings is moved back, to be resumed. Nothing is deleted. Returns what was moved."""
    run = Path(run_dir)
    recorded = read_run_key(run)
    ours = recorded == key and not fresh
    back = run.with_name(f"{run.name}.{key}")
    restore = not ours and not fresh and back.is_dir()
    notes = []
    if run.exists() and not ours and (latest_checkpoint(run) is not None or restore):
        notes += _move_aside(run, run.with_name(f"{run.name}.{recorded or 'unkeyed'}"))
    if restore:
        back.rename(run)
        notes.append(f"moved the earlier run of key {key} back from {back} to {run}: it resumes from there")
    if read_run_key(run) != key:
        write_run_key(run, key)
    return notes


def forget_run_key(run_dir) -> None:
    """Drop run_dir's recorded key: what is written there next by hand is no stage's output, so the flow that
    recorded it runs again rather than skip over it."""
    (Path(run_dir) / RUN_KEY_FILE).unlink(missing_ok=True)


def write_run_key(run_dir, key: str) -> None:
    """Record `key` in run_dir, atomically: a kill leaves the old record or the new one, never half of one."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{RUN_KEY_FILE}.tmp"
    tmp.write_text(json.dumps({"key": key}))
    os.replace(tmp, run / RUN_KEY_FILE)


def _move_aside(run: Path, dest: Path) -> list[str]:
    """run -> dest; an older run already at dest steps aside to dest.N, so dest always holds the newest."""
    notes = []
    if dest.exists():
        older = next(p for n in itertools.count(1) if not (p := dest.with_name(f"{dest.name}.{n}")).exists())
        dest.rename(older)
        notes.append(f"moved the older run at {dest} to {older}")
    run.rename(dest)
    notes.append(f"moved the run in {run} (key {read_run_key(dest) or 'not recorded'}) aside to {dest}: "
                 "it belongs to other settings or was forced out; nothing was deleted")
    return notes
