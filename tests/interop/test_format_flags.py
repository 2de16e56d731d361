"""`--format` on `i2l predict` and `i2l produce`: the file is written in the format asked for, reads back to the
LoRA the default (diffusers) file holds, and a production folder records its format and refuses another one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from i2l.cli import main as cli
from i2l.data.shards import iter_rows
from i2l.io import file_sha256
from i2l.model.lora import LoRA
from i2l.produce.catalog import GRAY_FILE, read_catalog
from i2l.produce.jobs import StyleJob
from i2l.produce.producer import LoRAProducer
from i2l.produce.stage import produce
from i2l.store import Store


def keys_and_meta(path) -> tuple[list[str], dict]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata()


def same(a: LoRA, b: LoRA) -> bool:
    return set(a.names) == set(b.names) and all(torch.equal(a.A[k], b.A[k]) and torch.equal(a.B[k], b.B[k])
                                                for k in a.names)


def val_images(debug_run, n: int) -> list[bytes]:
    return [row["image"] for row in iter_rows(debug_run.prepared_dir, "val", ("id", "image"))][:n]


def test_predict_format_diffsynth_writes_a_diffsynth_file(debug_run, tmp_path):
    refs = []
    for i, image in enumerate(val_images(debug_run, 2)):
        refs.append(tmp_path / f"ref{i}.png")
        refs[-1].write_bytes(image)
    argv = ["predict", "--checkpoint", str(debug_run.run_dir), "--images", *map(str, refs)]
    assert cli([*argv, "--out", str(tmp_path / "d.safetensors")]) == 0
    assert cli([*argv, "--out", str(tmp_path / "s.safetensors"), "--format", "diffsynth"]) == 0
    keys, meta = keys_and_meta(tmp_path / "s.safetensors")
    assert meta["i2l.lora_format"] == "diffsynth"
    assert keys and not any(k.startswith(("transformer.", "diffusion_model.")) for k in keys)
    assert all(k.startswith("transformer.") for k in keys_and_meta(tmp_path / "d.safetensors")[0])
    assert same(LoRA.load(tmp_path / "s.safetensors"), LoRA.load(tmp_path / "d.safetensors"))
    with pytest.raises(SystemExit):  # argparse's refusal, naming the choices
        cli([*argv, "--out", str(tmp_path / "k.safetensors"), "--format", "kohya"])


def test_producer_writes_and_catalogues_its_format(debug_run, tmp_path):
    """The actor's class, run in this process: files in the format asked for, each catalog row saying it."""
    ck = debug_run.checkpoint_dir
    sha = file_sha256(ck / "predictor.safetensors")
    rows = {}
    for fmt in ("diffusers", "comfyui"):
        producer = LoRAProducer(str(ck), str(tmp_path / fmt), "cpu", "test", sha, fmt)
        [rows[fmt]] = producer.make([StyleJob("user", ["a", "b"], val_images(debug_run, 2))])
    assert rows["comfyui"]["format"] == "comfyui" and rows["diffusers"]["format"] == "diffusers"
    keys, meta = keys_and_meta(tmp_path / "comfyui" / rows["comfyui"]["path"])
    assert meta["i2l.lora_format"] == "comfyui" and all(k.startswith("diffusion_model.") for k in keys)
    assert same(LoRA.load(tmp_path / "comfyui" / rows["comfyui"]["path"]),
                LoRA.load(tmp_path / "diffusers" / rows["diffusers"]["path"]))


def test_a_folder_of_one_format_refuses_another_before_any_work(debug_run, tmp_path):
    out, store = tmp_path / "loras", Store(tmp_path / "r.duckdb")
    out.mkdir()
    sha = file_sha256(debug_run.checkpoint_dir / "predictor.safetensors")
    (out / "production.json").write_text(json.dumps({"checkpoint_sha256": sha, "format": "diffsynth"}))
    job = StyleJob("s1", ["a"], val_images(debug_run, 1))
    with pytest.raises(FileExistsError, match="holds LoRA files in diffsynth format; this run writes comfyui"):
        produce(debug_run.run_dir, [job], out, store, progress=False, fmt="comfyui")
    (out / "production.json").write_text(json.dumps({"checkpoint_sha256": sha}))  # bound before formats existed
    with pytest.raises(FileExistsError, match="in diffusers format; this run writes diffsynth"):
        produce(debug_run.run_dir, [job], out, store, progress=False, fmt="diffsynth")
    with pytest.raises(ValueError, match="unknown LoRA file format"):
        produce(debug_run.run_dir, [job], out, store, progress=False, fmt="kohya")
    assert sorted(p.name for p in out.iterdir()) == ["production.json"], "a refused run writes nothing"


def test_produce_format_flag_writes_and_records_the_format(debug_run, tmp_path, ray_session, capsys):
    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    argv = ["produce", "--checkpoint", str(debug_run.run_dir), "--manifest", str(debug_run.prepared_dir),
            "--limit", "1", "--out", str(out), "--db", str(db), "--workers", "1", "--no-progress"]
    assert cli([*argv, "--format", "comfyui"]) == 0
    catalog = read_catalog(out)
    assert len(catalog) == 2 and {r["format"] for r in catalog} == {"comfyui"}
    assert json.loads((out / "production.json").read_text())["format"] == "comfyui"
    for path in [out / GRAY_FILE, *(out / "styles").glob("*.safetensors")]:
        keys, meta = keys_and_meta(path)
        assert meta["i2l.lora_format"] == "comfyui" and all(k.startswith("diffusion_model.") for k in keys)
    capsys.readouterr()
    assert cli(argv) != 0  # the default format on the same folder: refused, saying why
    assert "holds LoRA files in comfyui format; this run writes diffusers" in capsys.readouterr().err
