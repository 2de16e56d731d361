"""Inputs are checked before any model loads (or any benchmark or flow starts): the loader, benchmark and flow are
instrumented in-process, and a bad image, LoRA, --out, --input or --store must fail without reaching them, in one
line. Each instrument is shown to be reached when the inputs are good, so its silence means something."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from i2l.cli import main as cli
from i2l.infer.api import I2L


class Reached(Exception):
    """Raised by an instrument: the command got past its checks to the expensive part."""


@pytest.fixture()
def calls(monkeypatch) -> list[str]:
    """Instruments the model loader, the benchmark `lora` and the flow loader; returns what was reached."""
    import flows
    import i2l.bench.lora

    reached: list[str] = []

    def load(cls, *args, **kwargs):
        reached.append("model")
        raise Reached("model load")

    def bench_run(args):
        reached.append("bench")
        return [{"case": "c", "metric": "m", "value": 1.0, "unit": "s"}]

    def load_flow(name):
        reached.append(f"flow {name}")
        return lambda **params: {"stages": []}

    monkeypatch.setattr(I2L, "load", classmethod(load))
    monkeypatch.setattr(i2l.bench.lora, "run", bench_run)
    monkeypatch.setattr(flows, "load_flow", load_flow)
    return reached


@pytest.fixture()
def paths(tmp_path):
    Image.new("RGB", (40, 40), (20, 90, 200)).save(tmp_path / "ref.png")
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("not an image, not a LoRA, not a database\n")
    return tmp_path


def _fails_early(argv: list[str], calls: list[str], capsys, *words: str) -> str:
    code = cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and calls == [], (code, calls, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def test_predict_checks_images_and_out_before_loading(debug_run, calls, paths, capsys):
    ck, ok = str(debug_run.run_dir), str(paths / "ref.png")
    predict = ["predict", "--checkpoint", ck, "--out", str(paths / "s.safetensors"), "--images"]
    _fails_early(predict + [ok, str(paths / "adir")], calls, capsys, "is a directory, give an image file")
    _fails_early(predict + [str(paths / "missing.png")], calls, capsys, "not found", "missing.png")
    _fails_early(predict + [str(paths / "notes.txt")], calls, capsys, "cannot read image", "notes.txt")
    _fails_early(predict + [str(paths / "nothing*.png")], calls, capsys, "no image matches")
    # a pipe or a device named as an image: refused without reading it (it would block, or never end)
    os.mkfifo(paths / "pipe.png")
    (paths / "zero.png").symlink_to("/dev/zero")
    for odd in ("pipe.png", "zero.png"):
        _fails_early(predict + [ok, str(paths / odd)], calls, capsys, "not a regular file", odd)
    _fails_early(["predict", "--checkpoint", ck, "--images", ok, "--out", str(paths / "adir")], calls, capsys,
                 "--out", "is a directory")
    _fails_early(["predict", "--checkpoint", ck, "--images", ok, "--out", str(paths / "notes.txt" / "s.safetensors")],
                 calls, capsys, "is a file, not a directory")
    _fails_early(["predict", "--checkpoint", str(paths / "adir"), "--images", ok, "--out", str(paths / "s")], calls,
                 capsys, "no checkpoint under")
    with pytest.raises(Reached):  # the instrument: good inputs do reach the loader
        cli(["--debug", "predict", "--checkpoint", ck, "--images", ok, "--out", str(paths / "s.safetensors")])
    assert calls == ["model"]


def test_generate_checks_loras_images_masks_and_out_before_loading(debug_run, calls, paths, capsys):
    ck, ok = str(debug_run.run_dir), str(paths / "ref.png")
    gen = ["generate", "--checkpoint", ck, "--prompt", "one circle", "--out", str(paths / "gen")]
    _fails_early(gen + ["--images", str(paths / "adir")], calls, capsys, "is a directory, give an image file")
    _fails_early(gen + ["--lora", str(paths / "notes.txt")], calls, capsys, "--lora", "not a safetensors file")
    _fails_early(gen + ["--lora", str(paths / "adir")], calls, capsys, "--lora", "is a directory")
    _fails_early(gen + ["--lora", str(paths / "gone.safetensors")], calls, capsys, "LoRA file not found")
    os.mkfifo(paths / "pipe.safetensors")
    (paths / "zero.safetensors").symlink_to("/dev/zero")
    for odd in ("pipe.safetensors", "zero.safetensors"):
        _fails_early(gen + ["--lora", str(paths / odd)], calls, capsys, "not a regular file", odd)
    _fails_early(gen + ["--images", ok, "--inpaint", ok, "--mask", str(paths / "adir")], calls, capsys,
                 "--mask image", "is a directory")
    _fails_early(gen + ["--images", ok, "--init-image", str(paths / "gone.png")], calls, capsys,
                 "--init-image", "not found", "gone.png")
    (paths / "zero.png").symlink_to("/dev/zero")
    _fails_early(gen + ["--images", ok, "--inpaint", str(paths / "zero.png"), "--mask", ok], calls, capsys,
                 "--inpaint image", "not a regular file")
    _fails_early(["generate", "--checkpoint", ck, "--prompt", "x", "--images", ok, "--out", str(paths / "notes.txt")],
                 calls, capsys, "--out", "is a file")
    with pytest.raises(Reached):
        cli(["--debug", *gen, "--images", ok])
    assert calls == ["model"]


def test_run_checks_its_input_before_any_flow_starts(debug_run, calls, paths, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(paths / "prefect"))  # the instrumented flow starts no server
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    run = ["run", "--preset", "debug", "--data-root", str(paths / "root"), "--no-progress", "--input"]
    _fails_early(run + [str(paths / "missing")], calls, capsys, "not found", "missing")
    _fails_early(run + [str(paths / "notes.txt")], calls, capsys, "is a file")
    _fails_early(run + [str(paths / "adir")], calls, capsys, "no .parquet shards")
    assert cli(run + [str(debug_run.toyworld_dir)]) == 0 and calls == ["flow pipeline"]


def test_bench_checks_its_store_before_running(calls, paths, capsys):
    notes = paths / "notes.txt"
    before = notes.read_bytes()
    bench = ["bench", "lora", "--preset", "debug", "--store"]
    _fails_early(bench + [str(notes)], calls, capsys, "not a valid DuckDB", "--store")
    assert notes.read_bytes() == before
    _fails_early(bench + [str(paths / "adir")], calls, capsys)
    assert cli(bench + [str(paths / "results.duckdb")]) == 0 and calls == ["bench"]
