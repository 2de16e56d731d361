"""The mean-LoRA baseline: ONE LoRA (same targets and rank as predicted ones) optimised by flow matching on
tuples from all training styles, with no references: what a single shared style LoRA achieves with the
predictor's step budget. Optimised directly as the per-style baseline is (i2l/baselines/per_style.py)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from i2l.backbones.base import Backbone
from i2l.config import Config
from i2l.io import write_text_atomic
from i2l.model.flow_matching import fm_backward, mixed_precision
from i2l.model.lora import LoRA, zero_lora
from i2l.train.step import TrainStep, WarmupCosine, step_generator, timestep_sampler

LORA_FILE = "mean_lora.safetensors"
INFO_FILE = "mean_lora.json"


def train_mean_lora(cfg: Config, data_dir: str | Path, out_dir: str | Path, steps: int | None = None,
                    progress: bool = True, device: str | None = None) -> dict:
    """cfg.train.steps x cfg.train.batch_size training tuples (targets + prompts; references unused), Adam at
    eval.mean_lora_lr with the predictor's warmup + cosine schedule; writes mean_lora.safetensors + .json."""
    from tqdm import tqdm

    from i2l.backbones import load_backbone
    from i2l.data.tuples import TupleStream, collate

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or cfg.eval.baseline_steps or cfg.train.steps
    backbone = load_backbone(cfg).to(device)
    init = zero_lora(backbone.lora_targets(), cfg.predictor.rank, backbone.backbone_id)
    A = {k: v.to(device).requires_grad_(True) for k, v in init.A.items()}  # (r, in)
    B = {k: v.to(device).requires_grad_(True) for k, v in init.B.items()}  # (out, r)
    lr = cfg.eval.mean_lora_lr
    opt = torch.optim.Adam([*A.values(), *B.values()], lr=lr)
    trainer = TrainStep(opt, schedule=WarmupCosine(opt, steps, cfg.train.warmup))  # no clipping
    stream = iter(TupleStream(data_dir, "train", cfg.predictor.max_refs, cfg.train.seed))
    bs, t0 = cfg.train.batch_size, time.time()
    timesteps = timestep_sampler(cfg, backbone)  # the predictor's law
    bar = tqdm(range(steps), desc="train mean-LoRA", disable=not progress)
    for step in bar:
        targets, prompts, _, _ = collate(list(itertools.islice(stream, bs)), cfg.backbone.image_size,
                                         cfg.encoder.image_size)
        g = step_generator(cfg.train.seed, step)  # the predictor's noise and timesteps at this step
        lora = LoRA(A, B, backbone.backbone_id)
        with mixed_precision(device, cfg.backbone.dtype), torch.no_grad():
            cond = backbone.encode_prompts(prompts)  # (B, L, E)
            x1 = backbone.encode_images(targets.to(device))
        loss = fm_backward(backbone, x1, cond, lora, opt, generator=g, timesteps=timesteps)  # one LoRA for the batch
        rec = trainer.step(loss)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
    secs = time.time() - t0
    info = {"steps": steps, "batch_size": bs, "lr": lr, "seconds": secs, **trainer.summary(),
            "backbone_id": backbone.backbone_id, "rank": cfg.predictor.rank}
    final = LoRA({k: v.detach().cpu() for k, v in A.items()}, {k: v.detach().cpu() for k, v in B.items()},
                 backbone.backbone_id, {"method": "mean_lora", "steps": steps})
    out = Path(out_dir)
    final.save(out / LORA_FILE, prefix=backbone.lora_prefix)
    record = {**info, "curve": trainer.curve, "config": cfg.to_dict()}
    write_text_atomic(out / INFO_FILE, json.dumps(record, indent=2))  # written last: marks the directory complete
    return {"dir": str(out), **info}


def load_mean_lora(out_dir: str | Path, backbone: Backbone | None = None) -> tuple[LoRA, dict]:
    """The trained mean LoRA and its info (checked against `backbone` if given)."""
    out = Path(out_dir)
    if not (out / INFO_FILE).is_file():
        raise FileNotFoundError(f"no trained mean-LoRA in {out}: run `i2l train-mean-lora --out {out}` first")
    return LoRA.load(out / LORA_FILE, backbone), json.loads((out / INFO_FILE).read_text())
