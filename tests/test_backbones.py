"""Backbone adapters (toy, FLUX.2-klein, Z-Image) on tiny random diffusers models: per-sample LoRAs in one batch,
exact no-LoRA behaviour, gradients, LoRA targets, and agreement with the diffusers pipelines' own sampling.

The tiny builders here are imported by test_lora_diffusers.py and test_lora.py.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from i2l.backbones.base import Backbone, Cond
from i2l.backbones.flux2 import Flux2Backbone, load_flux2_backbone
from i2l.backbones.toy import new_toy_backbone
from i2l.backbones.zimage import ZImageBackbone, load_zimage_backbone
from i2l.config import FLUX2_TARGETS, ZIMAGE_TARGETS, BackboneConfig, get_config
from i2l.flow_matching import fm_loss, sample, timestep_schedule
from i2l.lora import LoRA

IMAGE = 32  # pixels; the tiny VAEs downsample by 2
PROMPTS = ["a red cat", "a blue dog in the garden", "the green house"]
WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "the", "in", "red", "blue",
         "green", "cat", "dog", "house", "garden"]
CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


# ---------- tiny components (same diffusers/transformers classes as the real checkpoints) ----------
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, built offline."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", chat_template=CHAT)


def tiny_vae(kind: type, latent_channels: int, **kw):
    return kind(block_out_channels=(32, 32), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **kw)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Resolution-dependent shifting as the FLUX checkpoints' scheduler_config.json sets it."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def zimage_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A static shift of 3, as Z-Image's scheduler_config.json sets it."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_flux2(seed: int = 0, parts: bool = True) -> Flux2Backbone:
    """~0.3 M-param Flux2 transformer (NOTES.md), + tiny VAE (8 latent ch) and 3-layer Qwen3 if `parts`."""
    torch.manual_seed(seed)
    tr = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2,
                                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                                 timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8),
                                 guidance_embeds=False)
    if not parts:
        return Flux2Backbone.from_components(tr, scheduler=flux_scheduler()).freeze()
    vae = tiny_vae(AutoencoderKLFlux2, 8)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that their use is checked
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    return Flux2Backbone.from_components(tr, vae, te, tiny_tokenizer(), scheduler=flux_scheduler(),
                                         text_encoder_out_layers=(1, 2, 3), max_sequence_length=16).freeze()


def tiny_zimage(seed: int = 0, parts: bool = True) -> ZImageBackbone:
    """Tiny Z-Image transformer (NOTES.md), + tiny VAE (16 latent ch) and 2-layer Qwen3 if `parts`."""
    torch.manual_seed(seed)
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
                                  axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
    if not parts:
        return ZImageBackbone.from_components(tr, scheduler=zimage_scheduler()).freeze()
    vae = tiny_vae(AutoencoderKL, 16, shift_factor=0.1, scaling_factor=0.5)
    te = Qwen3Model(Qwen3Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    return ZImageBackbone.from_components(tr, vae, te, tiny_tokenizer(), scheduler=zimage_scheduler(),
                                          max_sequence_length=16).freeze()


def tiny_toy(seed: int = 0) -> Backbone:
    cfg = get_config("debug")
    return new_toy_backbone(cfg.backbone, ["<pad>", "<unk>", *sorted({w for p in PROMPTS for w in p.split()})],
                            seed=seed).freeze()


BUILDERS = {"toy": tiny_toy, "flux2": tiny_flux2, "zimage": tiny_zimage}


def random_lora(backbone: Backbone, n: int | None, rank: int = 2, scale: float = 0.05, seed: int = 1) -> LoRA:
    """Random (non-zero) LoRA(s) for every target: batched [n, ...] if n else unbatched."""
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if n else ()
    A = {k: torch.randn(*lead, rank, i, generator=g) * scale for k, (i, o) in backbone.lora_targets().items()}
    B = {k: torch.randn(*lead, o, rank, generator=g) * scale for k, (i, o) in backbone.lora_targets().items()}
    return LoRA(A, B, backbone.backbone_id)


def inputs(backbone: Backbone, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *backbone.latent_shape(IMAGE), generator=g)
    t = torch.rand(n, generator=g)
    return x, t, backbone.encode_prompts(PROMPTS[:n])


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


# ---------- against the diffusers pipelines ----------
def pipeline_images(client: Backbone, ours: Backbone, x0: torch.Tensor, cond: Cond, steps: int,
                    lora: LoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from noise x0 with the diffusers pipeline's own __call__ (on `client`, with whatever LoRA adapters
    diffusers loaded into it) and with i2l's velocity (on `ours`, with `lora`) on the pipeline's sigmas."""
    pipe = client.pipe
    pipe.set_progress_bar_config(disable=True)
    if client.kind == "flux2":
        out = pipe(prompt_embeds=cond.embeds, latents=x0, height=IMAGE, width=IMAGE, guidance_scale=1.0,
                   num_inference_steps=steps, output_type="pt").images
    else:  # Z-Image's guidance_scale 0 = no CFG; prompt_embeds is the list of unpadded caption features
        caps = list(cond.embeds) if cond.mask is None else [e[m] for e, m in zip(cond.embeds, cond.mask)]
        out = pipe(prompt_embeds=caps, latents=x0, height=IMAGE, width=IMAGE, guidance_scale=0.0,
                   num_inference_steps=steps, output_type="pt").images
    ts = 1.0 - pipe.scheduler.sigmas  # t = 1 - sigma, from 0 (noise) to 1 (data)
    x = x0
    with torch.no_grad():
        for k in range(steps):
            x = x + (ts[k + 1] - ts[k]) * ours.velocity(x, ts[k].expand(len(x)), cond, lora)
        mine = ours.decode_latents(x)
    return out * 2 - 1, mine  # both in [-1, 1]


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
