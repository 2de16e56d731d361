"""Backbone adapters (toy, FLUX.2-klein, Z-Image) on tiny random diffusers models: per-sample LoRAs in one batch,
exact no-LoRA behaviour, gradients, LoRA targets, and agreement with the diffusers pipelines' own sampling.

The tiny builders here are imported by test_lora_diffusers.py and test_lora.py.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from tiny_models import (
    BUILDERS,
    IMAGE,
    PROMPTS,
    inputs,
    pipeline_images,
    random_lora,
    tiny_flux2,
    tiny_toy,
    tiny_zimage,
)

from i2l.backbones.base import Backbone, Cond
from i2l.backbones.flux2 import load_flux2_backbone
from i2l.backbones.schedule import timestep_schedule
from i2l.backbones.zimage import load_zimage_backbone
from i2l.config import FLUX2_TARGETS, ZIMAGE_TARGETS, BackboneConfig
from i2l.infer.guidance import sample
from i2l.model.flow_matching import fm_loss


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request) -> tuple[str, Backbone]:
    return request.param, BUILDERS[request.param]()


# ---------- every adapter ----------
def test_no_lora_is_bit_identical(case):
    name, bb = case
    fresh = BUILDERS[name]()  # never had hooks installed
    x, t, cond = inputs(bb, 3)
    with torch.no_grad():
        base = fresh.velocity(x, t, cond)
        _ = bb.lora_adapter  # hooks installed, nothing active
        v_none = bb.velocity(x, t, cond)
        v_lora = bb.velocity(x, t, cond, random_lora(bb, 3))
        v_after = bb.velocity(x, t, cond)  # the LoRA must be gone after its block
    assert torch.equal(base, v_none) and torch.equal(base, v_after)
    assert not torch.allclose(base, v_lora, atol=1e-4), "a non-zero LoRA must change the velocity"


def test_repeated_prompts_are_encoded_once_and_equal_the_whole_batch(case, monkeypatch):
    name, bb = case
    asked, encode = [], bb._encode_prompts
    monkeypatch.setattr(bb, "_encode_prompts", lambda ps: (asked.append(list(ps)), encode(ps))[1])
    # prompts of different lengths (Z-Image pads them into one batch with a mask), the negative repeated
    prompts = [PROMPTS[1], "", PROMPTS[0], "", PROMPTS[1], ""]
    got = bb.encode_prompts(prompts)
    assert asked == [[PROMPTS[1], "", PROMPTS[0]]]
    whole = encode(prompts)
    assert torch.equal(got.embeds, whole.embeds)
    assert (got.mask is None) == (whole.mask is None) and (got.mask is None or torch.equal(got.mask, whole.mask))
    if name == "toy":  # a text encoder being trained (the toy's pretraining) sees every row
        asked.clear()
        bb.text_encoder.requires_grad_(True)
        try:
            bb.encode_prompts(prompts)
        finally:
            bb.text_encoder.requires_grad_(False)
        assert asked == [prompts]


def test_per_sample_loras_match_one_at_a_time(case):
    _, bb = case
    x, t, cond = inputs(bb, 3)
    lora = random_lora(bb, 3)
    with torch.no_grad():
        batched = bb.velocity(x, t, cond, lora)  # (3, *latent)
        alone = torch.cat([bb.velocity(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1)), lora[i])
                           for i in range(3)])
        shared = bb.velocity(x, t, cond, lora[0])
        shared_alone = bb.velocity(x[1:2], t[1:2], cond.index(slice(1, 2)), lora[0])
    assert (batched - alone).abs().max() < 1e-5
    assert (shared[1:2] - shared_alone).abs().max() < 1e-5
    assert not torch.allclose(batched[1], shared[1], atol=1e-4), "samples must see their own LoRA"


def test_gradients_reach_every_lora_matrix(case):
    _, bb = case
    lora = random_lora(bb, 2)
    for d in (lora.A, lora.B):
        for v in d.values():
            v.requires_grad_(True)
    x1 = torch.randn(2, *bb.latent_shape(IMAGE))
    loss = fm_loss(bb, x1, bb.encode_prompts(PROMPTS[:2]), lora, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for d in (lora.A, lora.B):
        for k, v in d.items():
            assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k
    assert all(p.grad is None for p in bb.transformer.parameters()), "the backbone stays frozen"


def test_lora_targets_are_the_named_linears(case):
    name, bb = case
    targets = bb.lora_targets()
    n_blocks = {"toy": (1, 1), "flux2": (1, 2), "zimage": None}[name]
    expected = 12 * n_blocks[0] + 2 * n_blocks[1] if n_blocks else 7 * (2 + 1 + 1)  # layers + both refiners
    assert len(targets) == expected
    for k, (i, o) in targets.items():
        m = bb.transformer.get_submodule(k)
        assert (m.in_features, m.out_features) == (i, o)
    if name == "zimage":
        assert {"layers.1.feed_forward.w2", "noise_refiner.0.attention.to_out.0",
                "context_refiner.0.attention.to_q"} <= set(targets)
    else:  # to_out is a ModuleList in double blocks, a Linear in single blocks
        assert {"transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_out",
                "single_transformer_blocks.0.attn.to_qkv_mlp_proj"} <= set(targets)


def test_adapters_need_no_vae_or_text_encoder_for_velocity():
    for bb in (tiny_flux2(parts=False), tiny_zimage(parts=False)):
        D = 48 if bb.kind == "flux2" else 32
        cond = Cond(torch.randn(2, 5, D))
        lora = random_lora(bb, 2)
        v = bb.velocity(torch.randn(2, *bb.latent_shape(IMAGE)), torch.rand(2), cond, lora)
        assert v.shape == (2, *bb.latent_shape(IMAGE)) and torch.isfinite(v).all()
        with pytest.raises(ValueError, match="no VAE"):
            bb.encode_images(torch.zeros(1, 3, IMAGE, IMAGE))
        with pytest.raises(ValueError, match="no text encoder"):
            bb.encode_prompts(["a cat"])


@pytest.mark.parametrize("name", ["flux2", "zimage"])
def test_sampling_matches_the_diffusers_pipeline(name):
    """Same time/sign convention and latent (un)packing as the pipeline: equal images after 3 Euler steps."""
    bb = BUILDERS[name]()
    cond = bb.encode_prompts(PROMPTS[:2])
    x0 = torch.randn(2, *bb.latent_shape(IMAGE), generator=torch.Generator().manual_seed(3))
    theirs, ours = pipeline_images(bb, bb, x0, cond, steps=3)
    assert theirs.shape == ours.shape == (2, 3, IMAGE, IMAGE)
    assert (theirs - ours).abs().max() < 1e-4
    # i2l's own sampler, on the grid it picks by itself, gives the pipeline's images too
    mine = bb.decode_latents(sample(bb, cond, steps=3, noise=x0))
    assert (theirs - mine).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["flux2", "zimage"])
@pytest.mark.parametrize("steps", [4, 28])
def test_sampling_schedule_is_the_pipelines_own(name, steps):
    """The t grid (0 = noise) equals 1 - the sigmas the pipeline's __call__ sets, which its shifted scheduler
    spaces unevenly: a uniform grid would not pass."""
    bb = BUILDERS[name]()
    cond = bb.encode_prompts(PROMPTS[:1])
    x0 = torch.randn(1, *bb.latent_shape(IMAGE), generator=torch.Generator().manual_seed(0))
    pipeline_images(bb, bb, x0, cond, steps=steps)  # runs the pipeline: its scheduler now holds its sigmas
    theirs = 1.0 - bb.pipe.scheduler.sigmas
    ours = bb.sampling_schedule(steps, tuple(x0.shape[1:]))
    assert ours.shape == (steps + 1,) and ours[0] < 0.01 and ours[-1] == 1.0
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, torch.linspace(0, 1, steps + 1), atol=1e-3)


def test_toy_backbone_samples_on_the_uniform_grid():
    assert torch.equal(tiny_toy().sampling_schedule(5, (3, 8, 8)), timestep_schedule(5))


@pytest.mark.parametrize("name", ["flux2", "zimage"])
def test_prompt_and_image_encoding(name):
    bb = BUILDERS[name]()
    cond = bb.encode_prompts(PROMPTS)
    assert len(cond) == 3 and cond.embeds.shape[-1] == (48 if name == "flux2" else 32)
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])
    if name == "zimage":  # unpadded caption lengths differ, kept by the mask
        lengths = cond.mask.sum(1).tolist()
        assert len(set(lengths)) > 1
        direct = bb.pipe._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=16)
        assert all(torch.equal(d, e[m]) for d, e, m in zip(direct, cond.embeds, cond.mask))
    images = torch.rand(2, 3, IMAGE, IMAGE) * 2 - 1
    x1 = bb.encode_images(images)
    assert x1.shape == (2, *bb.latent_shape(IMAGE))
    back = bb.decode_latents(x1)
    assert back.shape == images.shape and back.abs().max() <= 1


def test_load_from_a_local_pipeline_directory(tmp_path):
    for bb, load, targets in ((tiny_flux2(), load_flux2_backbone, FLUX2_TARGETS),
                              (tiny_zimage(), load_zimage_backbone, ZIMAGE_TARGETS)):
        out = tmp_path / bb.kind
        bb.pipe.save_pretrained(out, safe_serialization=True)
        # the tiny text encoder has 3 layers, not the real 36
        bcfg = BackboneConfig(kind=bb.kind, path=str(out), targets=targets, max_sequence_length=16,
                              text_encoder_layers=(1, 2, 3) if bb.kind == "flux2" else ())
        loaded = load(bcfg)
        assert loaded.backbone_id == bb.backbone_id
        x, t, cond = inputs(bb, 2)
        with torch.no_grad():
            assert torch.equal(loaded.velocity(x, t, loaded.encode_prompts(PROMPTS[:2])), bb.velocity(x, t, cond))
        with pytest.raises(FileNotFoundError, match="model_index.json"):
            load(BackboneConfig(kind=bb.kind, path=str(tmp_path / "missing")))


@pytest.mark.parametrize("name", ["flux2", "zimage"])
def test_a_bf16_backbone_samples_on_an_fp32_state(name):
    """bf16 weights, as the real presets run: the Euler state and t stay fp32 (as ZImagePipeline keeps its latents),
    so 28 steps land near the fp32 result. Rounding the state to bf16 after every step drifted ~8x further
    (mean relative error 0.012 vs 0.0015 on these tiny models)."""
    ref, low = BUILDERS[name](), BUILDERS[name]().to(dtype=torch.bfloat16)
    cond = ref.encode_prompts(PROMPTS[:2])
    low_cond = Cond(cond.embeds.to(torch.bfloat16), cond.mask)
    x0 = torch.randn(2, *ref.latent_shape(IMAGE), generator=torch.Generator().manual_seed(5))
    gold = sample(ref, cond, steps=28, noise=x0)
    got = sample(low, low_cond, steps=28, noise=x0.to(torch.bfloat16))  # even from bf16 noise
    assert got.dtype == torch.float32
    rel = ((got - gold).abs().mean() / gold.abs().mean()).item()
    assert rel < 0.005, rel
