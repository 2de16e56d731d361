"""Model sizes for `i2l info`: the backbone's adapted layers, the encoder and the predictor (queries, params).
Real presets are sized from the diffusers configs in their local directories, or from the published
architectures when none is set (no weights are read)."""

from __future__ import annotations

import json
from pathlib import Path

from i2l.config import Config


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_targets(cfg: Config) -> tuple[dict[str, tuple[int, int]], int, str]:
    """Adapted layers from a backbone config, built on the meta device (no memory, no weights)."""
    import torch

    from i2l.backbones.base import Backbone
    from i2l.backbones.registry import backbone_class

    bc = cfg.backbone
    cls = backbone_class(bc.kind)
    with torch.device("meta"):  # the local config.json if the preset names a directory, else the published one
        arch = cls.architecture(bc)
        # a backbone on a non-diffusers model (hidream_o1: DiffSynth's) builds it itself
        build = getattr(cls, "build_transformer", None)
        tr = build(arch) if build is not None else cls.transformer_class.from_config(arch)
    probe = Backbone(bc.targets)
    probe.transformer = tr
    return probe.lora_targets(), param_count(tr), type(tr).__name__


def describe(cfg: Config) -> list[str]:
    import torch

    from i2l.model.predictor import I2LPredictor

    lines = []
    try:
        targets, n_bb, name = _meta_targets(cfg)
    except FileNotFoundError as e:
        return [f"backbone: {e}"]
    lines.append(f"backbone: {name}, {n_bb / 1e6:.2f} M params; {len(targets)} adapted linear layers "
                 f"(targets {', '.join(cfg.backbone.targets)})")
    from i2l.backbones.random_init import SIGLIP2_SO400M

    token_dim = cfg.encoder.hidden if cfg.encoder.kind == "toy" else SIGLIP2_SO400M["hidden_size"]
    enc_cfg = Path(cfg.encoder.path, "config.json")
    if enc_cfg.is_file():
        token_dim = json.loads(enc_cfg.read_text()).get("hidden_size", token_dim)
    with torch.device("meta"):
        pred = I2LPredictor(cfg.predictor, targets, token_dim)
    lora_params = sum(cfg.predictor.rank * (i + o) for i, o in targets.values())
    lines.append(f"predictor: {param_count(pred) / 1e6:.2f} M params; {pred.num_queries} LoRA queries "
                 f"(2 x rank {cfg.predictor.rank} x {len(targets)} layers); hidden {cfg.predictor.hidden}, "
                 f"depth {cfg.predictor.depth}, compressed width {cfg.predictor.compress}")
    lines.append(f"predicted LoRA: {lora_params / 1e6:.3f} M numbers per style")
    lines.append(f"encoder: {cfg.encoder.kind} at {cfg.encoder.path or '(unset)'}, token width {token_dim}")
    return lines
