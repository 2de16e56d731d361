"""Training timesteps: each backbone's own training grid (FLUX.2-klein, Z-Image) against the diffusers scheduler's
own sigmas, drawn uniformly as the authors' release draws them, the authors' Gaussian loss weights, and the toy
backbone (and the debug preset) still on the logit-normal draw; the toy preset on the uniform one."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import flux_scheduler, tiny_flux2, tiny_toy, tiny_zimage

from i2l.backbones.schedule import FLUX2_TRAIN_MU
from i2l.config import get_config
from i2l.model.flow_matching import TimestepSampler, fm_loss, gaussian_weights, sample_timesteps
from i2l.train.loop import timestep_sampler

DRAWS = 20_000
KS_BOUND = 1.63 / math.sqrt(DRAWS)  # Kolmogorov-Smirnov critical value at alpha = 0.01


def _ks_to_grid(t: torch.Tensor, ref: torch.Tensor) -> float:
    """KS distance between draws t and the uniform law on the points `ref`, at every point of `ref`."""
    pts = torch.sort(ref.double()).values
    emp = torch.searchsorted(torch.sort(t.double()).values, pts, right=True).double() / len(t)
    law = torch.searchsorted(pts, pts, right=True).double() / len(pts)
    return float((emp - law).abs().max())


def _draws(sampler: TimestepSampler) -> torch.Tensor:
    return sampler.sample(DRAWS, torch.Generator().manual_seed(0))[0]


def _config(backbone: str, weighting: str = "none"):
    cfg = get_config("debug")
    cfg.train.timesteps, cfg.train.loss_weighting = "backbone", weighting
    cfg.backbone.image_size = 1024 if backbone != "toy" else cfg.backbone.image_size
    return cfg


def test_zimage_draws_from_its_schedulers_own_training_sigmas():
    """Z-Image's scheduler (static shift 3) holds its 1000 training sigmas from construction: training draws t =
    1 - sigma uniformly from exactly those (the authors: linspace(1, 0, 1001)[:-1] shifted by 3)."""
    bb = tiny_zimage(parts=False)
    sampler = timestep_sampler(_config("zimage"), bb)
    ref = 1.0 - FlowMatchEulerDiscreteScheduler.from_config(bb.pipe.scheduler.config).sigmas
    assert len(sampler.grid) == 1000 and torch.allclose(sampler.grid, ref.float(), atol=1e-6)
    s = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)
    assert torch.allclose(sampler.grid.double(), 1 - 3 * s / (1 + 2 * s), atol=1e-6)  # shift 3
    t = _draws(sampler)
    assert _ks_to_grid(t, ref) < KS_BOUND
    assert 0.35 < float((t < 0.25).double().mean()) < 0.55  # shift 3: half the draws in the noisiest quarter
    assert _ks_to_grid(t, torch.linspace(0.0, 0.999, 1000)) > 0.2  # far from an unshifted grid


def test_flux2_draws_from_the_grid_its_scheduler_shifts_as_the_authors_train():
    """FLUX.2-klein's scheduler shifts dynamically: the grid is its 1000 sigmas shifted by the scheduler's own
    exponential time shift at mu = 0.8, the authors' training value, at every resolution."""
    bb = tiny_flux2(parts=False)
    assert bb.pipe.scheduler.config.use_dynamic_shifting
    sampler = timestep_sampler(_config("flux2"), bb)
    sched = flux_scheduler()
    s = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)
    ref = 1.0 - sched.time_shift(FLUX2_TRAIN_MU, 1.0, s)  # the scheduler's own shift
    e = math.exp(FLUX2_TRAIN_MU)
    assert torch.allclose(ref, 1.0 - e / (e + (1 / s - 1)))  # DiffSynth's set_timesteps_flux2 at training
    assert len(sampler.grid) == 1000 and torch.allclose(sampler.grid.double(), ref, atol=1e-6)
    assert _ks_to_grid(_draws(sampler), ref) < KS_BOUND
    other = bb.training_timesteps(bb.latent_shape(512))
    assert torch.equal(other, sampler.grid)  # mu fixed: the same grid at 512² as at 1024²


def test_gaussian_loss_weights_are_the_authors_and_reach_the_loss():
    grid = tiny_zimage(parts=False).training_timesteps((16, 128, 128))
    w = gaussian_weights(grid)
    x = (1 - grid.double()) * 1000  # DiffSynth's set_training_weight on its sigmas · 1000
    y = torch.exp(-2 * ((x - 500) / 1000) ** 2)
    want = (y - y.min()) * (1000 / (y - y.min()).sum())
    assert torch.allclose(w.double(), want, atol=1e-5)
    assert abs(float(w.mean()) - 1) < 1e-5 and float(w.min()) == 0.0
    assert float(w[torch.argmin((grid - 0.5).abs())]) == pytest.approx(float(w.max()), rel=1e-3)

    sampler = timestep_sampler(_config("zimage", "gaussian"), tiny_zimage(parts=False))
    seen = []

    class Spy:  # v = 0: the per-sample loss is |x1 - x0|², then weighted
        def velocity(self, x_t, t, cond, lora=None, strength=1.0):
            seen.append(t)
            return torch.zeros_like(x_t)

    x1, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    loss = fm_loss(Spy(), x1, None, noise=noise, generator=torch.Generator().manual_seed(3), reduce=False,
                   timesteps=sampler)
    idx = torch.randint(1000, (6,), generator=torch.Generator().manual_seed(3))  # the draw fm_loss made
    assert torch.equal(seen[0], sampler.grid[idx])
    plain = ((x1 - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, plain * sampler.weights[idx])


def test_toy_backbone_and_the_toy_presets_keep_the_logit_normal_draw():
    """The toy backbone has no grid (it is pretrained on logit-normal t): "backbone" falls back to exactly the
    draw the debug preset makes, which keeps logit_normal and no weighting (the golden losses). The toy preset
    draws uniformly (the held-out FM loss averages a uniform grid of t; docs/results.md)."""
    assert (get_config("debug").train.timesteps, get_config("debug").train.loss_weighting) == ("logit_normal", "none")
    assert (get_config("toy").train.timesteps, get_config("toy").train.loss_weighting) == ("uniform", "none")
    t = _draws(timestep_sampler(get_config("toy"), tiny_toy()))
    edges = torch.sort(t.double()).values  # uniform on [0, 1]: its CDF is t itself
    assert float((edges - torch.arange(1, DRAWS + 1) / DRAWS).abs().max()) < KS_BOUND + 1 / DRAWS
    for name in ("klein4b", "zimage"):
        assert (get_config(name).train.timesteps, get_config(name).train.loss_weighting) == ("backbone", "gaussian")
    bb = tiny_toy()
    for cfg in (get_config("debug"), _config("toy")):
        sampler = timestep_sampler(cfg, bb)
        assert sampler.grid is None and sampler.weights is None
        t = _draws(sampler)
        assert torch.equal(t, sample_timesteps(DRAWS, torch.Generator().manual_seed(0)))
        logits = torch.sort(torch.logit(t.double())).values  # logit-normal: logit(t) ~ N(0, 1)
        normal = 0.5 * (1 + torch.erf(logits / math.sqrt(2)))
        assert float((normal - torch.arange(1, DRAWS + 1) / DRAWS).abs().max()) < KS_BOUND
    with pytest.raises(ValueError, match="gaussian"):
        TimestepSampler.build("backbone", "gaussian", None)  # no grid to weight
