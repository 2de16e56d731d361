"""Tiny random backbones built from diffusers' own classes (toy, FLUX.2-klein, Z-Image), random LoRAs and
inputs for them, and sampling through the diffusers pipeline itself: the builders the backbone, LoRA and
generation tests share."""

from __future__ import annotations

import os

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
from i2l.backbones.flux2 import Flux2Backbone
from i2l.backbones.zimage import ZImageBackbone
from i2l.config import get_config
from i2l.model.lora import LoRA
from i2l.toy.backbone import new_toy_backbone

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


def partial(lora: LoRA, n: int) -> LoRA:
    """The same LoRA on its first n layers only (as a file that adapts fewer layers than i2l does)."""
    keep = lora.names[:n]
    return LoRA({k: lora.A[k] for k in keep}, {k: lora.B[k] for k in keep}, lora.backbone)
