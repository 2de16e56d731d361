"""The i2L predictor: shapes for every backbone, an untrained predictor is a no-op, variable N references."""

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_flux2, tiny_zimage

from i2l.config import get_config
from i2l.model.flow_matching import fm_loss
from i2l.model.predictor import I2LPredictor, predict_lora
from i2l.toy.backbone import build_vocab, new_toy_backbone
from i2l.toy.encoder import new_toy_encoder


def _toy():
    return new_toy_backbone(get_config("debug").backbone, build_vocab(["one small circle"])).freeze()


BACKBONES = {"toy": _toy, "flux2": lambda: tiny_flux2(parts=False), "zimage": lambda: tiny_zimage(parts=False)}


@pytest.fixture(scope="module")
def encoder():
    return new_toy_encoder(get_config("debug").encoder)


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_predicted_lora_has_the_backbones_shapes(kind, encoder):
    bb = BACKBONES[kind]()
    cfg = get_config("debug").predictor
    pred = I2LPredictor(cfg, bb.lora_targets(), encoder.dim, bb.backbone_id)
    refs = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    lora = predict_lora(pred, encoder, refs, torch.tensor([1, 2, 2]))
    assert sorted(lora.names) == sorted(bb.lora_targets())
    assert pred.num_queries == 2 * cfg.rank * len(bb.lora_targets())
    for name, (d_in, d_out) in bb.lora_targets().items():
        assert lora.A[name].shape == (3, cfg.rank, d_in)
        assert lora.B[name].shape == (3, d_out, cfg.rank)


def test_untrained_predictor_is_a_no_op_and_gradients_flow(encoder):
    bb = _toy()
    pred = I2LPredictor(get_config("debug").predictor, bb.lora_targets(), encoder.dim, bb.backbone_id)
    refs = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    lora = predict_lora(pred, encoder, refs)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    cond = bb.encode_prompts(["one small circle"] * 2)
    assert torch.equal(bb.velocity(x, t, cond), bb.velocity(x, t, cond, lora))
    with bb.lora_adapter.use(lora):
        fm_loss(bb, x, cond, lora).backward()
    # B's heads start at zero, so only they get a gradient on the first step (as with any fresh LoRA)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.head_B.D)


def test_padding_references_do_not_change_a_sample(encoder):
    bb = _toy()
    pred = I2LPredictor(get_config("debug").predictor, bb.lora_targets(), encoder.dim, bb.backbone_id)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.1)  # a non-trivial predictor
    one = torch.rand(1, 1, 3, 32, 32) * 2 - 1
    alone = predict_lora(pred, encoder, one)
    padded = torch.cat([one, torch.rand(1, 2, 3, 32, 32)], dim=1)  # + 2 junk refs, masked out by n_refs=1
    mixed = predict_lora(pred, encoder, torch.cat([padded, torch.rand(1, 3, 3, 32, 32)]), torch.tensor([1, 3]))
    for n in alone.names:
        assert torch.allclose(alone.A[n][0], mixed.A[n][0], atol=1e-5)
        assert torch.allclose(alone.B[n][0], mixed.B[n][0], atol=1e-5)
    other = predict_lora(pred, encoder, padded)  # the same images with all 3 counted: a different LoRA
    assert not torch.allclose(alone.B[n][0], other.B[n][0], atol=1e-4)


def test_no_references_is_a_clear_error(encoder):
    bb = _toy()
    pred = I2LPredictor(get_config("debug").predictor, bb.lora_targets(), encoder.dim, bb.backbone_id)
    with pytest.raises(ValueError, match="at least one reference"):
        predict_lora(pred, encoder, torch.zeros(1, 0, 3, 32, 32))


def test_zero_pretraining_steps_write_the_frozen_random_encoder(debug_run, tmp_path):
    """`i2l pretrain-encoder --steps 0`: the ablation baseline is exactly the seeded random initialisation."""
    from i2l.model.encoder import load_encoder
    from i2l.toy.encoder_pretrain import pretrain_encoder

    cfg = get_config("debug")
    info = pretrain_encoder(cfg, debug_run.prepared_dir, tmp_path / "random", steps=0, progress=False)
    assert info["steps"] == 0 and info["last_loss"] is None
    loaded = load_encoder(replace(cfg.encoder, path=str(tmp_path / "random")))
    fresh = new_toy_encoder(cfg.encoder, seed=cfg.train.seed)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), fresh(x), atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_last_block_on_the_query_rows_alone_gives_what_the_whole_block_gives(encoder, depth, monkeypatch):
    """Only query states are decoded, so the last block computes their rows only (`query_rows`): the LoRAs must be
    those of the whole last block run on every row and then sliced, at any depth and mix of reference counts."""
    from i2l.model import predictor

    bb = _toy()
    pred = I2LPredictor(replace(get_config("debug").predictor, depth=depth), bb.lora_targets(), encoder.dim,
                        bb.backbone_id).eval()
    with torch.no_grad():
        for p in pred.parameters():
            p.normal_(0, 0.2)  # every weight non-trivial: a dropped residual, norm or MLP shows
    refs = torch.rand(3, 3, 3, 32, 32) * 2 - 1
    for n in (torch.tensor([1, 3, 2]), torch.tensor([1, 1, 1])):  # the float key bias; the fused kernel's case
        fast = predict_lora(pred, encoder, refs, n)
        with monkeypatch.context() as m:
            m.setattr(predictor, "query_rows", lambda blk, x, bias, q: blk(x, src_key_padding_mask=bias)[:, :q])
            whole = predict_lora(pred, encoder, refs, n)
        for name in fast.names:
            assert torch.allclose(fast.A[name], whole.A[name], atol=1e-5)
            assert torch.allclose(fast.B[name], whole.B[name], atol=1e-5)
            assert whole.B[name].abs().max() > 1e-2  # a LoRA worth comparing


def test_a_predictor_without_blocks_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        I2LPredictor(replace(get_config("debug").predictor, depth=0), {"l": (4, 4)}, 8)
