"""The adapter baseline: context tokens appended to the prompt's, training lowers the loss, files round-trip,
and the mean-LoRA baseline trains on all styles."""

import itertools

import pytest
import torch

from i2l.backbones import load_backbone
from i2l.backbones.base import Cond
from i2l.baselines.adapter import (
    ConditionedBackbone,
    build_adapter,
    generate_with_adapter,
    load_adapter,
    train_adapter,
    with_context,
)
from i2l.baselines.mean_lora import load_mean_lora, train_mean_lora
from i2l.config import get_config
from i2l.data.tuples import TupleStream, collate
from i2l.model.encoder import load_encoder
from i2l.model.flow_matching import fm_loss
from i2l.train.step import lr_at


def _cfg(debug_run, **over):
    cfg = get_config("debug", over)
    cfg.data_root = str(debug_run.data_root)
    cfg.backbone.path, cfg.encoder.path = debug_run.cfg.backbone.path, debug_run.cfg.encoder.path
    return cfg


def _batch(debug_run, cfg, n=16, seed=7):
    return collate(list(itertools.islice(iter(TupleStream(debug_run.prepared_dir, seed=seed)), n)),
                   cfg.backbone.image_size, cfg.encoder.image_size)


@torch.no_grad()
def _fixed_loss(bb, enc, adapter, batch, lora=None):
    """FM loss on one fixed batch with a fixed noise/timestep grid; adapter None = no extra tokens."""
    targets, prompts, refs, n = batch
    g = torch.Generator().manual_seed(0)
    t = torch.rand(len(prompts), generator=g)
    noise = torch.randn(targets.shape, generator=g)
    view = bb
    if adapter is not None:
        from i2l.baselines.adapter import adapter_tokens

        view = ConditionedBackbone(bb, adapter_tokens(adapter, enc, refs, n))
    return float(fm_loss(view, targets, view.encode_prompts(prompts), lora, t=t, noise=noise))


def test_with_context_appends_tokens_and_extends_the_mask():
    cond = Cond(torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    out = with_context(cond, torch.ones(1, 3, 8))  # one set of tokens broadcast over the batch
    assert out.embeds.shape == (2, 8, 8)
    assert torch.equal(out.embeds[:, :5], cond.embeds) and torch.equal(out.embeds[:, 5:], torch.ones(2, 3, 8))
    assert out.mask[:, 5:].all() and torch.equal(out.mask[:, :5], cond.mask)
    assert with_context(Cond(torch.randn(2, 5, 8)), torch.ones(2, 3, 8)).mask is None
    with pytest.raises(ValueError, match="3 sets of adapter tokens"):
        with_context(cond, torch.ones(3, 3, 8))


def test_untrained_adapter_ignores_references_and_longer_contexts_run(debug_run):
    cfg = _cfg(debug_run)
    bb, enc = load_backbone(cfg), load_encoder(cfg.encoder)
    text_dim = bb.encode_prompts([""]).embeds.shape[-1]
    adapter = build_adapter(cfg, enc.dim, text_dim)
    _, _, refs, n = _batch(debug_run, cfg, n=4)
    from i2l.baselines.adapter import adapter_tokens

    tok = adapter_tokens(adapter, enc, refs, n)
    assert tok.shape == (4, cfg.eval.adapter_tokens, text_dim)
    assert torch.equal(tok, torch.zeros_like(tok))  # zero-initialised output: no reference information yet
    extra = torch.randn(2, cfg.eval.adapter_tokens, text_dim)
    x = generate_with_adapter(bb, extra, ["one circle", "two stars"], torch.randn(2, *bb.latent_shape(32)),
                              guidance=2.0, steps=2)
    assert x.shape == (2, *bb.latent_shape(32)) and torch.isfinite(x).all()  # a longer context just works


def test_adapter_trains_loss_falls_and_round_trips(debug_run, tmp_path):
    cfg = _cfg(debug_run, **{"train.steps": 20, "train.lr": 1e-2, "train.warmup": 2})
    batch = _batch(debug_run, cfg)
    bb, enc = load_backbone(cfg), load_encoder(cfg.encoder)
    untrained = build_adapter(cfg, enc.dim, bb.encode_prompts([""]).embeds.shape[-1])
    before = _fixed_loss(bb, enc, untrained, batch)
    info = train_adapter(cfg, debug_run.prepared_dir, tmp_path / "adapter", progress=False, device="cpu")
    adapter, saved = load_adapter(tmp_path / "adapter", bb, enc)
    after = _fixed_loss(bb, enc, adapter, batch)
    assert info["steps"] == 20 and info["batch_size"] == cfg.train.batch_size  # the predictor's budget
    assert len(saved["curve"]) == 20
    # the predictor's step: its lr schedule, clipping, and a summary of the recorded losses
    assert [r["lr"] for r in saved["curve"]] == [lr_at(s, 20, 1e-2, 2) for s in range(20)]
    assert all("grad_norm" in r for r in saved["curve"])
    assert info["last_loss"] == sum(r["loss"] for r in saved["curve"]) / 20
    # the predictor's batches: G targets share a reference set, so the encoder saw at most one set per G targets
    # per step, and later steps took references (and prompts) from the caches instead of encoding them again
    stream = TupleStream(debug_run.prepared_dir, "train", cfg.predictor.max_refs, cfg.train.seed,
                         targets_per_lora=cfg.train.targets_per_lora)
    seen = {r for t in itertools.islice(iter(stream), 20 * cfg.train.batch_size) for r in t.ref_ids}
    assert info["cache_refs_misses"] in (len(seen), len(seen) + 1)  # each reference once (+ the padding image)
    assert info["cache_refs_hits"] > 0 and info["cache_prompts_hits"] > 0
    # An untrained adapter appends zeros whatever the references (loss == before exactly); the debug backbone,
    # trained 2 steps, barely reads its context, so the trained adapter's gain is small but must be there.
    assert after < before, (before, after)
    _, _, refs, n = batch
    from i2l.baselines.adapter import adapter_tokens

    tok = adapter_tokens(adapter, enc, refs, n)
    assert not torch.allclose(tok[0], tok[1])  # trained tokens now depend on the references
    bb.backbone_id = "another-backbone"
    with pytest.raises(ValueError, match="retrain it"):
        load_adapter(tmp_path / "adapter", bb, enc)
    with pytest.raises(FileNotFoundError, match="i2l train-adapter"):
        load_adapter(tmp_path / "missing")


def test_mean_lora_trains_on_all_styles_and_loss_falls(debug_run, tmp_path):
    cfg = _cfg(debug_run, **{"train.steps": 20, "train.warmup": 2, "eval.mean_lora_lr": 0.1})
    batch = _batch(debug_run, cfg)
    bb, enc = load_backbone(cfg), load_encoder(cfg.encoder)
    before = _fixed_loss(bb, enc, None, batch)
    info = train_mean_lora(cfg, debug_run.prepared_dir, tmp_path / "mean", progress=False, device="cpu")
    lora, saved = load_mean_lora(tmp_path / "mean", bb)
    assert info["steps"] == 20 and lora.rank == cfg.predictor.rank and not lora.batched
    assert [r["lr"] for r in saved["curve"]] == [lr_at(s, 20, 0.1, 2) for s in range(20)]
    assert not any("grad_norm" in r for r in saved["curve"])  # a LoRA optimised as per-style ones: no clipping
    assert set(lora.names) == set(bb.lora_targets())
    after = _fixed_loss(bb, enc, None, batch, lora=lora)
    assert after < before * 0.98, (before, after)
