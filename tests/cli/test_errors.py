"""Every command fails with one line `i2l <cmd>: error: ...` and exit != 0; the traceback only with --debug.

The commands come from the parser, so a new command fails `test_every_command_has_bad_arguments` until it gets
bad arguments here: ones that fail before any model, Ray or Prefect starts."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2l.cli import build_parser, explain, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command, nested ones (`bench lora`) included."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, prefix + (name,)) or [prefix + (name,)]
    return out


COMMANDS = _commands(build_parser())


def _bad_args(t: Path) -> dict[tuple[str, ...], list[list[str]]]:
    """Per command, argument lists that must fail fast: a missing path, a file that is not a DuckDB store, a
    directory where a file belongs (or a file where a directory belongs), an unknown setting."""
    miss, notdb, adir, root = str(t / "missing"), str(t / "not.duckdb"), str(t / "adir"), str(t / "root")
    ck = ["--checkpoint", miss]
    dr = ["--data-root", root]  # never the repository's data/
    return {
        ("bench", "amortization"): [ck + ["--data", miss], ["--checkpoint", notdb, "--data", adir]],
        ("bench", "cfg"): [["--preset", "nosuch"]],
        ("bench", "lora"): [["--preset", "nosuch"]],
        ("bench", "prepare"): [["--workers", "x"]],
        ("bench", "produce"): [["--preset", "nosuch"]],
        ("bench", "train-step"): [["--preset", "nosuch"]],
        ("bench", "train-cache"): [["--preset", "nosuch"], ["--store", notdb]],
        ("doctor",): [["--preset", "nosuch"] + dr, ["--set", "nosuch.field=1"] + dr],
        ("eval-loss",): [ck + ["--data", miss] + dr, ck + ["--data", miss, "--store", notdb] + dr],
        ("evaluate",): [ck + ["--data", miss] + dr, ["--checkpoint", adir, "--data", adir] + dr],
        ("generate",): [ck + ["--prompt", "x", "--out", adir], ["--checkpoint", notdb, "--prompt", "x",
                                                                "--out", adir, "--lora", notdb]],
        ("info",): [["--set", "nosuch.field=1"] + dr, ["--preset", "nosuch"]],
        ("optimize-lora",): [["--data", miss, "--style-id", "s1", "--out", adir] + dr],
        ("predict",): [ck + ["--images", miss, "--out", adir], ["--checkpoint", notdb, "--images", adir,
                                                               "--out", adir]],
        ("prepare",): [["--input", miss, "--out", adir] + dr, ["--input", notdb] + dr],
        ("pretrain-backbone",): [["--data", miss] + dr, ["--data", notdb] + dr],
        ("pretrain-encoder",): [["--data", miss] + dr],
        ("pretrain-scorer",): [["--data", miss] + dr],
        ("produce",): [ck + ["--manifest", miss, "--out", adir] + dr,
                       ck + ["--images", notdb, "--out", adir, "--db", notdb] + dr],
        ("query",): [["--db", miss, "SELECT 1"], ["--db", notdb, "SELECT 1"], ["--db", adir, "SELECT 1"],
                     ["--db", notdb, "--set", "nosuch.field=1", "SELECT 1"]],
        ("report",): [["--db", miss] + dr, ["--db", notdb, "--out", adir] + dr, ["--db", adir] + dr],
        ("run",): [["--set", "nosuch.field=1"] + dr, ["--preset", "nosuch"] + dr],
        ("toyworld",): [["--out", notdb, "--styles", "2"] + dr],
        ("train",): [["--data", miss, "--out", adir, "--no-ray"] + dr],
        ("train-adapter",): [["--data", miss, "--out", adir] + dr],
        ("train-mean-lora",): [["--data", miss, "--out", adir] + dr],
    }


@pytest.fixture()
def bad_paths(tmp_path):
    (tmp_path / "not.duckdb").write_text("not a database\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "root").mkdir()
    return tmp_path


def test_every_command_has_bad_arguments(tmp_path):
    missing = sorted(set(COMMANDS) - set(_bad_args(tmp_path)))
    assert not missing, f"add fast-failing bad arguments for {missing} to _bad_args"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_arguments_fail_in_one_line(command, bad_paths, capsys):
    for args in _bad_args(bad_paths).get(command, []):
        rc = main([*command, *args])
        err = capsys.readouterr().err
        assert rc not in (0, None), (command, args)
        assert err.startswith(f"i2l {command[0]}: error: "), (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (args, err)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["query"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("i2l query: error: ") and err.count("\n") == 1, err


def test_debug_reraises_before_or_after_the_command(bad_paths):
    for argv in (["--debug", "query"], ["query", "--debug"]):
        with pytest.raises(FileNotFoundError, match="no results store"):
            main([*argv, "--db", str(bad_paths / "missing"), "SELECT 1"])


def test_debug_prints_the_traceback_from_the_shell(bad_paths):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    argv = [sys.executable, "-m", "i2l.cli", "query", "--db", str(bad_paths / "not.duckdb"), "SELECT 1"]
    quiet = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert "not a valid DuckDB database" in quiet.stderr
    loud = subprocess.run(argv[:3] + ["--debug"] + argv[3:], check=False, capture_output=True, text=True,
                          env=env, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import i2l.cli.info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(i2l.cli.info, "main", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "i2l info: interrupted\n"


def test_library_errors_become_one_line_advice(tmp_path):
    import duckdb
    import safetensors.torch

    from i2l.store import Store, StoreBusyError

    pickled = tmp_path / "lora.safetensors"
    pickled.write_bytes(b"\x80\x04\x95 not safetensors at all")
    with pytest.raises(Exception) as st:
        safetensors.torch.load_file(str(pickled))
    code, msg = explain(st.value)
    assert code == 2 and "not a readable .safetensors file" in msg and "\n" not in msg
    with pytest.raises(Exception) as st:
        safetensors.torch.save_file({}, str(tmp_path))  # --out naming a directory
    code, msg = explain(st.value)
    assert code == 2 and "cannot write" in msg and "--out" in msg

    (tmp_path / "x.duckdb").write_text("text")
    with pytest.raises(duckdb.Error) as db:
        Store(tmp_path / "x.duckdb", read_only=True).query("SELECT 1")
    code, msg = explain(db.value)
    assert code == 2 and "x.duckdb" in msg and "results store" in msg and "\n" not in msg

    assert explain(StoreBusyError("results store s is locked; close it"))[0] == 1
    assert explain(IsADirectoryError(21, "Is a directory", str(tmp_path)))[0] == 2

    ray_error = type("RayActorError", (Exception,), {"__module__": "ray.exceptions"})
    code, msg = explain(ray_error("The actor died unexpectedly\n  Traceback ...\nmore"))
    assert code == 1 and msg.startswith("Ray failed (RayActorError: The actor died") and "\n" not in msg

    code, msg = explain(RuntimeError("boom\nsecond line"))
    assert code == 1 and msg.startswith("RuntimeError: boom second line") and "--debug" in msg
