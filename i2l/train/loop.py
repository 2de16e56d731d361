"""Training the i2L predictor by flow matching THROUGH the frozen backbone (paper §3.2): only the predictor
learns. Plain PyTorch: data parallelism (DDP) is applied from outside by the launcher through `wrap_model`.
Checkpoints: safetensors weights + optimizer state + config, every K steps and at the end; resumable exactly."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from i2l.backbones import load_backbone
from i2l.backbones.base import Cond
from i2l.config import Config
from i2l.data.images import decode, to_tensor
from i2l.data.tuples import StyleTuple, TupleStream, collate_group_sets, collate_groups
from i2l.model.encoder import FrozenCache, load_encoder
from i2l.model.flow_matching import fm_backward, mixed_precision
from i2l.model.predictor import I2LPredictor, lora_from_tokens, predict_lora
from i2l.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    refuse_mixing_runs,
    resolve_checkpoint,
    save_checkpoint,
)
from i2l.train.curve import loss_summary
from i2l.train.step import TrainStep, WarmupCosine, step_generator, timestep_sampler


@dataclass
class World:
    """Where this worker stands in data-parallel training."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"


def build_predictor(cfg: Config, backbone, encoder) -> I2LPredictor:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every fresh run
    return I2LPredictor(cfg.predictor, backbone.lora_targets(), encoder.dim, backbone.backbone_id)


def train_predictor(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
                    world: World | None = None, wrap_model: Callable | None = None,
                    report: Callable[[dict], None] | None = None, progress: bool = True,
                    stop_after: int | None = None) -> dict:
    """Train for cfg.train.steps (from the latest checkpoint with resume=True). Rank 0 writes the checkpoints.

    stop_after: leave after this many steps of this call (for tests of kill/resume; a real kill works too)."""
    world = world or World()
    device = torch.device(world.device)
    out = Path(out_dir)
    refuse_mixing_runs(out, resume, cfg)  # before any model is built: a clear message, not a shape error
    backbone = load_backbone(cfg).to(device)
    encoder = load_encoder(cfg.encoder).to(device)
    predictor = build_predictor(cfg, backbone, encoder).to(device)
    opt = torch.optim.AdamW(predictor.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start, curve = 0, []
    if resume and latest_checkpoint(out) is not None:
        ck = resolve_checkpoint(out)  # the newest intact step; a broken newer one is warned about and retrained
        start, curve = load_checkpoint(ck, predictor, opt, backbone, cfg)
        for group in opt.param_groups:  # a checkpoint from before the lr scheduler; the lr is cfg's (same run)
            group.setdefault("initial_lr", cfg.train.lr)
        print(f"resuming from {ck} at step {start}")
    steps = cfg.train.steps
    trainer = TrainStep(opt, cfg.train.grad_clip, predictor.parameters(),
                        WarmupCosine(opt, steps, cfg.train.warmup, start=start), start=start, curve=curve)
    model = wrap_model(predictor) if wrap_model else predictor
    timesteps = timestep_sampler(cfg, backbone)
    if device.type == "cuda":
        backbone.transformer.enable_gradient_checkpointing()  # memory: recompute blocks in backward
    stream = TupleStream(data_dir, "train", cfg.predictor.max_refs, cfg.train.seed, world.rank, world.size,
                         targets_per_lora=cfg.train.targets_per_lora)
    bs = cfg.train.batch_size // world.size  # train.batch_size is the global batch
    if bs < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is the global batch: it must be at least "
                         f"train.num_workers={world.size} (one target per worker)")
    batches = _batches(stream, bs)
    for _ in range(start):  # skip what earlier runs consumed: identical data order after a resume
        next(batches)
    caches = FrozenCaches.build(cfg, backbone, encoder) if cfg.train.cache_frozen else None
    from tqdm import tqdm

    t0, done = time.time(), 0
    bar = tqdm(range(start, steps), desc="train i2L", initial=start, total=steps,
               disable=not progress or world.rank != 0)
    for step in bar:
        g = step_generator(cfg.train.seed, step, world.rank)
        x1, cond, lora, n_refs = conditioned_batch(cfg, next(batches), backbone, encoder, model, device, caches)
        loss = fm_backward(backbone, x1, cond, lora, opt, generator=g, timesteps=timesteps)  # backward: no autocast
        rec = trainer.step(loss, n_refs_mean=float(n_refs.float().mean()))
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        done += 1
        if world.rank == 0 and ((step + 1) % cfg.train.ckpt_every == 0 or step + 1 == steps):
            save_checkpoint(out, step + 1, predictor, opt, backbone, encoder, cfg, curve)
        if report:
            report(rec)  # after the save: a reporter that stops the run never loses this step's checkpoint
        if stop_after is not None and done >= stop_after:
            break
    secs = time.time() - t0
    cache_stats = caches.stats() if caches else {}
    return {"out_dir": str(out), "steps": start + done, "seconds": secs, "steps_per_s": done / max(secs, 1e-9),
            **loss_summary(curve), **cache_stats}


@dataclass
class FrozenCaches:
    """What training keeps of its frozen models' outputs (train.cache_frozen): the reference encoder's tokens by
    reference row id and the text encoder's conditioning by prompt, each a bounded LRU bound to those weights."""

    refs: FrozenCache
    prompts: FrozenCache
    text_model: torch.nn.Module | None  # the weights the prompt conditioning comes from (None: not a module)

    @classmethod
    def build(cls, cfg: Config, backbone, encoder) -> FrozenCaches:
        text = getattr(backbone, "text_encoder", None)
        text = text if isinstance(text, torch.nn.Module) else None
        return cls(FrozenCache(encoder, cfg.train.cache_mb), FrozenCache(text, cfg.train.cache_mb), text)

    def encode_prompts(self, backbone, prompts: list[str]) -> Cond:
        """backbone.encode_prompts(prompts), each distinct prompt encoded once per run (while it stays cached)."""
        self.prompts.check(self.text_model)
        values = self.prompts.held(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in values]
        if missing:
            cond = backbone.encode_prompts(missing)
            self.prompts.calls += 1
            for i, p in enumerate(missing):
                values[p] = self.prompts.put(p, cond.index(slice(i, i + 1)))
        return Cond.cat([values[p] for p in prompts])

    def stats(self) -> dict:
        return {f"cache_{name}_{k}": v for name, c in (("refs", self.refs), ("prompts", self.prompts))
                for k, v in c.stats().items()}


def conditioned_batch(cfg: Config, tuples: list[StyleTuple], backbone, encoder, model, device: torch.device,
                      caches: FrozenCaches | None = None):
    """One training batch through the frozen models and the predictor: -> x1 (B, ...) latents, the prompts'
    conditioning, the batched LoRA (one per target: G targets share one predicted LoRA), n_refs (U,).
    With caches, references and prompts seen before are neither decoded nor encoded again (same values)."""
    with mixed_precision(device, cfg.backbone.dtype):
        if caches is None:
            targets, prompts, refs, n_refs, owner = collate_groups(tuples, cfg.backbone.image_size,
                                                                   cfg.encoder.image_size)
            with torch.no_grad():
                cond = backbone.encode_prompts(prompts)  # frozen text encoder
                x1 = backbone.encode_images(targets.to(device))
            lora = predict_lora(model, encoder, refs.to(device), n_refs)
        else:
            targets, prompts, sets, owner = collate_group_sets(tuples, cfg.backbone.image_size)
            with torch.no_grad():
                cond = caches.encode_prompts(backbone, prompts)
                x1 = backbone.encode_images(targets.to(device))
            tokens = reference_tokens(cfg, encoder, sets, device, caches.refs)
            n_refs = torch.tensor([len(s) for s in sets])
            lora = lora_from_tokens(model, *tokens)
    return x1, cond, lora.per_sample(owner), n_refs  # (U) -> (B); owner stays on the CPU


def reference_tokens(cfg: Config, encoder, sets: list[list[tuple]], device: torch.device, cache: FrozenCache | None):
    """The frozen encoder's tokens of U reference sets of (row id, encoded image): only the images the cache
    lacks are decoded and encoded. -> tokens (U, S, D), keep (U, S), ref_index (U, S), as `encode_refs`."""
    images = dict(pair for s in sets for pair in s)
    load = lambda ids: to_tensor([decode(images[i]) for i in ids], cfg.encoder.image_size).to(device)
    return encoder.encode_ref_sets([[i for i, _ in s] for s in sets], load, cache)


def _batches(stream: TupleStream, bs: int):  # (the train-cache bench reads batches as training does)
    it = iter(stream)
    while True:
        yield list(itertools.islice(it, bs))


def write_run_info(out_dir: str | Path, info: dict) -> None:
    Path(out_dir, "train.json").write_text(json.dumps(info, indent=2))
