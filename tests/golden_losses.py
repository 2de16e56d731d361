"""The golden loss file: the first training losses of every training loop on the `debug` preset, recorded once
and compared on CPU to float32 rounding (as torchtitan's loss-curve check), so a refactor that changes numbers fails.
Regenerate only when a change is meant to change numbers: `python tests/golden_losses.py` (say why in the commit)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

GOLDEN_PATH = Path(__file__).parent / "golden" / "debug_losses.json"
STEPS = 5  # per loop: enough to see the lr schedule, clipping and the optimiser at work
# Equal on one host to the last bit, but not across CPUs: on an Intel host four of the six loops each had one loss one
# float32 ulp off the file recorded on an AMD one (at most 7.7e-8 relative; oneDNN/MKL pick other kernels per
# instruction set). 5e-7 relative is ~6 ulps, and below what small real changes move (measured 2026-12-05 with
# this module: train.lr x1.1 moves the predictor's fifth loss by 3e-4 and the adapter's fourth by 1.1e-5,
# backbone_lr x1.1 the backbone's by 8e-3, weight decay 0.01 the predictor's fifth by 1.1e-6).
REL_TOL = 5e-7
# CPU matmuls reduce in another order with another thread count: the file was recorded with 2 (this machine's
# default, and CI's), and every comparison pins it, whatever an earlier test left set.
THREADS = 2


@contextlib.contextmanager
def recording_backward():
    """Record the value of every scalar loss that is backpropagated, in order: the losses each loop trains on,
    read without any help from the loop itself."""
    seen: list[float] = []
    tensor_backward, autograd_backward = torch.Tensor.backward, torch.autograd.backward

    def tb(self, *a, **kw):
        if self.dim() == 0:
            seen.append(float(self.detach()))
        return tensor_backward(self, *a, **kw)

    torch.Tensor.backward = tb
    try:
        yield seen
    finally:
        torch.Tensor.backward, torch.autograd.backward = tensor_backward, autograd_backward


def loop_losses(debug_run, tmp: Path) -> dict[str, list[float]]:
    """Run each training loop STEPS steps from the session's debug world; their losses by loop name."""
    from i2l.baselines.adapter import train_adapter
    from i2l.baselines.mean_lora import train_mean_lora
    from i2l.config import get_config
    from i2l.toy.backbone_pretrain import pretrain_backbone
    from i2l.toy.encoder_pretrain import pretrain_encoder
    from i2l.toy.scorer import pretrain_toy_clip
    from i2l.train.loop import train_predictor

    cfg = get_config("debug", {"train.steps": STEPS, "train.ckpt_every": STEPS, "scorer.pretrain_steps": STEPS})
    cfg.data_root = str(debug_run.data_root)
    cfg.backbone.path, cfg.encoder.path = debug_run.cfg.backbone.path, debug_run.cfg.encoder.path
    data = debug_run.prepared_dir
    runs = {
        "backbone": lambda: pretrain_backbone(cfg, data, tmp / "backbone", steps=STEPS, progress=False),
        "encoder": lambda: pretrain_encoder(cfg, data, tmp / "encoder", steps=STEPS, progress=False),
        "scorer": lambda: pretrain_toy_clip(cfg, data, tmp / "scorer", progress=False),
        "predictor": lambda: train_predictor(cfg, data, tmp / "predictor", progress=False),
        "mean_lora": lambda: train_mean_lora(cfg, data, tmp / "mean_lora", steps=STEPS, progress=False),
        "adapter": lambda: train_adapter(cfg, data, tmp / "adapter", steps=STEPS, progress=False),
    }
    out, before = {}, torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for name, run in runs.items():
            with recording_backward() as seen:
                run()
            out[name] = seen
    finally:
        torch.set_num_threads(before)
    return out


if __name__ == "__main__":
    import tempfile

    from conftest import build_debug_run
    from conftest_ray import ray_session  # noqa: F401

    from i2l.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as d:
        run = build_debug_run(Path(d) / "world")
        losses = loop_losses(run, Path(d) / "loops")
    GOLDEN_PATH.parent.mkdir(exist_ok=True)
    GOLDEN_PATH.write_text(json.dumps(losses, indent=1) + "\n")
    print({k: len(v) for k, v in losses.items()})
