"""Which stage key a run directory belongs to (`run_key.json`), with no torch to import: the commands that only
forget a key start fast. A run of another key is moved aside by `claim_run_dir`, never resumed nor deleted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

RUN_KEY_FILE = "run_key.json"


def json_field(directory, file: str, name: str):
    """Field `name` of the JSON object in `directory/file`, or None (no such file, not JSON, no such field)."""
    try:
        return json.loads((Path(directory) / file).read_text())[name]
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir) -> Path | None:
    d = Path(run_dir)
    if (d / "state.json").is_file():  # a checkpoint directory itself
        return d
    cks = sorted((d / "checkpoints").glob("step_*")) if (d / "checkpoints").is_dir() else []
    return cks[-1] if cks else None


def require_checkpoint(run_dir) -> Path:
    """The newest intact checkpoint of a training run (or a checkpoint dir), verified: see
    i2l.train.checkpoint.resolve_checkpoint (imported here only when called: it brings torch)."""
    from i2l.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(run_dir)


def read_run_key(run_dir) -> str | None:
    """The key recorded in run_dir (by `claim_run_dir` or `write_run_key`), or None (no run, or one started by
    hand)."""
    return json_field(run_dir, RUN_KEY_FILE, "key")


def claim_run_dir(run_dir, key: str, fresh: bool = False) -> list[str]:
    """Make run_dir the run of `key` before training resumes into it. A run of another key (or of no recorded key,
    or any run when `fresh`) is renamed to the sibling `<name>.<its key>`; a sibling `<name>.<key>` left by an
    earlier switch of settings is moved back, to be resumed. Nothing is deleted. Returns what was moved."""
    run = Path(run_dir)
    recorded = read_run_key(run)
    if recorded == key and not fresh:
        return []  # already the run of `key`
    back = run.with_name(f"{run.name}.{key}")
    restore = not fresh and back.is_dir()
    notes = []
    if run.exists() and (latest_checkpoint(run) is not None or restore):
        notes += _move_aside(run, run.with_name(f"{run.name}.{recorded or 'unkeyed'}"), recorded)
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
    from i2l.io import write_json_atomic

    write_json_atomic(Path(run_dir) / RUN_KEY_FILE, {"key": key})


def _move_aside(run: Path, dest: Path, recorded: str | None) -> list[str]:
    """run (of key `recorded`) -> dest; an older run already at dest steps aside to dest.N, so dest always holds
    the newest."""
    notes = []
    if dest.exists():
        older = next(p for n in itertools.count(1) if not (p := dest.with_name(f"{dest.name}.{n}")).exists())
        dest.rename(older)
        notes.append(f"moved the older run at {dest} to {older}")
    run.rename(dest)
    notes.append(f"moved the run in {run} (key {recorded or 'not recorded'}) aside to {dest}: "
                 "it belongs to other settings or was forced out; nothing was deleted")
    return notes
