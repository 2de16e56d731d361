"""Batched LoRA application: forward hooks that give each sample of a batch its own LoRA (or one LoRA its
consecutive samples, `LoRA.repeat_each`), with no weight merging and no module replacement.

Shapes: B batch, U LoRAs, n samples per LoRA (U·n = B), T tokens, r rank, `in`/`out` the layer's features.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from i2l.model.lora import LoRA


class BatchedLoRA:
    """Applies (per-sample) LoRAs to named nn.Linear layers through forward hooks: no weight merging, no module
    replacement, so the model's state dict and diffusers layout stay untouched, and no LoRA = bit-identical outputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.layers: dict[str, nn.Linear] = {}
        for n in names:
            m = model.get_submodule(n)
            if not isinstance(m, nn.Linear):
                raise TypeError(f"{n} is {type(m).__name__}, not nn.Linear")
            self.layers[n] = m
        self.active: LoRA | None = None
        self.strength = 1.0
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.layers.items()]

    def _make_hook(self, name: str):
        def hook(module, args, out):
            lora = self.active
            if lora is None or name not in lora.A:
                return None  # None keeps the layer's own output: exactly the base model
            x = args[0]
            A, B = lora.A[name], lora.B[name]
            if A.dim() == 3:  # per-sample: x (B, T, in) or (B, in); LoRA i serves samples i·n .. i·n+n-1
                n = lora.rows_per_lora
                if x.shape[0] != A.shape[0] * n:
                    each = f" for {n} samples each" if n > 1 else ""
                    raise ValueError(f"{name}: batch of {x.shape[0]} inputs but {A.shape[0]} LoRAs{each}")
                squeeze = x.dim() == 2 and n == 1
                xb = x.unsqueeze(1) if squeeze else x.reshape(A.shape[0], -1, x.shape[-1])  # (U, n·T, in)
                h = torch.bmm(xb, A.transpose(1, 2).to(xb.dtype))  # (U, n·T, r)
                d = torch.bmm(h, B.transpose(1, 2).to(xb.dtype))  # (U, n·T, out)
                d = d.squeeze(1) if squeeze else d.reshape(*x.shape[:-1], d.shape[-1])
            else:  # one LoRA shared by the batch
                d = (x @ A.t().to(x.dtype)) @ B.t().to(x.dtype)  # (..., out)
            return out + d * self.strength if self.strength != 1.0 else out + d
        return hook

    @contextlib.contextmanager
    def use(self, lora: LoRA | None, strength: float = 1.0):
        """Within the block, the model runs with `lora` (batched: one per sample); None = base model."""
        prev, prev_s = self.active, self.strength
        self.active, self.strength = lora, strength
        try:
            yield
        finally:
            self.active, self.strength = prev, prev_s

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
