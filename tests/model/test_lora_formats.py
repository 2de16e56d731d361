"""LoRA file formats (i2l.model.lora_formats): every format reads back to the LoRA saved, each writes its consumer's
keys, a fused layer carries exactly the LoRA of its parts, and a diffusers file is what it always was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_lora, tiny_flux2, tiny_toy, tiny_zimage

from i2l.model.lora import FORMAT_VERSION, LoRA

FORMATS = ("diffusers", "diffsynth", "comfyui")
BUILDERS = {"toy": tiny_toy, "flux2": lambda: tiny_flux2(parts=False), "zimage": lambda: tiny_zimage(parts=False)}


@pytest.fixture(scope="module")
def backbones():
    return {k: b() for k, b in BUILDERS.items()}


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def assert_same(a: LoRA, b: LoRA) -> None:
    assert sorted(a.names) == sorted(b.names)
    for k in a.names:
        assert torch.equal(a.A[k], b.A[k]) and torch.equal(a.B[k], b.B[k]), k


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_every_format_reads_back_to_the_lora_saved(backbones, kind, fmt, tmp_path):
    bb = backbones[kind]
    lora = random_lora(bb, None)
    lora.meta["style_id"] = "s1"
    path = lora.save(tmp_path / "x.safetensors", format=fmt, backbone=type(bb))  # the class: no weights needed
    back = LoRA.load(path, backbone=bb)
    assert_same(back, lora)
    assert back.backbone == lora.backbone and back.meta == {"style_id": "s1"}
    assert_same(LoRA.load(path), lora)  # the file says its format and layers: no backbone needed to read it
    _, meta = read(path)
    assert meta.get("i2l.lora_format") == (None if fmt == "diffusers" else fmt)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_format_writes_its_consumers_prefix(backbones, kind, tmp_path):
    """diffusers: `transformer.`; DiffSynth: no prefix at all (its loader would match nothing under one);
    ComfyUI: `diffusion_model.`. Fails when prefix handling breaks."""
    bb = backbones[kind]
    lora = random_lora(bb, None)
    keys = {fmt: set(read(lora.save(tmp_path / f"{fmt}.safetensors", format=fmt, backbone=bb))[0])
            for fmt in FORMATS}
    targets = set(bb.lora_targets())
    assert keys["diffusers"] == {f"transformer.{m}.lora_{x}.weight" for m in targets for x in "AB"}
    assert not any(k.startswith(("transformer.", "diffusion_model.")) for k in keys["diffsynth"])
    assert all(k.startswith("diffusion_model.") for k in keys["comfyui"])
    if kind != "flux2":  # no renaming: DiffSynth's and ComfyUI's loaders take diffusers' module names here
        assert keys["diffsynth"] == {f"{m}.lora_{x}.weight" for m in targets for x in "AB"}
        assert keys["comfyui"] == {f"diffusion_model.{k}" for k in keys["diffsynth"]}


def test_diffusers_file_is_what_it_was(backbones, tmp_path):
    """The default format writes exactly the tensors, keys and metadata i2l wrote before formats existed."""
    bb = backbones["flux2"]
    lora = random_lora(bb, None)
    lora.meta["k"] = "v"
    ours = lora.save(tmp_path / "ours.safetensors")
    tensors = {}
    for k in lora.names:
        tensors[f"transformer.{k}.lora_A.weight"] = lora.A[k].contiguous()
        tensors[f"transformer.{k}.lora_B.weight"] = lora.B[k].contiguous()
    meta = {"format": "pt", "i2l.format_version": FORMAT_VERSION, "i2l.backbone": lora.backbone,
            "i2l.rank": str(lora.rank), "i2l.alpha": "folded into lora_B (scaling 1)", "i2l.meta": json.dumps(lora.meta)}
    save_file(tensors, str(tmp_path / "before.safetensors"), metadata=meta)
    assert split_file(ours) == split_file(tmp_path / "before.safetensors")
    assert split_file(lora.save(tmp_path / "b.safetensors", format="diffusers", backbone=bb)) == split_file(ours)


def split_file(path) -> tuple[dict, bytes]:
    """(parsed header, data bytes): safetensors writes the metadata in no fixed order, so whole files of equal
    content may differ in their header's byte order; everything else is fixed."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_comfyui_flux2_fuses_qkv_into_an_exactly_equal_lora(backbones, tmp_path):
    """q, k, v -> BFL's qkv: A stacked (3r, in), B block-diagonal (3·out, 3r); B·A = [ΔW_q; ΔW_k; ΔW_v]."""
    bb = backbones["flux2"]
    lora = random_lora(bb, None, rank=2)
    tensors, meta = read(lora.save(tmp_path / "c.safetensors", format="comfyui", backbone=bb))
    p = "diffusion_model.double_blocks.0"
    for fused, parts in ((f"{p}.img_attn.qkv", ("to_q", "to_k", "to_v")),
                         (f"{p}.txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        a, b = tensors[f"{fused}.lora_A.weight"], tensors[f"{fused}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 3 * lora.rank
        want = torch.cat([lora.delta(f"transformer_blocks.0.attn.{n}") for n in parts])  # (3·out, in)
        torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-7)
    for bfl, ours in (("img_attn.proj", "transformer_blocks.0.attn.to_out.0"),
                      ("txt_mlp.2", "transformer_blocks.0.ff_context.linear_out"),
                      ("single_blocks.1.linear1", "single_transformer_blocks.1.attn.to_qkv_mlp_proj")):
        key = f"diffusion_model.{bfl}" if bfl.startswith("single") else f"{p}.{bfl}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], lora.A[ours])
    assert "transformer_blocks.0.attn.to_q" in meta["i2l.layers"]
    assert not any("transformer_blocks" in k for k in tensors), "every FLUX.2 target has a BFL name"


def test_clear_errors(backbones, tmp_path):
    bb = backbones["flux2"]
    lora = random_lora(bb, None)
    with pytest.raises(ValueError, match="unknown LoRA file format 'kohya'.*diffusers, diffsynth, comfyui"):
        lora.save(tmp_path / "x.safetensors", format="kohya")
    assert not (tmp_path / "x.safetensors").exists()
    q_only = LoRA({k: v for k, v in lora.A.items() if not k.endswith(("to_k", "to_v"))},
                  {k: v for k, v in lora.B.items() if not k.endswith(("to_k", "to_v"))}, lora.backbone)
    with pytest.raises(ValueError, match="img_attn.qkv is one layer.*save it as diffusers"):
        q_only.save(tmp_path / "q.safetensors", format="comfyui", backbone=bb)
    q_only.save(tmp_path / "q.safetensors", format="diffsynth", backbone=bb)  # no fusing there: fine
    # a file whose metadata names a format this version does not know, or lies about its fused layers
    tensors, meta = read(lora.save(tmp_path / "c.safetensors", format="comfyui", backbone=bb))
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={**meta, "i2l.lora_format": "future"})
    with pytest.raises(ValueError, match="format 'future', which this version of i2l does not read"):
        LoRA.load(tmp_path / "future.safetensors")
    layers = json.loads(meta["i2l.layers"])
    layers[next(iter(layers))][0][1] += 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "i2l.layers": json.dumps(layers)})
    with pytest.raises(ValueError, match="i2l.layers says its parts"):
        LoRA.load(tmp_path / "bad.safetensors")
