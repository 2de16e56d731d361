"""Compressed linear decoding (paper §3.1, Eq. 4): each query's hidden state h becomes one LoRA row (of A) or
column (of B) through a per-layer bottleneck, row = D·C·h, with C (H -> c) and D (c -> d). Shapes: B batch,
L adapted layers, k rank, H hidden, c compressed width, d a layer's in/out width."""

from __future__ import annotations

import math

import torch
from torch import nn


class CompressedHeads(nn.Module):
    """Row = D·C·h per layer and matrix type: C (H -> c) batched over all layers, D (c -> d) batched over the
    layers that share an output width d. A backbone has a handful of widths but 100-240 adapted layers: one small
    matmul per layer would leave the real-size forward launch-bound (measured in docs/results.md)."""

    def __init__(self, hidden: int, c: int, out_dims: list[int], zero: bool):
        super().__init__()
        L = len(out_dims)
        self.num_layers = L
        self.C = nn.Parameter(torch.randn(L, hidden, c) / math.sqrt(hidden))  # (L, H, c)
        # drawn per layer in layer order, then stacked: the same initial weights as one matrix per layer
        per_layer = [torch.zeros(c, d) if zero else torch.randn(c, d) / math.sqrt(c) for d in out_dims]
        groups: dict[int, list[int]] = {}
        for i, d in enumerate(out_dims):
            groups.setdefault(d, []).append(i)
        self.groups = list(groups.values())  # layer indices of each width group
        self.D = nn.ParameterList([nn.Parameter(torch.stack([per_layer[i] for i in idx])) for idx in self.groups])
        for g, idx in enumerate(self.groups):  # (G_g,) for index_select; not saved: the layer order decides it
            self.register_buffer(f"index_{g}", torch.tensor(idx), persistent=False)

    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """h (B, L, k, H), optional per-layer scale (L,) -> per layer (B, k, d_l) (views into one tensor per group)."""
        z = torch.einsum("blkh,lhc->blkc", h, self.C)  # (B, L, k, c)
        out: list[torch.Tensor | None] = [None] * self.num_layers
        for g, D in enumerate(self.D):
            index = getattr(self, f"index_{g}")
            y = torch.einsum("bgkc,gcd->bgkd", z.index_select(1, index), D)  # (B, G_g, k, d)
            if scale is not None:
                y = y * scale.index_select(0, index).view(1, -1, 1, 1)
            for i, y_i in zip(self.groups[g], y.unbind(1)):
                out[i] = y_i
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the grouping hold one (c, d) matrix per layer: stack them into the groups
        first = state_dict.get(prefix + "D.0")
        if first is not None and first.dim() == 2:
            per_layer = [state_dict.pop(f"{prefix}D.{i}") for i in range(self.num_layers)]
            for g, idx in enumerate(self.groups):
                state_dict[f"{prefix}D.{g}"] = torch.stack([per_layer[i] for i in idx])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
