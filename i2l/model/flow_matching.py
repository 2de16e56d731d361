"""Flow matching (paper §3.2): the training objective through a frozen backbone (the sampler that uses the same
path is i2l/infer/guidance.py). x_t = (1 - t)·x0 + t·x1 (x0 noise, x1 data), target u = x1 - x0,
loss ‖v(x_t, t, c) - u‖². Shapes: B batch, x (B, *latent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - tt) * x0 + tt * x1


def fm_loss(backbone: Backbone, x1: torch.Tensor, cond: Cond, lora: LoRA | None = None,
            t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            generator: torch.Generator | None = None, reduce: bool = True) -> torch.Tensor:
    """Flow-matching loss of the backbone (+ optional per-sample LoRA) on data x1; per-sample if not reduce."""
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator).to(x1)
    if t is None:
        t = sample_timesteps(x1.shape[0], generator, x1.device)
    t = t.to(x1.device, torch.float32)  # exact t: in bf16 t = 0.97 would reach the model as 0.96875
    x_t = interpolate(noise, x1, t)  # (B, *latent); the adapter casts it to the backbone's dtype
    v = backbone.velocity(x_t, t, cond, lora)
    per = ((v.float() - (x1.float() - noise.float())) ** 2).flatten(1).mean(1)  # (B,)
    return per.mean() if reduce else per


def fm_backward(backbone: Backbone, x1: torch.Tensor, cond: Cond, lora: LoRA, opt: torch.optim.Optimizer,
                generator: torch.Generator | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The gradient of the FM loss through the frozen backbone with `lora` applied; returns the loss. The forward
    runs under the backbone's precision policy (bf16 autocast on a GPU), the backward outside it as PyTorch's AMP
    recipe has it (checkpointed blocks recompute under the autocast state they were run in). The LoRA stays active
    through backward, so checkpointed blocks recompute with it. opt.step() is the caller's (clipping first).
    reduce: None for the mean over the batch; else it maps the per-sample losses (B,) (fp32) to the loss."""
    with backbone.lora_adapter.use(lora):
        with precision_of(backbone):
            loss = fm_loss(backbone, x1, cond, lora, generator=generator, reduce=reduce is None)
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
