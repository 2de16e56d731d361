"""Flow matching (paper §3.2): the training objective through a frozen backbone (the sampler that uses the same
path is i2l/infer/guidance.py). x_t = (1 - t)·x0 + t·x1 (x0 noise, x1 data), target u = x1 - x0,
loss ‖v(x_t, t, c) - u‖², t drawn logit-normal or from the backbone's own training grid (optionally weighted).
Shapes: B batch, x (B, *latent), G grid points.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from i2l.model.lora import LoRA

if TYPE_CHECKING:  # the objective only calls backbone.velocity: no backbone code is imported
    from i2l.backbones.base import Backbone, Cond


def sample_timesteps(n: int, generator: torch.Generator | None = None, device=None,
                     dist: str = "logit_normal") -> torch.Tensor:
    """t in (0, 1): logit-normal (as SD3/FLUX train) puts weight on the middle of the path."""
    if dist == "uniform":
        return torch.rand(n, generator=generator).to(device)
    if dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    raise ValueError(f"unknown timestep distribution {dist!r}")


def gaussian_weights(grid: torch.Tensor) -> torch.Tensor:
    """Loss weight (G,) per grid point, as the authors' release (DiffSynth-Studio, `set_training_weight`) weights
    its training loss: a Gaussian over sigma = 1 - t centred at 0.5, exp(-2·(sigma - 0.5)²), minus its minimum on
    the grid, scaled to mean 1 over the grid (the ends of the path get ~0, the middle ~1.5)."""
    y = torch.exp(-2.0 * (0.5 - grid.double()) ** 2)  # sigma - 0.5 = 0.5 - t
    y = y - y.min()
    return (y * (len(grid) / y.sum())).float()


@dataclass(frozen=True, eq=False)
class TimestepSampler:
    """How training draws t: from a continuous law (`dist`), or uniformly from a grid of t (a backbone's shifted
    training schedule), each grid point with an optional loss weight."""

    dist: str = "logit_normal"
    grid: torch.Tensor | None = None  # (G,) t values
    weights: torch.Tensor | None = None  # (G,) loss weights, mean 1

    @classmethod
    def build(cls, timesteps: str, weighting: str, grid: torch.Tensor | None) -> TimestepSampler:
        """train.timesteps / train.loss_weighting -> a sampler; grid: the backbone's training grid (None: the
        backbone trains on a continuous logit-normal, e.g. the toy one)."""
        if timesteps != "backbone" or grid is None:
            grid, dist = None, timesteps if timesteps != "backbone" else "logit_normal"
        else:
            dist = "grid"
        if weighting == "none":
            return cls(dist, grid)
        if weighting != "gaussian":
            raise ValueError(f"unknown loss weighting {weighting!r}")
        if grid is None:
            raise ValueError("train.loss_weighting='gaussian' weights the points of a backbone's training grid: use "
                             "it with train.timesteps='backbone' on a backbone that has one (flux2, zimage)")
        return cls(dist, grid, gaussian_weights(grid))

    def sample(self, n: int, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> t (n,), loss weights (n,) or None."""
        if self.grid is None:
            return sample_timesteps(n, generator, device, self.dist), None
        i = torch.randint(len(self.grid), (n,), generator=generator)  # uniform over the grid, as the authors draw
        return self.grid[i].to(device), None if self.weights is None else self.weights[i].to(device)


DEFAULT_TIMESTEPS = TimestepSampler()  # logit-normal: the toy backbone's and the debug/toy presets' draw


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - tt) * x0 + tt * x1


def fm_loss(backbone: Backbone, x1: torch.Tensor, cond: Cond, lora: LoRA | None = None,
            t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            generator: torch.Generator | None = None, reduce: bool = True,
            timesteps: TimestepSampler | None = None) -> torch.Tensor:
    """Flow-matching loss of the backbone (+ optional per-sample LoRA) on data x1; per-sample if not reduce.
    t: given, or drawn by `timesteps` (default: logit-normal), whose loss weights (if any) then apply."""
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator).to(x1)
    w = None
    if t is None:
        t, w = (timesteps or DEFAULT_TIMESTEPS).sample(x1.shape[0], generator, x1.device)
    t = t.to(x1.device, torch.float32)  # exact t: in bf16 t = 0.97 would reach the model as 0.96875
    x_t = interpolate(noise, x1, t)  # (B, *latent); the adapter casts it to the backbone's dtype
    v = backbone.velocity(x_t, t, cond, lora)
    per = ((v.float() - (x1.float() - noise.float())) ** 2).flatten(1).mean(1)  # (B,)
    if w is not None:
        per = per * w.float()
    return per.mean() if reduce else per


def fm_backward(backbone: Backbone, x1: torch.Tensor, cond: Cond, lora: LoRA, opt: torch.optim.Optimizer,
                generator: torch.Generator | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                timesteps: TimestepSampler | None = None) -> torch.Tensor:
    """The gradient of the FM loss through the frozen backbone with `lora` applied; returns the loss. The forward
    runs under the backbone's precision policy (bf16 autocast on a GPU), the backward outside it as PyTorch's AMP
    recipe has it (checkpointed blocks recompute under the autocast state they were run in). The LoRA stays active
    through backward, so checkpointed blocks recompute with it. opt.step() is the caller's (clipping first).
    reduce: None for the mean over the batch; else it maps the per-sample losses (B,) (fp32) to the loss.
    timesteps: how t is drawn (default logit-normal; see TimestepSampler)."""
    with backbone.lora_adapter.use(lora):
        with precision_of(backbone):
            loss = fm_loss(backbone, x1, cond, lora, generator=generator, reduce=reduce is None,
                           timesteps=timesteps)
        if reduce is not None:
            loss = reduce(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    return loss


def mixed_precision(device: torch.device | str, backbone_dtype: str):
    """bf16 autocast where the backbone runs in bf16 on a GPU (training, baselines and prediction alike; trained
    weights stay fp32); exact fp32 everywhere else."""
    device = torch.device(device)
    if device.type == "cuda" and backbone_dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_of(backbone: Backbone):
    """`mixed_precision` for a loaded backbone (its device and weight dtype)."""
    return mixed_precision(backbone.device, "bfloat16" if backbone.dtype == torch.bfloat16 else "float32")
