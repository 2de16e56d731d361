"""Pretraining of the toy backbone on the toy world: content-conditioned flow matching over all training
styles, so that with no LoRA it draws the prompted content in a generic style. Toy preset only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from i2l.config import Config
from i2l.data.images import to_tensor
from i2l.data.shards import load_split
from i2l.model.flow_matching import fm_loss
from i2l.toy.backbone import ToyBackbone, build_vocab, new_toy_backbone
from i2l.train.step import TrainStep, WarmupCosine


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
    trainer = TrainStep(opt, cfg.train.grad_clip, params, WarmupCosine(opt, steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = cfg.train.backbone_batch_size
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain backbone", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (bs,), generator=g)
        x1 = images[idx]
        batch_prompts = [prompts[i] for i in idx.tolist()]
        # 10 % empty prompts teach the unconditional branch that classifier-free guidance needs
        drop = torch.rand(bs, generator=g) < 0.1
        batch_prompts = ["" if d else p for p, d in zip(batch_prompts, drop.tolist())]
        loss = fm_loss(bb, x1, bb.encode_prompts(batch_prompts), generator=g)
        trainer.backward(loss)
        rec = trainer.step(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    bb.freeze()
    out = bb.save(out_dir)
    info = {"steps": steps, "images": len(images), "seconds": time.time() - t0, **trainer.summary()}
    (out / "loss_curve.json").write_text(json.dumps(trainer.curve))
    (out / "pretrain.json").write_text(json.dumps({**info, "config": cfg.to_dict()}, indent=2))
    return {"dir": str(out), **info}
