"""Backbone adapters: `load_backbone(cfg)` returns the frozen backbone named by `cfg.backbone.kind`."""

from __future__ import annotations

from i2l.backbones.base import Backbone, Cond
from i2l.config import Config
from i2l.layout import require_paths

__all__ = ["Backbone", "Cond", "load_backbone"]


def load_backbone(cfg: Config) -> Backbone:
    """Load and freeze the backbone from its local directory (nothing is downloaded)."""
    require_paths(cfg, "backbone.path")  # a toy backbone's place is resolved at the entry points, not here
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
