"""i2l.io.atomic_files: a writer's files appear under their final names whole, or not at all."""

import pytest

from i2l.io import atomic_files


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
