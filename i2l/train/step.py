"""The step every training loop shares: the per-step generator seed, the warmup + cosine lr schedule (a torch
LRScheduler), backward, gradient clipping, the optimizer step, and the loss curve with its first/last summary.
The loops keep what is theirs: what a batch is and what the loss is."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

from i2l.config import Config
from i2l.model.flow_matching import TimestepSampler
from i2l.train.curve import loss_summary


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step `step` on data-parallel rank `rank`: a function of (seed, step, rank) alone, so a resumed
    run draws the same noise and timesteps as one that never stopped, and ranks draw different ones."""
    return seed * 1_000_003 + step * 1009 + rank


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class WarmupCosine(LRScheduler):
    """`lr_at` as a torch scheduler over `total` steps, each group from its initial lr. The lr is the formula
    itself, not LambdaLR's base * factor, which can differ from it in the last bit.

    start: the step to continue at. The lr is a function of the step, so a resume needs no scheduler state: the
    resumed optimizer carries each group's `initial_lr`, which LRScheduler put there at step 0."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, warmup: int, start: int = 0):
        self.total, self.warmup = total, warmup
        super().__init__(optimizer, last_epoch=start - 1)  # LRScheduler's first step() moves it to `start`

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, self.total, base, self.warmup) for base in self.base_lrs]


class TrainStep:
    """One optimisation step of a training loop, after its loss: backward (or the loop's own, e.g.
    `fm_backward`), clipping, the optimizer step, the next lr, and one record on the loss curve.

    grad_clip: clip the global gradient norm of `params` (default: the optimizer's) to this; None: no clipping.
    schedule: advanced after every optimizer step; None keeps the optimizer's lr.
    start, curve: the step to continue at and the curve so far (a resumed run)."""

    def __init__(self, opt: torch.optim.Optimizer, grad_clip: float | None = None,
                 params: Iterable[torch.Tensor] | None = None, schedule: LRScheduler | None = None,
                 start: int = 0, curve: list[dict] | None = None):
        self.opt, self.grad_clip, self.schedule = opt, grad_clip, schedule
        # the order matters to the last bit: the global norm sums the per-tensor norms in this order
        self.params = list(params) if params is not None else [p for g in opt.param_groups for p in g["params"]]
        self.done = start
        self.curve = curve if curve is not None else []

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step(self, loss: torch.Tensor, **extra) -> dict:
        """Clip, update and advance the schedule, with the gradients of `loss` in place; returns the step's
        record {step (steps done), loss, lr (the one this update used), grad_norm (before clipping), **extra}."""
        rec = {"step": self.done + 1, "loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}
        if self.grad_clip is not None:
            rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        self.opt.step()
        if self.schedule is not None:
            self.schedule.step()
        self.done += 1
        rec.update(extra)
        self.curve.append(rec)
        return rec

    def summary(self, first: int = 20, last: int = 20) -> dict:
        return loss_summary(self.curve, first, last)


def timestep_sampler(cfg: Config, backbone) -> TimestepSampler:
    """How this run draws t (train.timesteps, train.loss_weighting), in every loop that trains through its backbone
    (the predictor, the mean-LoRA, the adapter, the per-style LoRAs): "backbone" takes the backbone's own training
    grid for latents of the run's image size (FLUX.2 / Z-Image: their shifted schedules; toy: logit-normal)."""
    grid = None
    if cfg.train.timesteps == "backbone":
        grid = backbone.training_timesteps(backbone.latent_shape(cfg.backbone.image_size))
    return TimestepSampler.build(cfg.train.timesteps, cfg.train.loss_weighting, grid)
