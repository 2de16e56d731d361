"""Every loop that trains through the backbone draws t by the run's law (train.timesteps): the predictor, the
mean-LoRA, the adapter and the per-style LoRAs, so that a comparison between them is not one of timestep laws.
The default law (logit-normal) draws exactly what it drew before (the golden losses)."""

import dataclasses

import torch

from i2l.backbones import load_backbone
from i2l.baselines.adapter import train_adapter
from i2l.baselines.mean_lora import train_mean_lora
from i2l.baselines.per_style import optimize_loras
from i2l.config import get_config
from i2l.model.flow_matching import TimestepSampler
from i2l.train.step import timestep_sampler

PROMPTS = [["one circle", "two stars", "one ring"]] * 2


def _cfg(debug_run, **over):
    cfg = get_config("debug", over)
    cfg.data_root = str(debug_run.data_root)
    cfg.backbone.path, cfg.encoder.path = debug_run.cfg.backbone.path, debug_run.cfg.encoder.path
    return cfg


def _per_style(bb, timesteps):
    images = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (S, N, 3, H, W)
    lora, curve = optimize_loras(bb, images, PROMPTS, 2, 3, lr=1e-2, seed=1, snapshots=(3,), rows=2,
                                 timesteps=timesteps)
    return lora.delta(lora.names[0]), curve[0]["loss"]


def test_per_style_loras_draw_t_by_the_law_they_are_given(debug_run):
    bb = load_backbone(_cfg(debug_run))
    default, loss = _per_style(bb, None)
    same, same_loss = _per_style(bb, timestep_sampler(_cfg(debug_run), bb))  # the debug run's law: logit-normal
    assert torch.equal(default, same) and loss == same_loss
    uniform, uniform_loss = _per_style(bb, timestep_sampler(_cfg(debug_run, **{"train.timesteps": "uniform"}), bb))
    assert not torch.allclose(default, uniform) and uniform_loss != loss
    late, late_loss = _per_style(bb, TimestepSampler("grid", torch.tensor([0.98])))  # every t = 0.98
    assert late_loss != uniform_loss and not torch.allclose(late, uniform)


def test_mean_lora_and_adapter_draw_t_by_the_runs_law(debug_run, tmp_path):
    first = {}
    for law in ("logit_normal", "uniform"):
        cfg = _cfg(debug_run, **{"train.steps": 2, "train.warmup": 1, "train.timesteps": law})
        first[law] = (train_mean_lora(cfg, debug_run.prepared_dir, tmp_path / law / "mean", progress=False,
                                      device="cpu")["first_loss"],
                      train_adapter(cfg, debug_run.prepared_dir, tmp_path / law / "adapter", progress=False,
                                    device="cpu")["first_loss"])
    # the same data, noise and step seeds: only the law of t differs, and so must both losses
    assert first["logit_normal"][0] != first["uniform"][0] and first["logit_normal"][1] != first["uniform"][1]


def test_the_evaluations_per_style_loras_follow_the_checkpoints_law(debug_run):
    """make_conditionings gives the per-style family the law of the checkpoint's run (model.cfg.train)."""
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.eval.methods import make_conditionings, per_style_conditionings
    from i2l.infer.api import I2L

    model = I2L.load(debug_run.run_dir)
    model.cfg = dataclasses.replace(model.cfg, train=dataclasses.replace(model.cfg.train, timesteps="uniform"))
    samples = load_val_samples(debug_run.prepared_dir, limit=2)
    ev = dataclasses.replace(model.cfg.eval, optimize_budgets=(2,))
    (got,) = make_conditionings(model, samples, ("per_style",), ev)
    args = (model.backbone, samples, (2,), model.cfg.predictor.rank, model.cfg.backbone.image_size, ev.lora_lr,
            ev.per_style_rows, ev.seed)
    (uniform,) = per_style_conditionings(*args, timesteps=TimestepSampler("uniform"))
    (default,) = per_style_conditionings(*args)
    name = got.loras[0].names[0]
    assert torch.equal(got.loras[0].delta(name), uniform.loras[0].delta(name))
    assert not torch.allclose(got.loras[0].delta(name), default.loras[0].delta(name))


def test_a_baselines_key_names_its_law_so_another_law_trains_it_again(debug_run):
    """An evaluation of a uniform-law checkpoint must not reuse mean-LoRA / adapter files trained by logit-normal
    (seen: a `make run --set train.timesteps=uniform` evaluated in 44 s on the earlier run's baselines). Keys of
    the default law stay as they were recorded before baselines followed the law."""
    from i2l.eval.identity import baseline_budget
    from i2l.train.checkpoint import require_checkpoint

    ck = require_checkpoint(debug_run.run_dir)
    for kind in ("mean_lora", "adapter"):
        keys = {law: baseline_budget(_cfg(debug_run, **{"train.timesteps": law}), ck, "data", kind)
                for law in ("logit_normal", "uniform")}
        assert keys["logit_normal"] != keys["uniform"]
        assert "timesteps" not in keys["logit_normal"] and keys["uniform"]["timesteps"] == "uniform"
