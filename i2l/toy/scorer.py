"""The toy scorer: a tiny open_clip CLIP trained on toy images <-> content prompts and style descriptions,
so CLIP-Text / CLIP-Style mean something in the toy world and run through the same open_clip code as ViT-H-14.
Independent of the model under test: it sees only dataset rows, never generated images or the predictor."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from i2l.config import Config
from i2l.config.sections import TOY_CLIP_NAME
from i2l.eval.metrics.clip import WEIGHTS_FILE, register_model_config
from i2l.io import atomic_path, write_text_atomic
from i2l.layout import SCORER_FILE
from i2l.train.curve import loss_summary
from i2l.train.step import TrainStep
from i2l.train.threads import torch_threads

SCORER_VERSION = "1"


def toy_clip_config(image_size: int = 32) -> dict:
    """open_clip model config of the toy CLIP (~3.4 M params, 3.2 M of them the BPE token embedding).

    Patches of side/4 pixels (16 tokens): side/8 patches cost twice the time and scored no better in trials.
    The text tower dominates a step, so its context is just long enough for toy style descriptions (<= 45 BPE
    tokens); longer texts are truncated, as CLIP truncates at 77.
    """
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": image_size, "layers": 3, "width": 64, "head_width": 32,
                       "mlp_ratio": 2.0, "patch_size": max(image_size // 4, 1)},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    }


def read_caption_rows(data_dir: str | os.PathLike, split: str = "train", max_rows: int | None = None) -> list[dict]:
    """Rows {id, image (encoded bytes), content, style} for training (or checking) the scorer.

    Accepts a prepared dir (`<split>/part-*.parquet`, binary `image`; the train split for training, so held-out
    styles stay unseen) or a raw MegaStyle-layout dir (`train-*.parquet`, `image` = struct{bytes, path}; it has
    no val split). `image.path` is never opened. Reads row group by row group and stops at `max_rows`.
    """
    root = Path(data_dir)
    files = sorted(glob.glob(str(root / split / "part-*.parquet")))
    prepared = bool(files) or (root / "train").is_dir()
    if not prepared and split == "train":
        files = sorted(glob.glob(str(root / "train-*.parquet")))
    if not files:
        if split != "train":
            return []
        raise FileNotFoundError(
            f"no training shards in {root}: expected a prepared dir (train/part-*.parquet, from `i2l prepare`) "
            f"or a MegaStyle-layout dir (train-*.parquet, e.g. from `i2l toyworld`)")
    rows: list[dict] = []
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("id", "image", "content", "style") if c in pf.schema_arrow.names]
        if len(cols) < 4:
            raise ValueError(f"{f} lacks columns {sorted({'id', 'image', 'content', 'style'} - set(cols))}")
        for g in range(pf.num_row_groups):
            for r in pf.read_row_group(g, columns=cols).to_pylist():
                img = r["image"] if prepared else (r["image"] or {}).get("bytes")
                if img and r["content"] and r["style"]:
                    rows.append({"id": r["id"], "image": img, "content": r["content"], "style": r["style"]})
                if max_rows and len(rows) >= max_rows:
                    return rows
    return rows


def pair_accuracy(clip, rows: list[dict], batch_size: int = 256) -> dict[str, float]:
    """How often an image scores higher against its own text than against a wrong one (chance: 0.5).

    For every image and every *distinct* wrong text of the set (content prompts, resp. style descriptions),
    counts own > wrong; also top-1 retrieval accuracy among all distinct texts. `clip` is a ClipModel.
    """
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    img = clip.encode_images(images, batch_size)  # (M, D)
    out = {}
    for key, metric in (("content", "text"), ("style", "style")):
        texts = sorted({r[key] for r in rows})
        labels = torch.tensor([texts.index(r[key]) for r in rows])  # (M,)
        sim = img @ clip.encode_texts(texts).T  # (M, U)
        own = sim.gather(1, labels[:, None])  # (M, 1)
        wrong = torch.ones_like(sim, dtype=torch.bool).scatter_(1, labels[:, None], False)  # (M, U)
        out[f"{metric}_pair_acc"] = float(((sim < own) & wrong).sum() / wrong.sum().clamp(min=1))
        out[f"{metric}_top1"] = float((sim.argmax(1) == labels).float().mean())
    return out


def data_hash(rows: list[dict]) -> str:
    """Fingerprint of the training rows (ids, texts and image bytes), recorded in scorer.json."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r["id"].encode())
        h.update(hashlib.sha256(r["image"]).digest())
        h.update(r["content"].encode())
        h.update(r["style"].encode())
    return h.hexdigest()


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where several images may share one text.

    img (B, D) and txt (U, D) are L2-normalised, txt holds the batch's *unique* texts and labels (B,) gives each
    image's text. Unlike `open_clip.ClipLoss`, images with the same caption are not treated as negatives
    (80 content prompts and 8 images per style make such duplicates common in a toy batch).
    """
    logits = logit_scale * img @ txt.T  # (B, U)
    i2t = F.cross_entropy(logits, labels)
    pos = F.one_hot(labels, txt.shape[0]).T.float()  # (U, B)
    t2i = -((pos / pos.sum(1, keepdim=True)) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def _unique_labels(texts: list[str], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into `vocab` of the batch's unique texts (U,) and each item's position among them (B,)."""
    ids = np.array([vocab[t] for t in texts])
    uniq, inv = np.unique(ids, return_inverse=True)
    return torch.from_numpy(uniq), torch.from_numpy(inv)


@contextmanager
def _quiet_random_init():
    """Drops open_clip's root-logger warning that a model without `pretrained` was "initialized randomly"."""
    root = logging.getLogger()
    root.addFilter(_random_init_dropped)
    try:
        yield
    finally:
        root.removeFilter(_random_init_dropped)


def _random_init_dropped(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


def pretrain_toy_clip(cfg: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      progress: bool = True) -> dict:
    """Train the toy CLIP on `data_dir` rows and write model.safetensors, the model config and scorer.json."""
    import open_clip
    from safetensors.torch import save_file

    sc = cfg.scorer
    t0 = time.time()
    torch.manual_seed(sc.seed)
    rng = np.random.default_rng(sc.seed)
    rows = read_caption_rows(data_dir, "train", max_rows=sc.pretrain_max_rows)
    if len(rows) < 2:
        raise ValueError(f"need at least 2 training rows in {data_dir}, found {len(rows)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{TOY_CLIP_NAME}.json"
    write_text_atomic(config_path, json.dumps(toy_clip_config(sc.image_size), indent=2))
    register_model_config(config_path)
    with _quiet_random_init():  # random is the point here: pretraining starts from scratch
        model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    with torch_threads(sc.pretrain_threads):
        curve, heldout = _train(model, tokenizer, preprocess, rows, data_dir, sc, rng, progress)

    weights_path = out / WEIGHTS_FILE
    with atomic_path(weights_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    styles, contents = {r["style"] for r in rows}, {r["content"] for r in rows}
    summary = loss_summary(curve, first=1, last=10)
    info = {
        "name": TOY_CLIP_NAME, "version": SCORER_VERSION, "model": TOY_CLIP_NAME, "preset": cfg.name,
        "steps": sc.pretrain_steps, "batch_size": min(sc.pretrain_batch_size, len(rows)), "rows": len(rows),
        "styles": len(styles), "contents": len(contents), "data_hash": data_hash(rows), "data_dir": str(data_dir),
        "first_loss": summary["first_loss"], "final_loss": summary["last_loss"],
        "heldout": heldout, "seconds": round(time.time() - t0, 2),
    }
    write_text_atomic(out / SCORER_FILE, json.dumps(info, indent=2))
    return info


def _train(model, tokenizer, preprocess, rows, data_dir, sc, rng, progress):
    """The contrastive loop; returns the loss curve and, for a prepared dir, held-out pair accuracy."""
    from tqdm import tqdm

    from i2l.eval.metrics.clip import ClipModel, resolve_device

    device = resolve_device(sc.device)
    model.to(device)

    # Decode once through the same preprocessing the scorer uses at evaluation time.
    images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB"))
                          for r in tqdm(rows, desc="scorer: decode", unit="img", disable=not progress)])  # (M,3,H,W)
    images = images.to(device)
    texts = sorted({r["content"] for r in rows} | {r["style"] for r in rows})
    vocab = {t: i for i, t in enumerate(texts)}
    tokens = tokenizer(texts).to(device)  # (V, context_length)
    contents = [r["content"] for r in rows]
    styles = [r["style"] for r in rows]

    model.train()
    params = list(model.parameters())
    # as open_clip's trainer: no weight decay on gains, biases, embeddings and the temperature
    decay = [p for p in params if p.ndim >= 2 and p is not model.positional_embedding]
    rest = [p for p in params if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=sc.pretrain_lr)
    steps, bs, warmup = sc.pretrain_steps, min(sc.pretrain_batch_size, len(rows)), max(sc.pretrain_steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    trainer = TrainStep(opt, grad_clip=1.0, params=params, schedule=sched)
    order, pos = rng.permutation(len(rows)), 0
    bar = tqdm(range(steps), desc="scorer: train", unit="step", disable=not progress)
    for _ in bar:
        if pos + bs > len(order):
            order, pos = rng.permutation(len(rows)), 0
        idx = order[pos:pos + bs]
        pos += bs
        c_uniq, c_lab = (t.to(device) for t in _unique_labels([contents[i] for i in idx], vocab))
        s_uniq, s_lab = (t.to(device) for t in _unique_labels([styles[i] for i in idx], vocab))
        img = model.encode_image(images[idx], normalize=True)  # (B, D)
        txt = model.encode_text(tokens[torch.cat([c_uniq, s_uniq])], normalize=True)  # (Uc+Us, D)
        scale = model.logit_scale.exp()
        loss = (sc.content_weight * multi_positive_clip_loss(img, txt[:len(c_uniq)], c_lab, scale)
                + (1 - sc.content_weight) * multi_positive_clip_loss(img, txt[len(c_uniq):], s_lab, scale))
        trainer.backward(loss)
        rec = trainer.step(loss)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer does
        bar.set_postfix(loss=f"{rec['loss']:.3f}")

    model.eval()
    heldout = None
    val_rows = read_caption_rows(data_dir, "val", max_rows=512)
    if val_rows:  # a prepared dir: check the scorer on styles it never saw
        clip = ClipModel(model, tokenizer, preprocess, device, TOY_CLIP_NAME, SCORER_VERSION)
        heldout = {"rows": len(val_rows), **pair_accuracy(clip, val_rows)}
    return trainer.curve, heldout

