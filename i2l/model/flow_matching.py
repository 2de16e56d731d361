"""Flow matching (paper §3.2) and an Euler sampler with asymmetric LoRA guidance (paper §3.4).

x_t = (1 - t)·x0 + t·x1 (x0 noise, x1 data), target u = x1 - x0, loss ‖v(x_t, t, c) - u‖². The sampler runs
both CFG branches, each with its own per-sample LoRA, in ONE batched forward per step.
Shapes: B batch, x (B, *latent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.backbones.schedule import timestep_schedule
from i2l.model.lora import LoRA


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


def _cat_loras(pos: LoRA | None, neg: LoRA | None, n: int) -> LoRA | None:
    """One batched LoRA for [pos; neg] rows; a missing side gets a zero LoRA (= the base model)."""
    if pos is None and neg is None:
        return None
    ref = pos if pos is not None else neg
    zero = ref.scaled(0.0)
    parts = []
    for lo in (pos, neg):
        lo = zero if lo is None else lo
        parts.append(lo if lo.batched and lo.batch_size == n else lo.expand(n))
    return LoRA.stack(parts)


@torch.no_grad()
def sample(backbone: Backbone, cond: Cond, neg_cond: Cond | None = None, lora: LoRA | None = None,
           neg_lora: LoRA | None = None, guidance: float = 1.0, steps: int = 20, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None, shift: float | None = None,
           strength: float = 1.0, inpaint: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Euler sampling from noise (t=0) to data (t=1).

    guidance == 1 or neg_cond None: one branch. Otherwise CFG v = v_neg + s·(v_pos − v_neg), where the positive
    branch carries `lora` (per-sample) and the negative branch `neg_lora` (e.g. the gray-image LoRA): the
    paper's asymmetric LoRA guidance, run as one batched forward of 2B rows per step.
    inpaint = (known latents (B, *latent), mask (B, 1, H, W) with 1 = regenerate): the known region is
    re-imposed at every step along its own noise path, so composition with a mask works in this sampler.
    shift None: the t grid of the backbone's own pipeline (`Backbone.sampling_schedule`); a number: that static
    shift of a uniform grid instead.
    """
    n = len(cond)
    if noise is None:
        noise = torch.randn((n, *shape), generator=generator)
    # The Euler state and t stay fp32 whatever the backbone computes in (as ZImagePipeline keeps its latents):
    # rounding x to bf16 after every small step dt·v drifts ~8x further from the fp32 path than bf16 weights do.
    noise = noise.to(backbone.device, torch.float32)
    x = noise
    cfg = neg_cond is not None and guidance != 1.0
    if cfg:
        both_cond = Cond.cat([cond, neg_cond])
        both_lora = _cat_loras(lora, neg_lora, n)
    elif lora is not None and lora.batched and lora.batch_size != n:
        lora = lora.expand(n)
    ts = (backbone.sampling_schedule(steps, tuple(x.shape[1:])) if shift is None
          else timestep_schedule(steps, shift)).to(x.device)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        if cfg:
            v = backbone.velocity(torch.cat([x, x]), t.expand(2 * n), both_cond, both_lora,
                                  strength).float()  # (2B, *latent)
            v_pos, v_neg = v[:n], v[n:]
            v = v_neg + guidance * (v_pos - v_neg)
        else:
            v = backbone.velocity(x, t.expand(n), cond, lora, strength).float()
        x = x + dt * v
        if inpaint is not None:
            known, mask = inpaint
            t_next = ts[i + 1]
            x = mask * x + (1 - mask) * interpolate(noise, known, t_next.expand(n))
    return x
