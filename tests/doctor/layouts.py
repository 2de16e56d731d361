"""Tiny checkpoints in the layouts their publishers use, saved with transformers' / diffusers' own
`save_pretrained` (no i2l code writes them): SigLIP FixRes and SigLIP2 NaFlex (whole image+text or vision-only),
FLUX.2-klein base and step-distilled pipelines, and a tiny open_clip scorer file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SIDE, TOKENS = 32, 16  # both encoders see 32 px as 4 x 4 patches of 8


def siglip_fixres(out: Path, whole: bool = True, seed: int = 0) -> Path:
    """FixRes SigLIP (`model_type: siglip`, as siglip2-so400m-patch16-512 is published): conv patches, 32 px."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    if whole:
        model = SiglipModel(SiglipConfig(vision_config={**VISION, "image_size": SIDE}, text_config=TEXT))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**VISION, image_size=SIDE))
    model.save_pretrained(out)
    return out


def siglip2_naflex(out: Path, whole: bool = True, seed: int = 0) -> Path:
    """NaFlex SigLIP2 (`model_type: siglip2`): linear patches, a patch budget of 16 in its preprocessor_config."""
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    torch.manual_seed(seed)
    if whole:
        model = Siglip2Model(Siglip2Config(vision_config={**VISION, "num_patches": TOKENS}, text_config=TEXT))
    else:
        model = Siglip2VisionModel(Siglip2VisionConfig(**VISION, num_patches=TOKENS))
    model.save_pretrained(out)
    Siglip2ImageProcessor(max_num_patches=TOKENS, patch_size=8).save_pretrained(out)
    return out


def flux2_klein(out: Path, distilled: bool, shard: str | None = None) -> Path:
    """A Flux2KleinPipeline directory (transformer, VAE, Qwen3 text encoder, tokenizer, scheduler) whose
    model_index.json records is_distilled as the pipeline registers it; `shard` = the transformer's max_shard_size."""
    from diffusers import Flux2KleinPipeline
    from tiny_models import tiny_flux2

    parts = tiny_flux2().pipe
    pipe = Flux2KleinPipeline(scheduler=parts.scheduler, vae=parts.vae, text_encoder=parts.text_encoder,
                              tokenizer=parts.tokenizer, transformer=parts.transformer, is_distilled=distilled)
    pipe.save_pretrained(out)
    if shard:
        for f in (out / "transformer").glob("*.safetensors*"):
            f.unlink()
        parts.transformer.save_pretrained(out / "transformer", max_shard_size=shard)
    return out


def tiny_open_clip(out: Path) -> tuple[str, Path]:
    """(model name, checkpoint file): a registered tiny open_clip architecture with random weights."""
    import open_clip
    from safetensors.torch import save_file

    from i2l.eval.metrics.clip import register_model_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (out / "doctor-tiny-clip.json").write_text(json.dumps(cfg))
    name = register_model_config(out / "doctor-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "clip.safetensors"))
    return name, out / "clip.safetensors"
