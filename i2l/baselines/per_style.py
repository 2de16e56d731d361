"""The per-style LoRA baseline: what i2L amortizes. A LoRA with the same targets and rank is optimised directly
on one style's reference images (prompts = their contents) by flow matching, for S steps. Same file format."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from i2l.backbones.base import Backbone
from i2l.model.flow_matching import fm_backward
from i2l.model.lora import LoRA, zero_lora


def optimize_lora(backbone: Backbone, images: torch.Tensor, prompts: list[str], rank: int, steps: int,
                  *, lr: float, seed: int = 0, snapshots: tuple[int, ...] = (), batch_size: int = 16,
                  stop: Callable[[dict], bool] | None = None, keep_loras: bool = True) -> tuple[LoRA, list[dict]]:
    """Optimise one LoRA on (images (N, 3, H, W), prompts). Returns the final LoRA and, for each step count in
    `snapshots`, {steps, wall_s, lora} measured on the same run (cumulative wall time, not re-runs).
    stop(snapshot) -> True ends the run at that snapshot; the time spent in it is not counted in wall_s.
    keep_loras=False: a snapshot's LoRA is only lent to `stop`, then dropped (a check at every step of a
    real-size LoRA would otherwise keep hundreds of copies)."""
    targets = backbone.lora_targets()
    init = zero_lora(targets, rank, backbone.backbone_id)
    A = {k: v.clone().to(backbone.device).requires_grad_(True) for k, v in init.A.items()}
    B = {k: v.clone().to(backbone.device).requires_grad_(True) for k, v in init.B.items()}
    opt = torch.optim.Adam([*A.values(), *B.values()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond_all = backbone.encode_prompts(prompts)
        x_all = backbone.encode_images(images.to(backbone.device))
    def frozen(meta: dict | None = None) -> LoRA:  # a copy the next Adam step does not change
        return LoRA({k: v.detach().clone() for k, v in A.items()}, {k: v.detach().clone() for k, v in B.items()},
                    backbone.backbone_id, meta or {})

    out, t0, paused, done_steps = [], time.perf_counter(), 0.0, 0
    if 0 in snapshots:
        out.append({"steps": 0, "wall_s": 0.0, **({"lora": frozen()} if keep_loras else {})})
    for step in range(1, steps + 1):
        # repeat the few references into a batch: more noise/timestep samples per step, same data
        idx = torch.randint(len(prompts), (batch_size,), generator=g)
        loss = fm_backward(backbone, x_all[idx], cond_all.index(idx), LoRA(A, B, backbone.backbone_id), opt, g)
        opt.step()
        done_steps = step
        if step in snapshots:
            lv = loss.item()  # waits for the device's queued work (this step's backward and Adam) before the clock
            t_stop = time.perf_counter()  # the snapshot's copy and check are off the clock
            out.append({"steps": step, "wall_s": t_stop - t0 - paused, "loss": lv, "lora": frozen()})
            done = stop is not None and stop(out[-1])
            paused += time.perf_counter() - t_stop
            if not keep_loras:
                del out[-1]["lora"]
            if done:
                break
    final = frozen({"method": "per_style", "steps": done_steps})
    return final, out
