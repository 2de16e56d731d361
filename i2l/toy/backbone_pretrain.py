"""Pretraining of the toy backbone on the toy world: text-conditioned flow matching over all training styles, so
that with a content prompt and no LoRA it draws the prompted content in a generic style, and with the style's words
added (train.backbone_styled of the prompts) that style's look. Toy preset only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from i2l.config import Config
from i2l.data.images import to_tensor
from i2l.data.shards import load_split
from i2l.io import write_text_atomic
from i2l.model.flow_matching import fm_loss
from i2l.toy.backbone import ToyBackbone, new_toy_backbone
from i2l.toy.words import build_vocab, tokenize_words
from i2l.toy.world import MEDIA, MOODS
from i2l.train.step import TrainStep, WarmupCosine

# Words of the toy world's style template that say nothing about how an image looks: a styled prompt keeps the
# rest ("cream navy cream fine pink polka dots navy thin black grainy"), in order, so colours keep their roles.
_TEMPLATE_WORDS = frozenset(["in", "the", "style", "of", "a", "and", "palette", "background", "with", "solid", "shapes", "outlines", "finish", "to"])


def style_words(description: str) -> str:
    """A style description shortened to the words that change pixels (mood and medium words change none)."""
    skip = _TEMPLATE_WORDS | set(MOODS) | set(MEDIA)
    return " ".join(w for w in tokenize_words(description) if w not in skip)


def pretrain_backbone(cfg: Config, data_dir: str | Path, out_dir: str | Path, steps: int | None = None,
                      progress: bool = True) -> dict:
    """Train the toy backbone + its text encoder from scratch; writes a diffusers-layout directory."""
    if cfg.backbone.kind != "toy":
        raise ValueError("pretrain-backbone trains the toy backbone only; real backbones load from a local dir")
    steps = steps or cfg.train.backbone_steps
    rows = load_split(data_dir, "train", columns=("image", "content", "style"))
    images = to_tensor(rows["images"], cfg.backbone.image_size)  # (N, 3, H, W) in [-1, 1]
    prompts = rows["content"]
    # (cut to the words the text encoder takes: the style words come last and matter least there)
    styled = [" ".join(tokenize_words(f"{c} {style_words(s)}")[: cfg.backbone.max_text_tokens])
              for c, s in zip(prompts, rows["style"])]
    vocab = build_vocab(prompts + (styled if cfg.train.backbone_styled > 0 else []))
    bb: ToyBackbone = new_toy_backbone(cfg.backbone, vocab, seed=cfg.train.seed)
    params = list(bb.transformer.parameters()) + list(bb.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.backbone_lr, weight_decay=0.0)
    trainer = TrainStep(opt, cfg.train.grad_clip, params, WarmupCosine(opt, steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(cfg.train.seed)
    bs = cfg.train.backbone_batch_size
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain backbone", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (bs,), generator=g).tolist()
        u = torch.rand(bs, generator=g).tolist()
        # 10 % empty prompts teach the unconditional branch that classifier-free guidance needs; a share of the
        # rest names the style too (train.backbone_styled), the others are the content prompts sampling uses
        batch_prompts = ["" if v < 0.1 else styled[i] if v < 0.1 + 0.9 * cfg.train.backbone_styled else prompts[i]
                         for i, v in zip(idx, u)]
        loss = fm_loss(bb, images[idx], bb.encode_prompts(batch_prompts), generator=g)
        trainer.backward(loss)
        rec = trainer.step(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    bb.freeze()
    out = bb.save(out_dir)
    info = {"steps": steps, "images": len(images), "seconds": time.time() - t0, **trainer.summary()}
    write_text_atomic(out / "loss_curve.json", json.dumps(trainer.curve))
    write_text_atomic(out / "pretrain.json", json.dumps({**info, "config": cfg.to_dict()}, indent=2))
    return {"dir": str(out), **info}
