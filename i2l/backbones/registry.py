"""The one backbone registry: `backbone.kind` -> its adapter class and loader, as import paths resolved on use, so
`import i2l.backbones` loads no diffusers pipeline and no toy code (i2l.toy sits above this package)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from i2l.backbones.lora_naming import FLUX2_BFL_NAMES, LoRANaming

if TYPE_CHECKING:
    from i2l.backbones.base import Backbone
    from i2l.config import BackboneConfig


@dataclass(frozen=True)
class BackboneSpec:
    """Where one backbone kind lives, as "module:name" import paths."""

    backbone: str  # the Backbone subclass; its classmethods architecture(bc) and random(bc, seed) read no weights
    load: str  # load(BackboneConfig) -> Backbone with the weights of a local directory
    text_tokens: int = 0  # prompt length a benchmark feeds when the backbone has no text encoder (`random_cond`)
    pipeline: str = ""  # the diffusers pipeline class its directory's model_index.json names (`_class_name`)
    naming: LoRANaming = field(default_factory=LoRANaming)  # how its LoRA files name its layers, class not imported


BACKBONES: dict[str, BackboneSpec] = {
    "toy": BackboneSpec("i2l.toy.backbone:ToyBackbone", "i2l.toy.backbone:load_toy_backbone"),
    # FLUX.2-klein pads every prompt to 512 tokens
    "flux2": BackboneSpec("i2l.backbones.flux2:Flux2Backbone", "i2l.backbones.flux2:load_flux2_backbone",
                          text_tokens=512, pipeline="Flux2KleinPipeline",
                          naming=LoRANaming(file_names={"comfyui": FLUX2_BFL_NAMES})),  # DiffSynth: diffusers' names
    # Z-Image drops the padding, and a MegaStyle content prompt in its chat template is well under 64 tokens. No
    # renaming for any format: DiffSynth's ZImageDiT names its layers as diffusers does (tests/interop), and ComfyUI's
    # Z-Image loader reads `diffusion_model.<diffusers name>` itself, onto its fused attention.qkv / attention.out
    # (comfy/lora.py model_lora_keys_unet, Lumina2 branch: comfy/utils.py z_image_to_diffusers).
    "zimage": BackboneSpec("i2l.backbones.zimage:ZImageBackbone", "i2l.backbones.zimage:load_zimage_backbone",
                           text_tokens=64, pipeline="ZImagePipeline"),
    # HiDream-O1-Image: DiffSynth's model, no diffusers pipeline (no model_index.json); a prompt in its chat template.
    # Its default file has DiffSynth's keys (`<module>.lora_A.weight`, no prefix), which its GeneralLoRALoader and
    # LoRA.load both read; DiffSynth's class is the model, so its module names are i2l's in every format.
    "hidream_o1": BackboneSpec("i2l.backbones.hidream_o1:HiDreamO1Backbone",
                               "i2l.backbones.hidream_o1:load_hidream_o1_backbone", text_tokens=64,
                               naming=LoRANaming(lora_prefix="")),
}


def backbone_spec(kind: str) -> BackboneSpec:
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone kind {kind!r}: known kinds are {', '.join(BACKBONES)}")
    return BACKBONES[kind]


def kind_for_pipeline(class_name: str) -> str | None:
    """The backbone kind whose directories name this pipeline class in model_index.json (None: no kind does)."""
    return next((k for k, s in BACKBONES.items() if s.pipeline and s.pipeline == class_name), None)


def resolve(path: str):
    """The object an import path "module:name" names (its module is imported now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def lora_naming(kind: str) -> LoRANaming:
    """How `kind`'s LoRA files name its layers (what writing one needs), without importing its class."""
    return backbone_spec(kind).naming


def backbone_class(kind: str) -> type[Backbone]:
    return resolve(backbone_spec(kind).backbone)


def backbone_loader(kind: str) -> Callable[[BackboneConfig], Backbone]:
    load = resolve(backbone_spec(kind).load)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE"):
        # diffusers' bars ("Loading checkpoint shards") do not read the Hub's setting, which `--no-progress` sets
        from diffusers.utils import logging

        logging.disable_progress_bar()
    return load
