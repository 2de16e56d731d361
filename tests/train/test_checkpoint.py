"""Run directories and the settings a checkpoint was trained with: a run of other settings is moved aside (never
deleted, never resumed under the new key) and moved back when they return; a resume with other run-defining
settings is named field by field. Files only: no model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from i2l.config import get_config
from i2l.layout import resolve_paths
from i2l.train.checkpoint import claim_run_dir, latest_checkpoint, read_run_key, run_config_changes


def _fake_run(run: Path, step: int, tag: str) -> Path:
    """A run dir with one checkpoint whose state.json carries `tag` (enough for latest_checkpoint / read_state)."""
    ck = run / "checkpoints" / f"step_{step:07d}"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": step, "tag": tag}))
    return ck


def _tag(run: Path) -> str:
    return json.loads((latest_checkpoint(run) / "state.json").read_text())["tag"]


def test_a_run_of_other_settings_is_moved_aside_and_back(tmp_path):
    run = tmp_path / "runs" / "toy" / "train"
    assert claim_run_dir(run, "A") == [] and read_run_key(run) == "A"  # a fresh run records its key
    _fake_run(run, 2, "a")
    assert claim_run_dir(run, "A") == [] and _tag(run) == "a"  # same key: resumed in place

    notes = claim_run_dir(run, "B")  # other settings: A's run steps aside, B starts empty
    assert any(str(run.with_name("train.A")) in n for n in notes)
    assert _tag(run.with_name("train.A")) == "a" and latest_checkpoint(run) is None and read_run_key(run) == "B"
    _fake_run(run, 1, "b")  # B stopped early

    notes = claim_run_dir(run, "A")  # back to A: its run returns (finished: nothing to retrain); B's is kept
    assert _tag(run) == "a" and read_run_key(run) == "A" and any("back" in n for n in notes)
    assert _tag(run.with_name("train.B")) == "b" and not run.with_name("train.A").exists()
    claim_run_dir(run, "B")  # and B's unfinished run comes back to be resumed
    assert _tag(run) == "b" and _tag(run.with_name("train.A")) == "a"


def test_forced_or_unkeyed_runs_are_kept_aside_newest_first(tmp_path):
    run = tmp_path / "train"
    _fake_run(run, 2, "by hand")  # no run_key.json: a run started with `i2l train --out`
    claim_run_dir(run, "A")
    assert _tag(run.with_name("train.unkeyed")) == "by hand" and latest_checkpoint(run) is None
    _fake_run(run, 2, "a1")
    claim_run_dir(run, "A", fresh=True)  # forced: retrain A, the old A stays aside
    assert latest_checkpoint(run) is None and _tag(run.with_name("train.A")) == "a1"
    _fake_run(run, 2, "a2")
    claim_run_dir(run, "B")  # the newest A is the one a switch back restores; the older steps aside
    assert _tag(run.with_name("train.A")) == "a2" and _tag(run.with_name("train.A.1")) == "a1"
    claim_run_dir(run, "A")
    assert _tag(run) == "a2"


def test_run_defining_changes_are_named_and_the_rest_ignored():
    saved = get_config("debug").to_dict()
    same = get_config("debug", {"train.steps": 999, "train.num_workers": 2, "train.ckpt_every": 7,
                                "train.max_failures": 0, "train.use_gpu": True})
    assert run_config_changes(saved, same) == []  # extending a run, or running it elsewhere, is the same run
    other = get_config("debug", {"train.lr": 0.5, "train.seed": 123, "predictor.hidden": 64})
    changes = run_config_changes(saved, other)
    assert sorted(c.split(":")[0] for c in changes) == ["predictor.hidden", "train.lr", "train.seed"]
    del saved["predictor"]["alpha"]  # a field an older checkpoint did not record is not compared
    assert run_config_changes(saved, get_config("debug", {"predictor.alpha": 3.0})) == []


def _run_with_config(root: Path, cfg) -> Path:
    """<root>/runs/<preset>/train with one checkpoint recording cfg, as the pipeline lays a run out."""
    ck = root / "runs" / cfg.name / "train" / "checkpoints" / "step_0000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    return ck


def test_toy_parts_are_found_again_under_a_moved_data_root(tmp_path, monkeypatch):
    from i2l.train.checkpoint import checkpoint_config

    monkeypatch.delenv("I2L_DATA_ROOT", raising=False)
    cfg = get_config("debug")
    cfg.data_root = str(tmp_path / "old")
    cfg = resolve_paths(cfg)
    cfg.scorer.clip_checkpoint = str(tmp_path / "mine" / "scorer")  # a user's own path, outside the data root
    new = tmp_path / "new"
    ck = _run_with_config(new, cfg)  # the data root moved: old/ is gone, new/ holds the run and the parts
    for part in ("backbone", "encoder"):
        (new / "toy" / "debug" / part).mkdir(parents=True)

    got = checkpoint_config(ck)  # found from where the checkpoint lies: <root>/runs/<preset>/train/...
    assert got.backbone.path == str(new / "toy" / "debug" / "backbone")
    assert got.encoder.path == str(new / "toy" / "debug" / "encoder")
    assert got.scorer.clip_checkpoint == cfg.scorer.clip_checkpoint  # outside the data root: left as recorded

    copied = tmp_path / "elsewhere" / "ck"  # a checkpoint copied out of the layout: the data root in use says where
    copied.mkdir(parents=True)
    (copied / "state.json").write_text((ck / "state.json").read_text())
    assert checkpoint_config(copied).backbone.path == cfg.backbone.path  # nowhere to look: the recorded path
    assert checkpoint_config(copied, str(new)).backbone.path == str(new / "toy" / "debug" / "backbone")
    monkeypatch.setenv("I2L_DATA_ROOT", str(new))
    assert checkpoint_config(copied).encoder.path == str(new / "toy" / "debug" / "encoder")

    (tmp_path / "old" / "toy" / "debug" / "backbone").mkdir(parents=True)  # the recorded place exists again
    assert checkpoint_config(ck).backbone.path == cfg.backbone.path


def test_a_saved_config_with_an_unknown_or_renamed_key_is_refused_naming_it(tmp_path):
    """A key dropped on load would come back as its default: the checkpoint must be fixed, not silently changed."""
    from i2l.train.checkpoint import checkpoint_config

    cfg = resolve_paths(get_config("debug"))
    ck = _run_with_config(tmp_path, cfg)
    state = json.loads((ck / "state.json").read_text())
    state["config"]["train"]["targets_per_style"] = state["config"]["train"].pop("targets_per_lora")  # renamed
    state["config"]["eval"]["old_knob"] = 1  # removed
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"train\.targets_per_style \(renamed to train\.targets_per_lora\?\)") as e:
        checkpoint_config(ck)
    assert "eval.old_knob" in str(e.value) and str(ck / "state.json") in str(e.value) and "rename" in str(e.value)


def test_paths_a_checkpoint_left_empty_are_resolved_under_the_data_root_in_use(tmp_path, monkeypatch):
    """Runs trained from a config whose scorer was never set record it empty; it is resolved on load, under the
    data root the caller uses (the checkpoint's own otherwise), and the recorded data root is kept."""
    from i2l.train.checkpoint import checkpoint_config

    monkeypatch.delenv("I2L_DATA_ROOT", raising=False)
    cfg = get_config("debug")
    cfg.data_root = str(tmp_path / "old")
    ck = _run_with_config(tmp_path / "old", cfg)  # nothing resolved: every default place is empty
    got = checkpoint_config(ck)
    assert got.data_root == cfg.data_root
    assert got.scorer.clip_checkpoint == str(tmp_path / "old" / "toy" / "debug" / "scorer")
    assert got.backbone.path == str(tmp_path / "old" / "toy" / "debug" / "backbone")
    elsewhere = checkpoint_config(ck, str(tmp_path / "new"))
    assert elsewhere.encoder.path == str(tmp_path / "new" / "toy" / "debug" / "encoder")
