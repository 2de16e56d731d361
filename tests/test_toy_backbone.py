"""The toy backbone: pretraining lowers the loss, the saved diffusers layout reloads to identical outputs, and a
pretrained model puts the prompted shape where the prompt says."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from i2l.backbones.pretrain import pretrain_backbone
from i2l.backbones.toy import build_vocab, load_toy_backbone, new_toy_backbone
from i2l.config import get_config
from i2l.flow_matching import sample


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


@pytest.mark.slow
def test_pretrained_backbone_draws_the_prompted_position(tmp_path):
    """Foreground lands in the prompted quadrant: samples differ most from their background where the shape is."""
    from i2l.config import ToyWorldConfig
    from i2l.toyworld import write_toyworld

    cfg = get_config("debug", {"train.backbone_steps": 300, "train.backbone_lr": 3e-3,
                               "train.backbone_batch_size": 32})
    write_toyworld(ToyWorldConfig(styles=40, seed=0, size=32, rows_per_shard=400), tmp_path / "tw", progress=False)
    pretrain_backbone(cfg, tmp_path / "tw", tmp_path / "bb", progress=False)
    cfg.backbone.path = str(tmp_path / "bb")
    bb = load_toy_backbone(cfg.backbone).freeze()
    n = 8
    prompts = {"tl": "one large square at the top left", "br": "one large square at the bottom right"}
    energy = {}
    for key, p in prompts.items():
        x = sample(bb, bb.encode_prompts([p] * n), bb.encode_prompts([""] * n), guidance=3.0, steps=12,
                   noise=torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        dev = (x - x.median(dim=-1, keepdim=True).values.median(dim=-2, keepdim=True).values).abs().mean(1)
        energy[key] = (dev[:, :16, :16].mean().item(), dev[:, 16:, 16:].mean().item())  # (top-left, bottom-right)
    assert energy["tl"][0] > energy["tl"][1] and energy["br"][1] > energy["br"][0], energy
