"""The one backbone registry: every kind the config accepts resolves to its adapter class and loader, an unknown
kind names the known ones, and importing i2l.backbones loads neither a diffusers pipeline, diffsynth nor toy code."""

import subprocess
import sys

import pytest

from i2l.backbones import BACKBONES, load_backbone
from i2l.backbones.base import Backbone
from i2l.backbones.registry import backbone_class, backbone_loader, backbone_spec, lora_naming
from i2l.config import get_config


@pytest.mark.parametrize("kind", ["toy", "flux2", "zimage", "hidream_o1"])
def test_every_kind_resolves_to_its_adapter_and_loader(kind):
    cls = backbone_class(kind)
    assert issubclass(cls, Backbone) and cls.kind == kind
    assert callable(backbone_loader(kind)) and callable(cls.architecture) and callable(cls.random)


@pytest.mark.parametrize("kind", ["toy", "flux2", "zimage", "hidream_o1"])
def test_each_class_names_its_lora_files_as_the_registry_says(kind):
    """Writers that do not import the class (produce actors, `i2l predict`) read the registry: the class agrees."""
    cls, naming = backbone_class(kind), lora_naming(kind)
    assert cls.lora_prefix == naming.lora_prefix
    for fmt in ("diffusers", "diffsynth", "comfyui"):
        assert cls.lora_names(fmt) == naming.lora_names(fmt)
    assert bool(naming.lora_names("comfyui")) == (kind == "flux2")  # ComfyUI renames FLUX.2's layers (BFL names)
    assert naming.lora_prefix == ("" if kind == "hidream_o1" else "transformer")
    with pytest.raises(ValueError, match="unknown LoRA file format"):
        naming.lora_names("kohya")


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown backbone kind 'sd3': known kinds are toy, flux2, zimage, hidream_o1"):
        backbone_spec("sd3")
    cfg = get_config("debug")
    cfg.backbone.kind = "sd3"  # past the config's own check, as a hand-edited checkpoint config would be
    cfg.backbone.path = "anywhere"
    with pytest.raises(ValueError, match="known kinds are"):
        load_backbone(cfg)
    assert set(BACKBONES) == {"toy", "flux2", "zimage", "hidream_o1"}


def test_importing_the_package_loads_no_pipeline_no_diffsynth_and_no_toy_code():
    code = ("import sys, i2l.backbones; "
            "print(sorted(m for m in sys.modules if m.startswith(('diffusers', 'diffsynth', 'i2l.toy', "
            "'i2l.backbones.flux2', 'i2l.backbones.zimage', 'i2l.backbones.hidream_o1'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
