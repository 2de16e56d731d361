"""The toy backbone: pretraining lowers the loss and the saved diffusers layout reloads to identical outputs."""

import torch
from diffusers import Flux2Transformer2DModel

from i2l.backbones.pretrain import pretrain_backbone
from i2l.backbones.toy import build_vocab, load_toy_backbone, new_toy_backbone
from i2l.config import get_config


def test_pretraining_loss_falls(debug_run, tmp_path):
    cfg = get_config("debug", {"train.backbone_steps": 60, "train.backbone_lr": 3e-3})
    info = pretrain_backbone(cfg, debug_run.prepared_dir, tmp_path / "bb", progress=False)
    assert info["steps"] == 60 and info["last_loss"] < 0.8 * info["first_loss"], info


def test_save_then_load_reproduces_outputs_exactly(tmp_path):
    cfg = get_config("debug")
    bb = new_toy_backbone(cfg.backbone, build_vocab(["one small circle at the top left"]), seed=3).freeze()
    bb.save(tmp_path / "bb")
    Flux2Transformer2DModel.from_pretrained(tmp_path / "bb" / "transformer")  # diffusers' own layout
    cfg.backbone.path = str(tmp_path / "bb")
    again = load_toy_backbone(cfg.backbone).freeze()
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        a = bb.velocity(x, t, bb.encode_prompts(["one small circle at the top left", ""]))
        b = again.velocity(x, t, again.encode_prompts(["one small circle at the top left", ""]))
    assert torch.equal(a, b)
    assert again.backbone_id == bb.backbone_id
