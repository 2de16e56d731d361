"""`--no-progress` quiets every bar, the libraries' own included: transformers' "Loading weights" (the encoder) and
diffusers' checkpoint loading, in the command's process and in the children it starts (they inherit the setting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generate(debug_run, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from i2l.eval.heldout_loss import load_val_samples

    refs = []
    tmp_path.mkdir(parents=True)
    for i, im in enumerate(load_val_samples(debug_run.prepared_dir)[0].refs[:2]):
        refs.append(tmp_path / f"ref{i}.png")
        im.save(refs[-1])
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    argv = [sys.executable, "-m", "i2l.cli", "generate", "--checkpoint", str(debug_run.run_dir), "--images",
            *map(str, refs), "--prompt", "one small square", "--steps", "1", "--out", str(tmp_path / "out"), *extra]
    return subprocess.run(argv, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300, check=False)


def test_no_progress_quiets_the_libraries_bars(debug_run, tmp_path):
    loud = _generate(debug_run, tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stderr  # the encoder's loading bar: what the flag has to quiet
    quiet = _generate(debug_run, tmp_path / "quiet", "--no-progress")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    out = quiet.stdout + quiet.stderr
    assert "Loading weights" not in out and "\r" not in out and "it/s" not in out, out[-2000:]
    assert len(list((tmp_path / "quiet" / "out").rglob("*.png"))) == 1


def test_backbone_loading_quiets_diffusers_bars_when_the_hub_is_quiet(monkeypatch):
    from diffusers.utils import logging

    from i2l.backbones.registry import backbone_loader

    try:
        logging.enable_progress_bar()  # diffusers' switch is process-wide: an earlier test may have turned it off
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        backbone_loader("toy")
        assert logging.is_progress_bar_enabled()  # a plain run keeps diffusers' bars
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        backbone_loader("toy")
        assert not logging.is_progress_bar_enabled()
    finally:
        logging.enable_progress_bar()


def test_an_in_process_command_puts_the_setting_back(monkeypatch):
    from i2l.cli import main

    key, seen = "HF_HUB_DISABLE_PROGRESS_BARS", []
    monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("i2l.cli.prepare.main", lambda args: seen.append(os.environ.get(key)))
    assert main(["prepare", "--no-progress"]) == 0 and main(["prepare"]) == 0
    assert seen == ["1", None]  # set for the command that asked, and only for it
    assert key not in os.environ
