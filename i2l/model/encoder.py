"""The frozen SigLIP-class image encoder (paper §3.1): references -> patch-level tokens (not the pooled vector).

Real weights: a local `siglip2-*` (Siglip2VisionModel) or `siglip-*` (SiglipVisionModel) directory. Toy: a tiny
SiglipVisionModel built in i2l.toy.encoder and trained by i2l on the toy world, loaded from its directory the same way.
Shapes: B batch, N references, P patches per image, D encoder width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from i2l.config import EncoderConfig


class ImageEncoder(nn.Module):
    """Frozen vision tower returning patch tokens (B, P, D) for images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, model: nn.Module, cfg: EncoderConfig, encoder_id: str):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.encoder_id = encoder_id
        self.siglip2 = type(model).__name__.startswith("Siglip2")
        self.dim = model.config.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never in training mode (no dropout drift)

    @property
    def tokens_per_image(self) -> int:
        return (self.cfg.image_size // self.model.config.patch_size) ** 2

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if images.shape[-1] != s or images.shape[-2] != s:
            images = nn.functional.interpolate(images, size=(s, s), mode="bilinear", antialias=True,
                                               align_corners=False)
        return images  # SigLIP normalises with mean = std = 0.5, i.e. exactly [-1, 1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._resize(images.to(self.device, self.dtype))  # (B, 3, S, S)
        if not self.siglip2:
            return self.model(pixel_values=x).last_hidden_state  # (B, P, D)
        # Siglip2 takes pre-patchified pixels: (B, P, p·p·3) in (row, col, channel) order + mask + grid shape
        p = self.model.config.patch_size
        B, C, H, W = x.shape
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        mask = torch.ones(B, patches.shape[1], dtype=torch.long, device=x.device)
        shapes = torch.tensor([[H // p, W // p]] * B, device=x.device)
        out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.last_hidden_state  # (B, P, D)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def encode_refs(self, refs: torch.Tensor, n_refs: torch.Tensor):
        """refs (B, N, 3, H, W) padded, n_refs (B,) -> tokens (B, N·P, D), keep-mask (B, N·P), ref index (B, N·P)."""
        B, N = refs.shape[:2]
        tok = self.forward(refs.flatten(0, 1))  # (B·N, P, D)
        P = tok.shape[1]
        tok = tok.reshape(B, N * P, -1)  # (B, N·P, D)
        ref_index = torch.arange(N, device=tok.device).repeat_interleave(P).expand(B, -1)  # (B, N·P)
        keep = ref_index < n_refs.to(tok.device)[:, None]  # (B, N·P): padding references are masked out
        return tok, keep, ref_index


def load_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """Load the frozen encoder from a local directory (no hub, no remote code)."""
    path = Path(cfg.path)
    if not path.is_dir():
        hint = "run `i2l pretrain-encoder --preset toy` (or `make run`)" if cfg.kind == "toy" else \
            "point encoder.path (or I2L_SIGLIP2_DIR) at a local siglip2 directory"
        raise FileNotFoundError(f"no image encoder at {path!r}: {hint}")
    if cfg.kind == "siglip2":
        from transformers import Siglip2VisionModel as cls
    else:
        from transformers import SiglipVisionModel as cls
    model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    meta = path / "encoder.json"
    if meta.is_file():
        cfg.image_size = json.loads(meta.read_text()).get("image_size", cfg.image_size)
    enc_id = f"{cfg.kind}:{path.name}" if cfg.kind != "toy" else "toy-siglip"
    return ImageEncoder(model, cfg, enc_id)
