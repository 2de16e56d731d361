"""Asymmetric LoRA guidance (paper §3.4): an Euler sampler along the flow-matching path whose two CFG branches
each carry their own per-sample LoRA (the reference LoRA on the positive branch, e.g. the gray-image LoRA on the
negative), run per step as one batched forward of 2B rows ("joint") or as two forwards of B rows ("split", where a
LoRA shared by the whole negative branch is applied as one matrix, not per row); img2img starts part-way along the
same grid from a noised init image. Shapes: B batch, x (B, *latent)."""

from __future__ import annotations

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.backbones.schedule import timestep_schedule
from i2l.model.finite import require_finite
from i2l.model.flow_matching import interpolate
from i2l.model.lora import LoRA

NEGATIVES = ("gray", "base", "none")  # the CFG negative branch: gray-image LoRA (paper), base model, no CFG
DEFAULT_DENOISE = 0.6  # img2img strength when none is given, as diffusers' img2img pipelines default
CFG_PASSES = ("auto", "joint", "split")
# The faster arrangement of the two CFG branches per device type, from `i2l bench cfg` (docs/results.md, "Which
# arrangement of the CFG branches is faster?"). Both give the same images; only the speed differs.
FASTER_PASSES = {"cpu": "split", "cuda": "joint"}


def check_passes(passes: str) -> str:
    """`passes` when it names a CFG arrangement (CFG_PASSES), else a clear error."""
    if passes not in CFG_PASSES:
        raise ValueError(f"cfg passes must be one of {', '.join(CFG_PASSES)}, got {passes!r}")
    return passes


def cfg_passes_for(device: torch.device | str, passes: str = "auto") -> str:
    """The CFG arrangement `sample` runs on `device`: `passes` itself, or for "auto" the one measured faster there
    (a device type not measured gets "joint", the arrangement with the fewest forwards)."""
    if check_passes(passes) != "auto":
        return passes
    return FASTER_PASSES.get(torch.device(device).type, "joint")


class NonFiniteSample(ValueError):
    """Samples of a batch went NaN/Inf: `first_bad` maps each such batch row to the sampler step (1-based) after
    which its state first held a non-finite value. Callers that know the rows' LoRAs re-raise naming them."""

    def __init__(self, first_bad: dict[int, int], steps: int):
        self.first_bad, self.steps = first_bad, steps
        where = ", ".join(f"row {r} at step {k}" for r, k in first_bad.items())
        super().__init__(f"sampling went non-finite (NaN/Inf) after {where} of {steps}: a LoRA, strength or guidance "
                         "too large for this backbone, or a broken checkpoint; no image written")


def denoise_steps(steps: int, denoise: float) -> int:
    """How many of `steps` an img2img run with strength `denoise` in [0, 1] samples, counted as diffusers' img2img
    pipelines count them (`get_timesteps`): steps − int(steps − denoise·steps), i.e. denoise·steps rounded up, in
    their float arithmetic, so a denoise gives the same run here as there."""
    denoise = require_finite(denoise, "denoise")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1] (1 = from pure noise, 0 = the init image back), got {denoise:g}")
    return steps - int(max(steps - min(steps * denoise, steps), 0))


def _per_row(lora: LoRA | None, n: int) -> LoRA | None:
    """`lora` as a forward over n rows takes it: per-sample (n), or unbatched (one matrix shared by every row)."""
    if lora is not None and lora.batched and lora.samples != n:
        return lora.expand(n)
    return lora


def stack_rows(loras: list[LoRA]) -> LoRA:
    """One LoRA per row as `sample` takes them: the same unbatched LoRA on every row stays one shared matrix (a
    split CFG pass applies it once for the batch), anything else is stacked (B, ...)."""
    first = loras[0]
    if not first.batched and all(lo is first for lo in loras):
        return first
    return LoRA.stack(loras)


def _cat_loras(pos: LoRA | None, neg: LoRA | None, n: int) -> LoRA | None:
    """One batched LoRA for [pos; neg] rows; a missing side gets a zero LoRA (= the base model)."""
    if pos is None and neg is None:
        return None
    ref = pos if pos is not None else neg
    zero = ref.scaled(0.0)
    parts = []
    for lo in (pos, neg):
        lo = zero if lo is None else lo
        parts.append(lo if lo.batched and lo.samples == n else lo.expand(n))
    return LoRA.stack(parts)


@torch.no_grad()
def sample(backbone: Backbone, cond: Cond, neg_cond: Cond | None = None, lora: LoRA | None = None,
           neg_lora: LoRA | None = None, guidance: float = 1.0, steps: int = 20, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None, shift: float | None = None,
           strength: float = 1.0, inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
           init: torch.Tensor | None = None, denoise: float = 1.0, passes: str = "auto") -> torch.Tensor:
    """Euler sampling from noise (t=0) to data (t=1).

    guidance == 1 or neg_cond None: one branch. Otherwise CFG v = v_neg + s·(v_pos − v_neg), where the positive
    branch carries `lora` (per-sample) and the negative branch `neg_lora` (e.g. the gray-image LoRA): the
    paper's asymmetric LoRA guidance. passes: "joint" runs both branches as one batched forward of 2B rows per step,
    "split" as two forwards of B rows (a negative LoRA that is unbatched, e.g. one gray LoRA for the batch, is then
    one shared matrix, not B copies); "auto" picks the one measured faster on the backbone's device
    (`cfg_passes_for`). Both give the same images.
    inpaint = (known latents (B, *latent), mask (B, 1, H, W) with 1 = regenerate): the known region is
    re-imposed at every step along its own noise path, so composition with a mask works in this sampler.
    shift None: the t grid of the backbone's own pipeline (`Backbone.sampling_schedule`); a number: that static
    shift of a uniform grid instead.
    init = latents x1 (B, *latent) of init images (img2img): the run starts at the grid point t_s where
    denoise_steps(steps, denoise) steps remain, from x = (1 − t_s)·noise + t_s·init, and samples those steps only
    (denoise 1: t_s = 0, pure noise, the text-to-image run; denoise 0: the init latents themselves).
    """
    guidance, strength = require_finite(guidance, "guidance"), require_finite(strength, "strength")
    n = len(cond)
    if noise is None:
        noise = torch.randn((n, *shape), generator=generator)
    # The Euler state and t stay fp32 whatever the backbone computes in (as ZImagePipeline keeps its latents):
    # rounding x to bf16 after every small step dt·v drifts ~8x further from the fp32 path than bf16 weights do.
    noise = noise.to(backbone.device, torch.float32)
    ts = (backbone.sampling_schedule(steps, tuple(noise.shape[1:])) if shift is None
          else timestep_schedule(steps, shift)).to(noise.device)
    first = steps - denoise_steps(steps, denoise)  # grid index img2img starts at (0: from pure noise)
    if init is None:
        if denoise != 1.0:
            raise ValueError("denoise < 1 needs init latents (img2img) to start from")
        x = noise
    else:
        if inpaint is not None:
            raise ValueError("img2img (init) and inpainting together are not supported: use one of them")
        init = init.to(noise.device, torch.float32).expand_as(noise)
        x = interpolate(noise, init, ts[first].expand(n))  # x_t = (1 - t)·x0 + t·x1 at t = ts[first]
    cfg = neg_cond is not None and guidance != 1.0
    joint = cfg_passes_for(backbone.device, passes) == "joint" and cfg  # checks `passes` with or without CFG
    if joint:
        both_cond = Cond.cat([cond, neg_cond])
        both_lora = _cat_loras(lora, neg_lora, n)
    else:
        lora, neg_lora = _per_row(lora, n), _per_row(neg_lora, n)
    finite = []  # per step (B,) bool, kept on the device: one reduction per step, one sync at the end
    for i in range(first, steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        if joint:
            v = backbone.velocity(torch.cat([x, x]), t.expand(2 * n), both_cond, both_lora,
                                  strength).float()  # (2B, *latent)
            v_pos, v_neg = v[:n], v[n:]
            v = v_neg + guidance * (v_pos - v_neg)
        elif cfg:  # split: a missing LoRA is the base model, as the zero LoRA of the joint forward
            v_pos = backbone.velocity(x, t.expand(n), cond, lora, strength).float()  # (B, *latent)
            v_neg = backbone.velocity(x, t.expand(n), neg_cond, neg_lora, strength).float()
            v = v_neg + guidance * (v_pos - v_neg)
        else:
            v = backbone.velocity(x, t.expand(n), cond, lora, strength).float()
        x = x + dt * v
        if inpaint is not None:
            known, mask = inpaint
            t_next = ts[i + 1]
            x = mask * x + (1 - mask) * interpolate(noise, known, t_next.expand(n))
        finite.append(torch.isfinite(x).flatten(1).all(1))  # (B,)
    if finite and not bool((ok := torch.stack(finite)).all()):  # ok (steps, B)
        bad = ~ok
        at = (bad.to(torch.uint8).argmax(0) + 1 + first).tolist()  # first bad step of each row, 1-based
        raise NonFiniteSample({r: at[r] for r in bad.any(0).nonzero().flatten().tolist()}, steps)
    return x
