"""Backbone adapters: `load_backbone(cfg)` returns the frozen backbone named by `cfg.backbone.kind`."""

from __future__ import annotations

from pathlib import Path

from i2l.backbones.base import Backbone, Cond
from i2l.config import Config

__all__ = ["Backbone", "Cond", "default_paths", "load_backbone"]


def default_paths(cfg: Config) -> Config:
    """Fill empty toy-world paths with their places under the data root (real presets must name theirs)."""
    toy = Path(cfg.data_root) / "toy" / cfg.name
    if cfg.backbone.kind == "toy" and not cfg.backbone.path:
        cfg.backbone.path = str(toy / "backbone")
    if cfg.encoder.kind == "toy" and not cfg.encoder.path:
        cfg.encoder.path = str(toy / "encoder")
    if not cfg.scorer.clip_checkpoint:
        cfg.scorer.clip_checkpoint = str(toy / "scorer")
    return cfg


def load_backbone(cfg: Config) -> Backbone:
    """Load and freeze the backbone from its local directory (nothing is downloaded)."""
    default_paths(cfg)
    kind = cfg.backbone.kind
    if kind == "toy":
        from i2l.toy.backbone import load_toy_backbone as load
    elif kind == "flux2":
        from i2l.backbones.flux2 import load_flux2_backbone as load
    elif kind == "zimage":
        from i2l.backbones.zimage import load_zimage_backbone as load
    else:
        raise ValueError(f"unknown backbone kind {kind!r}")
    return load(cfg.backbone).freeze()
