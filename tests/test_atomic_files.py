"""i2l.io.atomic_files: a writer's files appear under their final names whole, or not at all."""

import pytest

from i2l.io import _HOST, atomic_files


def test_files_appear_whole_and_nothing_is_left_beside_them(tmp_path):
    out = tmp_path / "model"
    (out).mkdir()
    (out / "run_key.json").write_text("{}")  # what the directory already holds stays
    with atomic_files(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"a": 1}')
        (tmp / "weights.bin").write_bytes(b"x" * 10)
        assert not (out / "weights.bin").exists()  # nothing at a final name while the writer runs
    assert (out / "sub" / "config.json").read_text() == '{"a": 1}' and (out / "weights.bin").stat().st_size == 10
    assert (out / "run_key.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the temporary directory is gone


def test_a_failed_writer_leaves_the_directory_as_it_was(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_files(out) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_killed_saves_temporary_directory_is_cleared_by_the_next_save(tmp_path):
    """A save killed mid-write leaves its dot-named directory (no `finally` runs under SIGKILL): the next save of
    the same directory removes it, and leaves alone one whose writer still runs."""
    import os

    out = tmp_path / "backbone"
    dead = tmp_path / f".backbone.{_HOST}.999999999.deadbeef.tmp"  # no such pid
    live = tmp_path / f".backbone.{_HOST}.{os.getpid()}.cafe0000.tmp"
    for d in (dead, live):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "half.json").write_text("{")
    with atomic_files(out) as tmp:
        (tmp / "a.json").write_text("{}")
    assert not dead.exists() and live.exists()
    assert (out / "a.json").read_text() == "{}"
