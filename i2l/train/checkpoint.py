"""Predictor checkpoints: `<run>/checkpoints/step_XXXXXXX/{predictor,optimizer}.safetensors + state.json`,
written under a temporary name and renamed, so a kill never leaves a half checkpoint. A checkpoint records
the backbone, the adapted layers and the config it was made with; loading it elsewhere, or resuming it with
other run-defining settings, is refused with a clear message. A run directory may record the key of the
stage that owns it (`run_key.json`, see i2l.train.run_key): a run of another key is moved aside, never resumed nor
deleted. state.json records each file's size and sha256: every load goes through `resolve_checkpoint`, which
verifies them and falls back to the newest intact step, warning about each broken one.

Only saving and loading tensors imports torch: the flows and the launching process read checkpoints without it
(flows/__init__)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from i2l.config import Config, config_from_dict
from i2l.io import NotSafetensors, file_sha256, safetensors_table
from i2l.layout import resolve_paths
from i2l.train.curve import loss_summary
from i2l.train.run_key import (  # noqa: F401  (re-exported: the run-key pieces live in the torch-free i2l.train.run_key)
    RUN_KEY_FILE,
    claim_run_dir,
    forget_run_key,
    latest_checkpoint,
    read_run_key,
    write_run_key,
)

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that move tensors
    import torch

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step_(\d+)")  # checkpoints/step_0000042; `.tmp_step_*` (being written) never matches


class CheckpointError(ValueError):
    """No intact checkpoint where one was asked for (a ValueError: the CLI reports it in one line)."""


def targets_digest(targets: dict[str, tuple[int, int]]) -> str:
    blob = json.dumps(sorted((k, list(v)) for k, v in targets.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    import torch

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
    from safetensors.torch import save_file

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
    (tmp / "curve.json").write_text(json.dumps(curve))
    # written last, naming every other file with its size and hash: a load can tell a whole step from a damaged one
    state["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: the checkpoint appears whole
    return final


def read_state(ck: Path) -> dict:
    """A checkpoint's state.json; an error names the file."""
    path = Path(ck) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a checkpoint step, or a damaged one)") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{path}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a checkpoint state (no step recorded)")
    return state


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
RUN_TRAIN_FIELDS = ("seed", "lr", "batch_size", "targets_per_lora", "warmup", "weight_decay", "grad_clip",
                    "timesteps", "loss_weighting")


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
    """Resume from ck (verified; if it is broken, from the newest intact older step of its run, with a warning)."""
    from safetensors.torch import load_file

    ck = resolve_checkpoint(ck)
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
    """The latest checkpoint of run_dir if it reached `steps`, else None. Not verified here (whether a stage is
    done); whatever loads it goes through `resolve_checkpoint`, which falls back to an intact step."""
    ck = latest_checkpoint(run_dir)
    return ck if ck is not None and read_state(ck)["step"] >= steps else None


def checkpoint_identity(ck: Path) -> dict:
    """What a checkpoint is, for the keys of the stages that use it: its step and its weights' sha256."""
    state = read_state(ck)
    return {"path": str(ck), "step": state["step"], "backbone": state["backbone_id"],
            "sha256": file_sha256(Path(ck) / "predictor.safetensors")}


# ---------- verification ----------
def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing, from its header alone (None: whole): missing, truncated, not
    safetensors. Cheap whatever the file's size: the tensors are not read."""
    try:
        _, size, declared = safetensors_table(path)
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "a directory, not a file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except NotSafetensors as e:
        return str(e)
    if size > declared:
        return f"{size - declared} bytes longer than its header declares"
    return None


_SHA_SEEN: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a step verified twice in a process is hashed once


def _sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_SEEN:
        _SHA_SEEN[key] = file_sha256(path)
    return _SHA_SEEN[key]


def _file_problem(path: Path, record: dict, full: bool) -> str | None:
    """What is wrong with one file of a step against its record in state.json (None: intact)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if st.st_size != record["bytes"]:
        return (f"truncated ({st.st_size} of {record['bytes']} bytes)" if st.st_size < record["bytes"] else
                f"{st.st_size} bytes, {record['bytes']} recorded")
    if path.suffix == ".safetensors" and (why := safetensors_problem(path)):
        return why
    if full and _sha256(path, st) != record["sha256"]:
        return "hash mismatch (not the bytes that were written: the file was damaged or changed since)"
    return None


def checkpoint_problems(ck: Path, full: bool = True) -> list[str]:
    """What is broken in one checkpoint step, as '<file>: <why>' ([]: intact). Sizes and safetensors headers are
    always checked; full=True hashes every file too. A step written before state.json recorded its files gets the
    header check of its weights only."""
    ck = Path(ck)
    try:
        state = read_state(ck)
    except (OSError, ValueError) as e:
        return [str(e)]  # names state.json
    files = state.get("files")
    if not isinstance(files, dict):  # an older checkpoint: no sizes or hashes recorded
        names = ["predictor.safetensors"] + (["optimizer.safetensors"] if (ck / "optimizer.safetensors").exists()
                                             else [])
        return [f"{ck / n}: {why}" for n in names if (why := safetensors_problem(ck / n))]
    problems = [] if "predictor.safetensors" in files else [f"{ck / 'state.json'}: records no predictor.safetensors"]
    for name, record in sorted(files.items()):
        if Path(name).name != name or name in (".", ".."):  # a name from a file is never a path
            problems.append(f"{ck / 'state.json'}: names {name!r}, which is not a file of this step")
            continue
        try:
            why = _file_problem(ck / name, record, full)
        except (KeyError, TypeError):
            why = "its record in state.json has no size and hash"
        if why:
            problems.append(f"{ck / name}: {why}")
    return problems


def _step_dirs(checkpoints: Path) -> list[Path]:
    """The step folders under a run's checkpoints/, oldest first (by step number, whatever the padding)."""
    if not checkpoints.is_dir():
        return []
    steps = [(int(m.group(1)), d) for d in checkpoints.iterdir() if (m := STEP_DIR.fullmatch(d.name)) and d.is_dir()]
    return [d for _, d in sorted(steps)]


def _candidates(path: Path) -> list[Path]:
    """The steps `path` may load, newest first: a run's steps; a step and the older steps of its run; or a lone
    checkpoint folder."""
    if STEP_DIR.fullmatch(path.name) and path.parent.name == "checkpoints" and path.is_dir():
        n = int(STEP_DIR.fullmatch(path.name).group(1))
        return [d for d in reversed(_step_dirs(path.parent)) if int(d.name[5:]) <= n]
    if (path / "state.json").is_file():
        return [path]
    return list(reversed(_step_dirs(path / "checkpoints")))


def find_checkpoint(path, full: bool = True) -> tuple[Path, list[str]]:
    """The newest intact checkpoint `path` names (a run dir, or a step whose run may hold older ones) and one
    warning per newer step skipped as broken. No step at all: FileNotFoundError; none intact: CheckpointError
    naming each broken file."""
    path = Path(path)
    candidates = _candidates(path)
    if not candidates:
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}: no such directory; pass a training run dir "
                                    "(`i2l train --out`) or one of its checkpoints/step_* folders")
        what = "it is a file, not a run directory" if path.is_file() else "train one with `i2l train` first"
        raise FileNotFoundError(f"no checkpoint under {path}: {what}")
    broken = []
    for ck in candidates:
        problems = checkpoint_problems(ck, full)
        if not problems:
            return ck, [f"checkpoint {b} is broken ({'; '.join(p)}): using the newest intact one, {ck}"
                        for b, p in broken]
        broken.append((ck, problems))
    listed = "; ".join(p for _, ps in broken for p in ps)
    raise CheckpointError(f"no intact checkpoint under {path}: {listed}. Restore these files from a copy, or delete "
                          "the broken step folders and train again with `i2l train`")


def resolve_checkpoint(path, full: bool = True) -> Path:
    """The checkpoint every load uses (predict, generate, produce, evaluate, resume): `find_checkpoint`'s step, each
    broken step it skipped logged as a warning (the CLI prints them on stderr)."""
    ck, warnings = find_checkpoint(path, full)
    for w in warnings:
        log.warning(w)
    return ck


require_checkpoint = resolve_checkpoint  # the name the stages call it by


def refuse_mixing_runs(out_dir: str | Path, resume: bool, cfg: Config) -> None:
    """A fresh run into a directory with another run's checkpoints would interleave the two runs' files; a
    resume with other run-defining settings than cfg would continue another optimisation than the saved one."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        return
    if not resume:
        raise FileExistsError(f"{out_dir} already holds a training run (latest checkpoint {ck.name}): pass --resume "
                              f"to continue it, or choose another --out for a new run")
    ck = resolve_checkpoint(out_dir)  # what the resume will load: a broken newest step is skipped, warned
    check_same_run(read_state(ck), cfg, str(ck))


def run_summary(out_dir: str | Path) -> dict:
    """What the run in out_dir reached, read back from its latest checkpoint (the launcher's result: Ray Train
    keeps only metrics reported together with a checkpoint, so a worker's final report never reaches it)."""
    if latest_checkpoint(out_dir) is None:
        return {}
    ck = resolve_checkpoint(out_dir)
    curve = json.loads((ck / "curve.json").read_text())
    return {"out_dir": str(out_dir), "steps": read_state(ck)["step"], "checkpoint": str(ck), **loss_summary(curve)}
