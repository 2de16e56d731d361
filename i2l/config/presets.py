"""Named presets: `debug` (tests, seconds), `toy` (embedded default, minutes), `klein4b`, `zimage`, `hidream_o1` (real
checkpoints from local directories, named by environment variables)."""

from __future__ import annotations

import os

from i2l.config.sections import (
    BackboneConfig,
    Config,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    PredictorConfig,
    ProduceConfig,
    ScorerConfig,
    ToyWorldConfig,
    TrainConfig,
)

# Flux2 LoRA targets (diffusers' module names): attention projections and MLPs of double and single blocks.
# Source: no published code or text gives the FLUX.2 i2L's targets (the paper names none; the authors' v2 network,
# model.py, is fetched from the ModelScope model repo at run time by diffsynth/diffusion/template.py and is not in
# DiffSynth-Studio). These are the FLUX.2 counterpart of the authors' only published i2L targets (v1 Z-Image,
# diffsynth/models/z_image_image2lora.py: every attention q/k/v/out and feed-forward linear of every block): all
# 12 linears of each double block and both of each single block (`to_qkv_mlp_proj` fuses q, k, v and the MLP
# input), named as diffusers' Flux2Transformer2DModel names them (NOTES.md) -> L = 5·12 + 20·2 = 100 layers.
FLUX2_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "attn.to_out",
)
# Z-Image LoRA targets, as the authors' v1 release adapts them.
ZIMAGE_TARGETS = (
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
)
# HiDream-O1 LoRA targets, named as DiffSynth's HiDreamO1ImageModel names them: attention q/k/v/o and the gated MLP
# of each Qwen3-VL decoder layer (model.language_model.layers.*), the counterpart of ZIMAGE_TARGETS (the released
# HidreamO1-i2L-v2's own set is not readable here). The vision tower (`attn.qkv`, `mlp.linear_fc*`) is not
# matched: text-to-image sampling never runs it. 36 layers x 7 = 252 adapted layers.
HIDREAM_O1_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def _toy() -> Config:
    # What `make run` trains, sized from measurements on 2 CPU cores (docs/results.md, "Which training recipe does
    # `make run` use, and why?"): i2L's held-out loss is limited by gradient noise, so the batch is what buys quality
    # — 64 targets (16 styles) per step on 2000 styles, 600 steps (against 500: −10.7 against −10.2 % held-out on
    # two seeds, both gaining; docs/results.md, make-run section, 2026-12-07). One Ray Train worker of two threads,
    # not two DDP workers of one: two 1-thread processes do ~1.2x the work, but each carries its own torch, and
    # make run's peak memory (PSS summed over all processes) fell from 4.5 to 3.9 GB for 39 s more training. The
    # mean-LoRA and adapter baselines train side by side (one in the evaluating process, one on a Ray worker) for
    # 100 steps at the predictor's batch: at its 600 they would cost more than the predictor, for a held-out loss
    # that moved < 1 % of base between 100 and 250 steps.
    # The toy backbone learns styles as a text-to-image model does: half its pretraining prompts also name the
    # style's look (train.backbone_styled; its context stays 12 tokens), and its tokens carry their position
    # (backbone.position_channels: 5 % lower pretraining loss at the same cost, docs/results.md), with cos / sin at
    # periods of 2, 4 and 8 tokens (backbone.position_octaves: in 1200 steps, figures with their corners and points
    # as 2400 steps drew without them, and a base held-out loss 6.7 % lower; docs/results.md). It pretrains at
    # lr 8e-3: over the same 800 steps its loss ends 15 % lower than at 2e-3 (4e-3: 12 %, 1.6e-2: 8 %), and for
    # 1200 steps (12 % lower again): it draws the prompted figures and their outlines instead of blobs
    # (docs/results.md, "How fast does the toy backbone learn?"). Every trainer draws t uniformly: the held-out FM
    # loss averages a uniform grid of t, and each method does better on it by that law than by logit-normal (on one
    # host and toy backbone: i2L -10.4 vs -9.7 %, per-style@25 -20.7 vs -18.1 %; docs/results.md, the make-run section).
    # The predictor is one block of width 64 (the default: two of 96): on make run's data its held-out loss is the
    # same within seed noise (-12.0 % against -12.4 %), and its forward, what each produced LoRA costs and what the
    # amortization bench divides by, takes half the time (1.3 against 2.7 ms per style, 16 styles batched).
    return Config(name="toy", toyworld=ToyWorldConfig(styles=2000),
                  predictor=PredictorConfig(hidden=64, depth=1),
                  backbone=BackboneConfig(targets=FLUX2_TARGETS, max_text_tokens=24, text_context_tokens=12,
                                          position_channels=True, position_octaves=3),
                  train=TrainConfig(steps=600, batch_size=64, num_workers=1, backbone_styled=0.5, backbone_lr=8e-3,
                                    backbone_steps=1200, timesteps="uniform"),
                  # per-style LoRAs at each budget's best rate of 2.5e-3 / 5e-3 / 1e-2 / 2e-2 (docs/results.md)
                  eval=EvalConfig(baseline_workers=2, baseline_steps=100,
                                  lora_lr_by_budget=("5:1e-2", "25:5e-3", "100:2.5e-3")))


def _debug() -> Config:
    # Seconds, for tests: few styles, tiny models, a handful of steps.
    return Config(
        name="debug",
        toyworld=ToyWorldConfig(styles=12, size=32, rows_per_shard=40),
        data=DataConfig(resolution=32, val_fraction=0.25, val_samples=6, rows_per_shard=32,
                        row_group_rows=16, batch_size=16, concurrency=1),
        backbone=BackboneConfig(dim=32, heads=2, double_layers=1, single_layers=1, text_dim=32,
                                targets=FLUX2_TARGETS),
        encoder=EncoderConfig(hidden=32, layers=1, heads=2, pretrain_steps=10),
        predictor=PredictorConfig(rank=2, hidden=32, depth=1, heads=2, compress=8, max_refs=3),
        train=TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup=2, ckpt_every=10,
                          backbone_steps=20, backbone_batch_size=16),
        eval=EvalConfig(styles=3, sample_steps=4, fm_timesteps=3, fm_noise_seeds=1, optimize_budgets=(2, 5)),
        scorer=ScorerConfig(pretrain_steps=10),
    )


def _klein4b() -> Config:
    # FLUX.2-klein 4B from a local directory (diffusers layout); 1024^2 like the paper.
    return Config(
        name="klein4b",
        # val_fraction 0.01 of MegaStyle-1.4M's ~175k styles = ~1.75k held-out styles >= the paper's 1,000 samples
        data=DataConfig(resolution=1024, val_fraction=0.01, val_samples=1000, rows_per_shard=2048,
                        row_group_rows=64, image_format="jpeg", batch_size=32, concurrency=8, min_side=256),
        backbone=BackboneConfig(kind="flux2", path=os.environ.get("I2L_KLEIN4B_DIR", ""), image_size=1024,
                                targets=FLUX2_TARGETS, dtype="bfloat16"),
        encoder=EncoderConfig(kind="siglip2", path=os.environ.get("I2L_SIGLIP2_DIR", ""), image_size=512),
        # rank 8: not published for FLUX.2 (see FLUX2_TARGETS); i2l's choice, so that the predictor's 2·k·L queries
        # (2·8·100 = 1,600) match the authors' Z-Image setting (rank 4 × 238 layers = 1,904 queries; v1 code).
        # max_refs 4: the paper's evaluation and the authors' examples use 4 references.
        predictor=PredictorConfig(rank=8, hidden=1024, depth=8, heads=16, compress=64, max_refs=4),
        # the paper: global batch 8 on 8 GPUs, lr 1e-5. One target per reference set: next to a 2-4B backbone the
        # predictor is cheap, so grouping targets would only cut the reference sets seen per step. The authors'
        # release (DiffSynth-Studio: diffsynth/diffusion/flow_match.py, loss.py, parsers.py): t drawn uniformly from
        # the backbone's own shifted 1000-point grid, loss weighted by a Gaussian over t, AdamW weight decay 0.01.
        train=TrainConfig(steps=200_000, batch_size=8, targets_per_lora=1, lr=1e-5, warmup=1000, ckpt_every=2000,
                          num_workers=8, use_gpu=True, timesteps="backbone", loss_weighting="gaussian",
                          weight_decay=0.01,
                          # 1.4M references rarely repeat within a run: a frozen-token cache would hold memory on the
                          # GPU for few hits (the toy world's ~90 % hit rate is what pays there)
                          cache_frozen=False),
        # per-style / mean LoRAs: the 1e-4 .. 3e-4 that FLUX.2-klein LoRA trainers use at ranks 8-64 (toy's 5e-3
        # would be ~20x too high on a 4B backbone); not yet tuned on real weights
        # gray negative from as many gray images as references: the authors' release (examples/flux2/
        # model_inference/KleinBase4B-i2L-v2.py, negative_template_inputs)
        eval=EvalConfig(styles=1000, guidance=4.0, sample_steps=28, lora_lr=3e-4, mean_lora_lr=3e-4,
                        gray_negative="per_reference"),
        # workers=1: each configured scorer in its own Ray actor (one model per actor, a GPU each on cuda)
        scorer=ScorerConfig(clip_model="ViT-H-14", clip_checkpoint=os.environ.get("I2L_CLIP_CKPT", ""), workers=1),
        produce=ProduceConfig(workers=8, batch_size=16, num_gpus=1.0),
    )


def _zimage() -> Config:
    cfg = _klein4b()
    cfg.name = "zimage"
    cfg.backbone = BackboneConfig(kind="zimage", path=os.environ.get("I2L_ZIMAGE_DIR", ""), image_size=1024,
                                  targets=ZIMAGE_TARGETS, dtype="bfloat16")
    # rank 4: the authors' v1 Z-Image i2L (diffsynth/models/z_image_image2lora.py); targets: ZIMAGE_TARGETS
    cfg.predictor = PredictorConfig(rank=4, hidden=1024, depth=8, heads=16, compress=64, max_refs=4)
    return cfg


def _hidream_o1() -> Config:
    cfg = _klein4b()
    cfg.name = "hidream_o1"
    # HiDream-O1-Image (the undistilled "full" model) from a local copy of its published directory; 1024² as the
    # other backbones are trained (its pipeline defaults to 2048²)
    cfg.backbone = BackboneConfig(kind="hidream_o1", path=os.environ.get("I2L_HIDREAM_O1_DIR", ""), image_size=1024,
                                  targets=HIDREAM_O1_TARGETS, dtype="bfloat16")
    # rank 4 as the Z-Image i2L: 2·4·252 = 2,016 queries
    cfg.predictor = PredictorConfig(rank=4, hidden=1024, depth=8, heads=16, compress=64, max_refs=4)
    cfg.eval.sample_steps = 50  # HiDreamO1ImagePipeline's num_inference_steps (cfg_scale 4.0 = eval.guidance)
    return cfg


PRESETS = {"debug": _debug, "toy": _toy, "klein4b": _klein4b, "zimage": _zimage, "hidream_o1": _hidream_o1}
