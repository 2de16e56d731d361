"""Checkpoints verify themselves: state.json records each file's size and sha256, and a load (here `i2l predict`,
in-process) uses the newest intact step, warning on stderr about each broken one it skipped, by file and why.
With no intact step the command fails in one line naming every broken file. Copies of the session's debug run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from i2l.cli import main as cli
from i2l.io import file_sha256
from i2l.train.checkpoint import CheckpointError, find_checkpoint, read_state


@pytest.fixture()
def run(debug_run, tmp_path) -> Path:
    """A copy of the debug run with two steps: step_0000001 (the debug run's step, relabelled) and step_0000002."""
    run = Path(shutil.copytree(debug_run.run_dir, tmp_path / "run"))
    cks = run / "checkpoints"
    assert [d.name for d in cks.iterdir()] == ["step_0000002"]
    older = Path(shutil.copytree(cks / "step_0000002", cks / "step_0000001"))
    state = json.loads((older / "state.json").read_text())
    (older / "state.json").write_text(json.dumps({**state, "step": 1}))  # the files it records are unchanged
    return run


@pytest.fixture()
def image(tmp_path) -> str:
    Image.new("RGB", (48, 40), (180, 60, 20)).save(tmp_path / "ref.png")
    return str(tmp_path / "ref.png")


def _predict(run: Path, image: str, out: Path, capsys) -> tuple[int, str]:
    code = cli(["predict", "--checkpoint", str(run), "--images", image, "--out", str(out)])
    return code, capsys.readouterr().err


def _made_by(lora_file: Path) -> str:
    with safe_open(str(lora_file), framework="pt") as f:
        return json.loads(f.metadata()["i2l.meta"])["checkpoint"]


def test_each_file_of_a_step_is_recorded_with_its_size_and_hash(run):
    ck = run / "checkpoints" / "step_0000002"
    files = read_state(ck)["files"]
    assert {"predictor.safetensors", "optimizer.safetensors", "curve.json"} <= set(files)
    for name, record in files.items():
        assert record == {"bytes": (ck / name).stat().st_size, "sha256": file_sha256(ck / name)}
    assert find_checkpoint(run) == (ck, [])  # intact: the newest step, nothing to warn about


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # tensor data: the size and the header stay valid, only the hash can tell
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [(_truncate, "truncated"), (_flip_last_byte, "hash mismatch")])
def test_a_damaged_newest_predictor_falls_back_to_the_older_step(run, image, tmp_path, capsys, damage, why):
    broken = run / "checkpoints" / "step_0000002" / "predictor.safetensors"
    damage(broken)
    code, err = _predict(run, image, tmp_path / "style.safetensors", capsys)
    assert code == 0, err
    assert _made_by(tmp_path / "style.safetensors") == "run/step_0000001"
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1, err  # said once, although the step is checked early and again at load
    assert str(broken) in warning[0] and why in warning[0] and "step_0000001" in warning[0]


def test_a_broken_state_json_is_named(run, image, tmp_path, capsys):
    state = run / "checkpoints" / "step_0000002" / "state.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(ValueError, match=str(state)):
        read_state(state.parent)
    code, err = _predict(run, image, tmp_path / "style.safetensors", capsys)
    assert code == 0, err
    assert _made_by(tmp_path / "style.safetensors") == "run/step_0000001"
    assert str(state) in err and "warning" in err


def test_no_intact_step_is_one_line_naming_each_broken_file(run, image, tmp_path, capsys):
    files = [run / "checkpoints" / s / "predictor.safetensors" for s in ("step_0000001", "step_0000002")]
    for f in files:
        _truncate(f)
    code, err = _predict(run, image, tmp_path / "style.safetensors", capsys)
    assert code != 0 and not (tmp_path / "style.safetensors").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(str(f) in lines[0] for f in files) and "no intact checkpoint" in lines[0]


def test_a_step_given_by_path_falls_back_within_its_run(run):
    _truncate(run / "checkpoints" / "step_0000002" / "predictor.safetensors")
    ck, warnings = find_checkpoint(run / "checkpoints" / "step_0000002")
    assert ck == run / "checkpoints" / "step_0000001" and len(warnings) == 1
    assert find_checkpoint(run / "checkpoints" / "step_0000001") == (ck, [])  # never a newer step than asked


def test_an_older_checkpoint_without_recorded_hashes_still_loads_header_checked(run):
    for ck in (run / "checkpoints").iterdir():
        state = json.loads((ck / "state.json").read_text())
        del state["files"]  # as written before checkpoints recorded their files
        (ck / "state.json").write_text(json.dumps(state))
    newest = run / "checkpoints" / "step_0000002"
    assert find_checkpoint(run) == (newest, [])
    _flip_last_byte(newest / "predictor.safetensors")
    assert find_checkpoint(run) == (newest, [])  # no hash to compare: only the framing is checked
    _truncate(newest / "predictor.safetensors")
    ck, warnings = find_checkpoint(run)
    assert ck.name == "step_0000001" and "truncated" in warnings[0]
    _truncate(ck / "predictor.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_checkpoint(run)


def test_a_file_name_from_state_json_is_never_a_path(run):
    ck = run / "checkpoints" / "step_0000002"
    state = json.loads((ck / "state.json").read_text())
    state["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (ck / "state.json").write_text(json.dumps(state))
    found, warnings = find_checkpoint(run)
    assert found.name == "step_0000001" and "not a file of this step" in warnings[0]


def _break_state(f: Path) -> None:
    f.write_text('{"step": 2, "config": ')  # a write cut short


@pytest.mark.parametrize("name, damage", [("predictor.safetensors", _flip_last_byte), ("state.json", _break_state)])
def test_resume_from_a_damaged_newest_step_continues_from_the_older_one(debug_run, run, caplog, name, damage):
    """The run check (same settings), the resume and the run's summary all read the newest intact step."""
    from i2l.train.loop import train_predictor

    newest = run / "checkpoints" / "step_0000002"
    damage(newest / name)
    info = train_predictor(debug_run.cfg, debug_run.prepared_dir, run, resume=True, progress=False)
    assert info["steps"] == 2 and any(str(newest / name) in r.getMessage() for r in caplog.records)
    assert find_checkpoint(run) == (newest, [])  # step 2 trained again from step 1 and written whole
