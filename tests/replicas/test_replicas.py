"""The replicas of the published checkpoints: published files and shards present, published config values and
weight key names, loading with the libraries' own classes the way the model cards load them, and i2l's own
loaders reading them."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from i2l.replicas import PUBLISHED, REPLICAS, SIZE_KEYS, SOURCES, register_open_clip_archs, write_replica

TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Path]:
    import diffusers  # noqa: F401  - import the libraries first: the timings are the replicas' own
    import open_clip  # noqa: F401
    import transformers  # noqa: F401

    root = tmp_path_factory.mktemp("replicas")
    out = {}
    for name in REPLICAS:
        start = time.perf_counter()
        out[name] = write_replica(name, root)
        TIMES[name] = time.perf_counter() - start
    return out


def _walk(path: Path, spec: str):
    """'file.json[:key[:key]]' -> the JSON object at that place."""
    file, *keys = spec.split(":")
    obj = json.loads((path / file).read_text())
    for k in keys:
        obj = obj[k]
    return obj


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("name", list(REPLICAS))
def test_replica_has_the_published_files_and_every_shard(replicas, name):
    path = replicas[name]
    missing = [f for f in PUBLISHED[name]["files"] if not (path / f).is_file()]
    assert not missing, f"{name}: published files missing {missing}"
    for index in path.rglob("*.safetensors.index.json"):
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = set(weight_map.values())
        assert all((index.parent / s).is_file() for s in shards)
        counts = {int(m.group(1)) for s in shards if (m := re.search(r"-of-(\d{5})\.safetensors$", s))}
        assert counts == {len(shards)}, f"{index}: shard names say {counts}, {len(shards)} shards listed"
        on_disk = {p.name for p in index.parent.glob("*-of-*.safetensors")}
        assert on_disk == shards
    assert set(PUBLISHED[name]["sources"]) <= set(SOURCES)


@pytest.mark.parametrize("name", list(REPLICAS))
def test_replica_config_values_are_the_published_ones(replicas, name):
    for spec, published in PUBLISHED[name]["configs"].items():
        got = _walk(replicas[name], spec)
        for key, value in published.items():
            if key in SIZE_KEYS:
                continue
            assert key in got, f"{name} {spec}: no {key}"
            if isinstance(value, float):
                assert got[key] == pytest.approx(value), f"{name} {spec}: {key}"
            else:
                assert _norm(got[key]) == _norm(value), f"{name} {spec}: {key}"


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


@pytest.mark.parametrize("name", ["FLUX.2-klein-base-4B", "FLUX.2-klein-4B"])
def test_flux2_weights_have_the_published_key_names_and_dtype(replicas, name):
    from safetensors import safe_open

    path = replicas[name]
    keys = _keys(path / "transformer")
    # names a reader of the published diffusers transformer file lists (the FLUX.2 conversion's targets)
    for key in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight", "norm_out.linear.weight",
                "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight",
                "time_guidance_embed.timestep_embedder.linear_1.weight", "transformer_blocks.0.attn.to_add_out.weight",
                "transformer_blocks.0.ff.linear_in.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"):
        assert key in keys
    te_keys = _keys(path / "text_encoder")
    assert "model.embed_tokens.weight" in te_keys and "lm_head.weight" not in te_keys  # tied, causal-LM names
    with safe_open(str(path / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as st:
        assert st.get_slice("x_embedder.weight").get_dtype() == "BF16"


def test_flux2_pipelines_load_as_published_and_sample(replicas):
    from diffusers import Flux2KleinPipeline

    for name, distilled in (("FLUX.2-klein-base-4B", False), ("FLUX.2-klein-4B", True)):
        pipe = Flux2KleinPipeline.from_pretrained(replicas[name], dtype=torch.float32)
        assert pipe.config.is_distilled is distilled
    out = pipe(prompt="a red cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_zimage_pipelines_load_as_published_and_sample(replicas):
    from diffusers import ZImagePipeline
    from transformers import Qwen3Model

    for name, shift in (("Z-Image", 6.0), ("Z-Image-Turbo", 3.0)):
        pipe = ZImagePipeline.from_pretrained(replicas[name], dtype=torch.float32)
        assert isinstance(pipe.text_encoder, Qwen3Model) and pipe.scheduler.config.shift == shift
    out = pipe(prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
               max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_siglip_checkpoints_load_as_whole_models_with_their_processors(replicas):
    from transformers import AutoProcessor, Siglip2Model, SiglipModel

    image = Image.new("RGB", (96, 64), (200, 30, 30))
    for name, cls, tokens in (("siglip2-so400m-patch16-512", SiglipModel, 1024),
                              ("siglip2-so400m-patch16-naflex", Siglip2Model, 256)):
        model = cls.from_pretrained(replicas[name], use_safetensors=True)
        proc = AutoProcessor.from_pretrained(replicas[name])
        batch = proc(images=[image], text=["a red cat"], return_tensors="pt", padding="max_length", max_length=64)
        out = model(**batch)
        assert out.vision_model_output.last_hidden_state.shape[1] == tokens
        assert torch.isfinite(out.logits_per_image).all()


def test_siglip2_fixres_is_refused_by_the_naflex_class(replicas):
    """The issue's finding, on the replica: a FixRes checkpoint is not a Siglip2 (NaFlex) one."""
    from transformers import Siglip2VisionModel

    with pytest.raises(Exception):  # noqa: B017 - transformers raises a size-mismatch or config-type error
        Siglip2VisionModel.from_pretrained(replicas["siglip2-so400m-patch16-512"])


def test_open_clip_checkpoints_load_with_open_clip(replicas):
    import open_clip

    arch = register_open_clip_archs()
    for file, name in ((replicas["CLIP-ViT-H-14-laion2B-s32B-b79K"] / "open_clip_model.safetensors", "ViT-H-14"),
                       (replicas["HPSv2.1"] / "HPS_v2.1_compressed.pt", "ViT-H-14"),
                       (replicas["laion-aesthetic"] / "clip-vit-large-patch14/open_clip_model.safetensors",
                        "ViT-L-14-quickgelu")):
        model, _, preprocess = open_clip.create_model_and_transforms(arch[name], pretrained=str(file),
                                                                     weights_only=True)
        emb = model.encode_image(preprocess(Image.new("RGB", (64, 64))).unsqueeze(0))
        assert torch.isfinite(emb).all()
    hps = torch.load(replicas["HPSv2.1"] / "HPS_v2.1_compressed.pt", weights_only=True)
    assert set(hps) == {"state_dict"} and "visual.conv1.weight" in hps["state_dict"]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{replicas['CLIP-ViT-H-14-laion2B-s32B-b79K']}")
    assert model.visual.image_size == (224, 224)


def test_registering_the_open_clip_archs_leaves_no_folder_and_survives_a_rescan(tmp_path, monkeypatch):
    import tempfile

    import open_clip

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp / TemporaryDirectory put folders
    arch = register_open_clip_archs()
    register_open_clip_archs()
    assert list(tmp_path.iterdir()) == []  # one folder per call used to stay in /tmp for good
    open_clip.add_model_config(tmp_path)  # any later registration rescans every path added so far
    assert set(arch.values()) <= set(open_clip.list_models())


def test_pickscore_loads_with_clip_model_and_the_laion_processor(replicas):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(replicas["PickScore_v1"], use_safetensors=True)
    for proc_dir in (replicas["PickScore_v1"] / "processor", replicas["CLIP-ViT-H-14-laion2B-s32B-b79K"]):
        proc = CLIPProcessor.from_pretrained(proc_dir)
        batch = proc(images=[Image.new("RGB", (80, 60))], text=["a red cat"], return_tensors="pt", padding=True)
        assert batch["pixel_values"].shape[-2:] == (224, 224)
        assert torch.isfinite(model(**batch).logits_per_image).all()


def test_aesthetic_mlp_is_a_weights_only_pickle_of_the_published_shapes(replicas):
    sd = torch.load(replicas["laion-aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.2.weight": (128, 1024), "layers.4.weight": (64, 128),
                      "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}


class _Batch:
    def __init__(self):
        self.images = [Image.new("RGB", (64, 64), (30, 120, 200))]
        self.prompts, self.styles, self.reference_prompts, self.references = ["a cat"], ["flat"], [[]], []


def test_i2l_scorers_read_the_replicas(replicas):
    """Every Table-1 scorer reads its replica: CLIP from the open_clip files, the preference metrics from the
    DiffSynth-Studio/ImageMetrics folders through diffsynth.metrics."""
    from i2l.config import ScorerConfig
    from i2l.eval.metrics.clip import ClipScorer
    from i2l.eval.metrics.plugins import build_plugins

    metrics = replicas["DiffSynth-Studio-ImageMetrics"]
    sc = ScorerConfig(clip_model="ViT-H-14", clip_checkpoint=str(replicas["CLIP-ViT-H-14-laion2B-s32B-b79K"]),
                      device="cpu", aesthetic_path=str(metrics / "Aesthetic"), pickscore_path=str(metrics / "PickScore"),
                      imagereward_path=str(metrics / "ImageReward"), hpsv2_path=str(metrics / "HPSv2"),
                      hpsv3_path=str(metrics / "HPSv3"))
    for scorer in (ClipScorer(sc, "unused"), *build_plugins(sc)):
        assert scorer.available() == (True, ""), scorer.name
        scores = scorer.score(_Batch())
        assert all(v[0] is None or torch.isfinite(torch.tensor(v[0])) for v in scores.values())


@pytest.mark.parametrize("name", ["siglip2-so400m-patch16-512", "siglip2-so400m-patch16-naflex"])
def test_i2l_encoder_reads_the_siglip_replicas(replicas, name):
    from i2l.config import EncoderConfig
    from i2l.model.encoder import load_encoder

    enc = load_encoder(EncoderConfig(kind="siglip2", path=str(replicas[name]), image_size=512))
    tokens = enc(torch.zeros(1, 3, 64, 64))  # (1, P, D)
    assert tokens.shape[1] == enc.tokens_per_image and torch.isfinite(tokens).all()


@pytest.mark.parametrize("name,kind", [("FLUX.2-klein-base-4B", "flux2"), ("FLUX.2-klein-4B", "flux2"),
                                       ("Z-Image", "zimage")])
def test_i2l_backbone_loader_reads_the_pipeline_replicas(replicas, name, kind):
    from i2l.backbones.registry import backbone_loader
    from i2l.config import BackboneConfig

    backbone = backbone_loader(kind)(BackboneConfig(kind=kind, path=str(replicas[name]), dtype="float32"))
    assert backbone.distilled is bool(PUBLISHED[name]["configs"]["model_index.json"].get("is_distilled"))


def test_replicas_are_fast_and_deterministic(replicas, tmp_path):
    from safetensors.torch import load_file

    slow = {n: round(t, 1) for n, t in TIMES.items() if t > 10}
    assert not slow, f"replicas should take seconds: {slow}"
    again = write_replica("siglip2-so400m-patch16-naflex", tmp_path)
    a, b = load_file(again / "model.safetensors"), load_file(replicas["siglip2-so400m-patch16-naflex"] /
                                                              "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        write_replica("siglip2-so400m-patch16-naflex", tmp_path)


def test_module_entry_point_writes_named_replicas(tmp_path, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", ["i2l.replicas", str(tmp_path), "HPSv2.1"])
    with pytest.raises(SystemExit) as done:  # `python -m i2l.replicas OUT HPSv2.1`, in this process
        runpy.run_module("i2l.replicas", run_name="__main__")
    assert done.value.code == 0
    assert sorted(p.name for p in (tmp_path / "HPSv2.1").iterdir()) == ["HPS_v2.1_compressed.pt"]
