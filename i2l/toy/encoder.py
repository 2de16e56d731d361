"""The toy image encoder: a tiny SiglipVisionModel of the preset's size, with random weights until
`i2l pretrain-encoder` trains it on the toy world (sigmoid image <-> style-description loss)."""

from __future__ import annotations

import torch

from i2l.config import EncoderConfig
from i2l.model.encoder import ImageEncoder


def _toy_vision_config(cfg: EncoderConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 4, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch)


def new_toy_encoder(cfg: EncoderConfig, seed: int = 0) -> ImageEncoder:
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    return ImageEncoder(SiglipVisionModel(_toy_vision_config(cfg)), cfg, "toy-siglip")
