"""Checks that weights and numeric arguments are finite floats where they enter i2l (files, flags, the API):
a NaN or Inf would otherwise sample black images silently."""

from __future__ import annotations

import math

import torch

# A LoRA factor with |w| above this is corrupt, not a style: trained and predicted factors are O(0.01..1), and a
# ΔW of r·1e4·1e4 = 1e8·r overflows fp16/bf16 activations (max 65504 / no headroom) into Inf, then NaN images.
MAX_ABS_WEIGHT = 1e4


def require_finite(value, name: str) -> float:
    """`value` as a float, or a ValueError naming `name` (a flag or argument) when it is not a finite number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return x


def check_weights(tensors: dict[str, torch.Tensor], source: str, bound: float | None = MAX_ABS_WEIGHT) -> None:
    """Raise a ValueError naming `source` and the first key whose tensor is not floating point, holds NaN/Inf, or
    (bound given) has |w| > bound. One reduction per tensor and one device sync for all of them."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{source}: {k} is {t.dtype}, not floating point: a LoRA's weights are floats "
                             "(a quantized or integer file would act as no LoRA at all)")
    keys = [k for k, t in tensors.items() if t.numel()]
    if not keys:
        return
    dev = tensors[keys[0]].device
    peaks = torch.stack([tensors[k].detach().float().abs().amax().to(dev) for k in keys]).tolist()  # NaN propagates
    for k, m in zip(keys, peaks):
        t = tensors[k].detach()
        if not math.isfinite(m):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(f"{source}: {k} holds {nan} NaN and {inf} Inf value(s) of {t.numel()}: "
                             "a corrupt LoRA would sample black or NaN images")
        if bound is not None and m > bound:
            raise ValueError(f"{source}: {k} has |w| up to {m:.3g}, above {bound:g} (MAX_ABS_WEIGHT): "
                             "no trained LoRA is that large, the file is corrupt or mis-scaled")
