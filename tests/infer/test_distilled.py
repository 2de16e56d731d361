"""A step-distilled backbone (FLUX.2-klein-4B, model_index.json is_distilled: true) is sampled as its own pipeline
samples it: one branch, no CFG, whatever guidance is asked, with a warning naming the base model; the base model
keeps asymmetric guidance."""

import logging
from pathlib import Path

import torch
from PIL import Image

from i2l.backbones.registry import backbone_loader
from i2l.config import get_config
from i2l.infer.api import I2L
from i2l.model.predictor import I2LPredictor
from i2l.toy.encoder import new_toy_encoder


def _pipeline_dir(root: Path, distilled: bool) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "doctor"))
    from layouts import flux2_klein  # tiny checkpoints saved by diffusers' own save_pretrained

    return flux2_klein(root / ("FLUX.2-klein-4B" if distilled else "FLUX.2-klein-base-4B"), distilled=distilled)


def _model(root: Path, distilled: bool) -> I2L:
    cfg = get_config("klein4b")
    cfg.backbone.path = str(_pipeline_dir(root, distilled))
    cfg.backbone.image_size = 32  # the preset's 1024 px on a tiny transformer: minutes of CPU for nothing
    cfg.backbone.targets, cfg.backbone.text_encoder_layers, cfg.backbone.max_sequence_length = (), (1, 2, 3), 16
    bb = backbone_loader("flux2")(cfg.backbone).freeze()
    dbg = get_config("debug")
    enc = new_toy_encoder(dbg.encoder)
    cfg.encoder = dbg.encoder
    torch.manual_seed(0)
    pred = I2LPredictor(dbg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.1)  # a LoRA that is not zero, so the gray negative differs from the positive
    return I2L(cfg, bb, enc, pred)


def _images(model: I2L, guidance: float) -> torch.Tensor:
    lora = model.predict_lora([Image.new("RGB", (32, 32), c) for c in ("red", "navy")])
    out = model.generate(["a cat"], lora, guidance=guidance, steps=2, seed=0)
    return torch.tensor([list(im.getdata()) for im in out], dtype=torch.float32)


def test_a_distilled_backbone_samples_without_cfg_and_says_why(tmp_path, caplog):
    model = _model(tmp_path, distilled=True)
    assert model.backbone.distilled
    with caplog.at_level(logging.WARNING, logger="i2l"):
        guided = _images(model, 4.0)
    assert torch.equal(guided, _images(model, 1.0))  # guidance ignored: one branch
    assert any("is_distilled" in r.message and "FLUX.2-klein-base-4B" in r.message for r in caplog.records)


def test_the_base_backbone_keeps_asymmetric_guidance(tmp_path):
    model = _model(tmp_path, distilled=False)
    assert not model.backbone.distilled
    assert model.backbone.sampling_guidance(4.0) == 4.0
    assert not torch.equal(_images(model, 4.0), _images(model, 1.0))
