"""Same-size models with random weights, for speed and memory benchmarks and for sizing (`i2l info`) where no
checkpoint may be read or downloaded. The real presets' architectures are the published ones (the values of
their config.json files); a local checkpoint directory, when a preset names one, decides instead.
Random weights say nothing about quality: speed, memory and shapes only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.config import BackboneConfig, Config, EncoderConfig

# FLUX.2-klein 4B transformer: hidden 3072 (24 heads × 128), 5 double-stream + 20 single-stream blocks, MLP ratio 3,
# text width 7680 = 3 stacked Qwen3-4B layers × 2560; no guidance embedding (klein is guidance-distilled away).
KLEIN4B_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000, "guidance_embeds": False,
}
# Z-Image 6B transformer: width 3840, 30 layers (+2 noise and 2 context refiners), 30 heads, Qwen3-4B text width.
ZIMAGE_TRANSFORMER = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560,
}
# SigLIP2 so400m vision tower (patch 16): width 1152, 27 layers, 16 heads.
SIGLIP2_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "patch_size": 16}
# Prompt tokens a benchmark feeds when the backbone has no text encoder: FLUX.2-klein pads every prompt to 512;
# Z-Image drops the padding, and a MegaStyle content prompt in its chat template is well under 64 tokens.
TEXT_TOKENS = {"flux2": 512, "zimage": 64}


def transformer_config(bc: BackboneConfig) -> dict:
    """The real backbone's transformer config: its local config.json if the preset names a directory, else the
    published architecture."""
    if bc.path:
        local = Path(bc.path, "transformer", "config.json")
        if not local.is_file():
            raise FileNotFoundError(f"{local} not found: backbone.path must be a diffusers pipeline directory "
                                    f"(or leave it empty for the published {bc.kind} architecture)")
        return json.loads(local.read_text())
    if bc.kind == "flux2":
        return dict(KLEIN4B_TRANSFORMER)
    if bc.kind == "zimage":
        return dict(ZIMAGE_TRANSFORMER)
    raise ValueError(f"no published architecture for backbone kind {bc.kind!r}")


def transformer_class(kind: str):
    import diffusers

    return getattr(diffusers, {"flux2": "Flux2Transformer2DModel", "zimage": "ZImageTransformer2DModel"}[kind])


def random_backbone(cfg: Config, device: str | torch.device = "cpu", seed: int = 0) -> Backbone:
    """A frozen backbone of the preset's architecture with random weights, in the preset's dtype on `device`."""
    bc = cfg.backbone
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a 4-6 B model is built in seconds on a GPU
        if bc.kind == "toy":
            from i2l.toy.backbone import build_vocab, new_toy_backbone

            bb = new_toy_backbone(bc, build_vocab(["one small circle at the top left"]), seed=seed)
        else:
            tr = transformer_class(bc.kind).from_config(transformer_config(bc))
            if bc.kind == "flux2":
                from i2l.backbones.flux2 import Flux2Backbone as cls
            else:
                from i2l.backbones.zimage import ZImageBackbone as cls
            bb = cls.from_components(tr, targets=tuple(bc.targets))
    return bb.to(device, getattr(torch, bc.dtype)).freeze()


def random_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu", seed: int = 0):
    """A frozen image encoder of the preset's architecture with random weights."""
    from i2l.model.encoder import ImageEncoder, new_toy_encoder

    with torch.device(device):
        if cfg.kind == "toy":
            return new_toy_encoder(cfg, seed=seed)
        torch.manual_seed(seed)
        if cfg.kind == "siglip2":
            from transformers import Siglip2VisionConfig, Siglip2VisionModel

            n = (cfg.image_size // SIGLIP2_SO400M["patch_size"]) ** 2
            model = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_SO400M, num_patches=n))
        else:
            from transformers import SiglipVisionConfig, SiglipVisionModel

            model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP2_SO400M, image_size=cfg.image_size))
        return ImageEncoder(model, cfg, f"random-{cfg.kind}")


def random_cond(backbone: Backbone, prompts: list[str], generator: torch.Generator | None = None) -> Cond:
    """Prompt conditioning for a benchmark: the backbone's own text encoder where it has one (toy), else random
    embeddings of the real text encoder's width and the pipeline's prompt length (text encoding is frozen and
    done once per prompt, so it is not part of any timed step)."""
    if getattr(backbone, "text_encoder", None) is not None:
        return backbone.encode_prompts(prompts)
    c = backbone.transformer.config  # a same-size random backbone has no text encoder
    width = c.joint_attention_dim if backbone.kind == "flux2" else c.cap_feat_dim
    emb = torch.randn(len(prompts), TEXT_TOKENS[backbone.kind], width, generator=generator)
    return Cond(emb.to(backbone.device, backbone.dtype))
