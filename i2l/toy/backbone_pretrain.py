"""Pretraining of the toy backbone on the toy world: content-conditioned flow matching over all training
styles, so that with no LoRA it draws the prompted content in a generic style. Toy preset only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from i2l.config import Config
from i2l.data.images import to_tensor
from i2l.data.shards import load_split
from i2l.model.flow_matching import fm_loss
from i2l.toy.backbone import ToyBackbone, build_vocab, new_toy_backbone


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def pretrain_backbone(cfg: Config, data_dir: str | Path, out_dir: str | Path, steps: int | None = None,
                      progress: bool = True) -> dict:
    """Train the toy backbone + its text encoder from scratch; writes a diffusers-layout directory."""
    if cfg.backbone.kind != "toy":
        raise ValueError("pretrain-backbone trains the toy backbone only; real backbones load from a local dir")
    steps = steps or cfg.train.backbone_steps
    rows = load_split(data_dir, "train", columns=("image", "content"))
    images = to_tensor(rows["images"], cfg.backbone.image_size)  # (N, 3, H, W) in [-1, 1]
    prompts = rows["content"]
    vocab = build_vocab(prompts)
    bb: ToyBackbone = new_toy_backbone(cfg.backbone, vocab, seed=cfg.train.seed)
    params = list(bb.transformer.parameters()) + list(bb.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.backbone_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = cfg.train.backbone_batch_size
    curve, t0 = [], time.time()
    bar = tqdm(range(steps), desc="pretrain backbone", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg.train.backbone_lr, max(1, steps // 20))
        idx = torch.randint(len(images), (bs,), generator=g)
        x1 = images[idx]
        batch_prompts = [prompts[i] for i in idx.tolist()]
        # 10 % empty prompts teach the unconditional branch that classifier-free guidance needs
        drop = torch.rand(bs, generator=g) < 0.1
        batch_prompts = ["" if d else p for p, d in zip(batch_prompts, drop.tolist())]
        loss = fm_loss(bb, x1, bb.encode_prompts(batch_prompts), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        curve.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bb.freeze()
    out = bb.save(out_dir)
    info = {"steps": steps, "images": len(images), "seconds": time.time() - t0,
            "first_loss": sum(c["loss"] for c in curve[:20]) / min(20, len(curve)),
            "last_loss": sum(c["loss"] for c in curve[-20:]) / min(20, len(curve))}
    (out / "loss_curve.json").write_text(json.dumps(curve))
    (out / "pretrain.json").write_text(json.dumps({**info, "config": cfg.to_dict()}, indent=2))
    return {"dir": str(out), **info}
