"""Same-size models with random weights, for speed and memory benchmarks and for sizing (`i2l info`) where no
checkpoint may be read or downloaded. Each backbone class builds its own (`random`, from `architecture`): the
real presets' published config.json values, or a local checkpoint directory's when a preset names one.
Random weights say nothing about quality: speed, memory and shapes only.
"""

from __future__ import annotations

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.backbones.registry import backbone_class, backbone_spec, resolve
from i2l.config import Config, EncoderConfig

# SigLIP2 so400m vision tower (patch 16): width 1152, 27 layers, 16 heads.
SIGLIP2_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "patch_size": 16}
# the toy encoder is toy code (i2l.toy sits above this package): named here and imported on use, as the registry
# names the toy backbone
TOY_ENCODER = "i2l.toy.encoder:new_toy_encoder"


def random_backbone(cfg: Config, device: str | torch.device = "cpu", seed: int = 0) -> Backbone:
    """A frozen backbone of the preset's architecture with random weights, in the preset's dtype on `device`."""
    bc = cfg.backbone
    with torch.device(device):  # initialise in place: a 4-6 B model is built in seconds on a GPU
        bb = backbone_class(bc.kind).random(bc, seed=seed)
    return bb.to(device, getattr(torch, bc.dtype)).freeze()


def random_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu", seed: int = 0):
    """A frozen image encoder of the preset's architecture with random weights."""
    from i2l.model.encoder import ImageEncoder

    with torch.device(device):
        if cfg.kind == "toy":
            return resolve(TOY_ENCODER)(cfg, seed=seed)
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
    # a same-size random backbone has no text encoder
    tokens = backbone_spec(backbone.kind).text_tokens
    if hasattr(backbone, "random_cond"):  # hidream_o1: its transformer embeds token ids itself
        return backbone.random_cond(len(prompts), tokens, generator)
    emb = torch.randn(len(prompts), tokens, backbone.text_width, generator=generator)
    return Cond(emb.to(backbone.device, backbone.dtype))
