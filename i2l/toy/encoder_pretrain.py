"""Pretraining of the toy image encoder: a tiny SiglipVisionModel learns, with SigLIP's sigmoid loss, to match
toy images to their style descriptions (images of one style are all positives), so its patch tokens see style.
Toy preset only; real presets load a frozen SigLIP2 from a local directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from i2l.config import Config
from i2l.data.images import to_tensor
from i2l.data.shards import load_split
from i2l.io import atomic_files
from i2l.model.encoder import ImageEncoder
from i2l.toy.encoder import new_toy_encoder
from i2l.toy.words import tokenize_words
from i2l.train.step import TrainStep
from i2l.train.threads import torch_threads


class BagOfWords(nn.Module):
    """The throwaway text tower: mean word embedding of a style description."""

    def __init__(self, vocab: list[str], dim: int):
        super().__init__()
        self.index = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.EmbeddingBag(len(vocab), dim, mode="mean")

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids.extend(self.index[w] for w in tokenize_words(t) if w in self.index)
        return self.embed(torch.tensor(ids), torch.tensor(offsets))  # (B, D)


def pretrain_encoder(cfg: Config, data_dir: str | Path, out_dir: str | Path, steps: int | None = None,
                     progress: bool = True) -> dict:
    if cfg.encoder.kind != "toy":
        raise ValueError("pretrain-encoder trains the toy encoder only; real presets load SigLIP2 from a local dir")
    # steps = 0 writes the frozen RANDOM encoder (the ablation: does the toy encoder need training?)
    steps = cfg.encoder.pretrain_steps if steps is None else steps
    rows = load_split(data_dir, "train", columns=("image", "style"))
    images = to_tensor(rows["images"], cfg.encoder.image_size)  # (N, 3, S, S)
    styles = rows["style"]
    style_ids = {s: i for i, s in enumerate(sorted(set(styles)))}
    labels = torch.tensor([style_ids[s] for s in styles])
    vocab = sorted({w for s in style_ids for w in tokenize_words(s)})
    enc = new_toy_encoder(cfg.encoder, seed=cfg.train.seed)
    vision = enc.model
    vision.train()
    vision.requires_grad_(True)
    text = BagOfWords(vocab, cfg.encoder.hidden)
    t_scale, t_bias = nn.Parameter(torch.tensor(2.3)), nn.Parameter(torch.tensor(-5.0))  # SigLIP's init
    params = [*vision.parameters(), *text.parameters(), t_scale, t_bias]
    opt = torch.optim.AdamW(params, lr=2e-3)
    trainer = TrainStep(opt)  # constant lr, no clipping
    g = torch.Generator().manual_seed(cfg.train.seed)
    t0 = time.time()
    with torch_threads(cfg.encoder.pretrain_threads):
        bar = tqdm(range(steps), desc="pretrain encoder", disable=not progress)
        for step in bar:
            idx = torch.randint(len(images), (64,), generator=g)
            x = images[idx]
            # light augmentation: flips keep style and change layout, so the encoder cannot key on content
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            img = F.normalize(vision(pixel_values=x).pooler_output, dim=-1)  # (B, D)
            txt = F.normalize(text([styles[i] for i in idx.tolist()]), dim=-1)  # (B, D)
            logits = img @ txt.t() * t_scale.exp() + t_bias  # (B, B)
            same = labels[idx][:, None] == labels[idx][None, :]
            loss = -F.logsigmoid(torch.where(same, logits, -logits)).mean()
            trainer.backward(loss)
            rec = trainer.step(loss)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
    vision.eval()
    out = Path(out_dir)
    info = {"steps": steps, "seconds": time.time() - t0, **trainer.summary(10, 10)}
    with atomic_files(out) as tmp:  # a kill mid-save leaves no half-written file at a final name
        vision.save_pretrained(tmp, safe_serialization=True)
        (tmp / "encoder.json").write_text(json.dumps({"kind": "toy", "image_size": cfg.encoder.image_size, **info}))
    return {"dir": str(out), **info}


def style_retrieval_accuracy(enc: ImageEncoder, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Nearest-neighbour style accuracy of mean-pooled patch tokens: does the encoder see style?"""
    with torch.no_grad():
        e = F.normalize(enc(images).mean(1), dim=-1)  # (N, D)
    sim = e @ e.t()
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1)] == labels).float().mean())
