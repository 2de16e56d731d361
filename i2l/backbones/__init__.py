"""Backbone adapters: `load_backbone(cfg)` returns the frozen backbone named by `cfg.backbone.kind`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from i2l.backbones.registry import BACKBONES, backbone_loader
from i2l.config import Config
from i2l.layout import require_paths

if TYPE_CHECKING:
    from i2l.backbones.base import Backbone, Cond

__all__ = ["BACKBONES", "Backbone", "Cond", "load_backbone"]


def load_backbone(cfg: Config) -> Backbone:
    """Load and freeze the backbone from its local directory (nothing is downloaded)."""
    require_paths(cfg, "backbone.path")  # a toy backbone's place is resolved at the entry points, not here
    return backbone_loader(cfg.backbone.kind)(cfg.backbone).freeze()


def __getattr__(name: str):
    # Backbone and Cond import torch: only when asked for, so that the registry (`i2l.backbones.registry`, which the
    # doctor reads in the flow process) comes without it (flows/__init__)
    if name in ("Backbone", "Cond"):
        from i2l.backbones import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
