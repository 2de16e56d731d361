"""The config dataclasses: one per concern (toy world, data, backbone, encoder, predictor, train, eval, scorer,
produce) and `Config`, a whole run. Each validates its own fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# LoRA file key layouts, one per consumer of the files (i2l.model.lora_formats says what each one is)
LORA_FORMATS = ("diffusers", "diffsynth", "comfyui")


@dataclass
class ToyWorldConfig:
    """The procedural dataset written in the MegaStyle parquet layout."""

    styles: int = 400  # number of distinct styles; 8 rows each, as in MegaStyle
    seed: int = 0  # same seed => same bytes
    size: int = 32  # image side in pixels
    rows_per_shard: int = 1024  # parquet shard size (MegaStyle ships many shards)
    # Each image draws its style's background pattern at an offset of its own, as a texture sits differently in each
    # of a real style's images; False draws every image of a style at one offset, pixel for pixel (the world before
    # 2026-12-06 night, kept byte for byte).
    pattern_offset: bool = True

    def __post_init__(self):
        if self.styles < 2:
            raise ValueError("toyworld.styles must be >= 2")
        if self.size < 16 or self.size % 8:
            raise ValueError("toyworld.size must be a multiple of 8 and >= 16")


@dataclass
class DataConfig:
    """Preparation of MegaStyle-layout input into training-ready shards."""

    resolution: int = 32  # output side after upscaling (paper: 1024 for real backbones)
    val_fraction: float = 0.1  # share of styles held out (style-disjoint split)
    val_samples: int = 64  # validation manifest size: each = 1 prompt + `val_refs` refs of its style
    val_refs: int = 4
    rows_per_shard: int = 512  # rows per output parquet shard
    row_group_rows: int = 128  # parquet row group size, sized for streaming reads
    image_format: str = "png"  # png | jpeg | webp (lossy ones at quality 95)
    upscaler: str = "lanczos"  # lanczos (CPU) or a local diffusers pipeline dir
    batch_size: int = 64  # rows per Ray batch
    concurrency: int = 2  # Ray workers / actors
    max_pixels: int = 4096 * 4096  # decompression-bomb guard
    min_side: int = 16  # images smaller than this are quarantined
    max_aspect: float = 2.0  # images more elongated than this are quarantined
    min_text_chars: int = 3  # content/style shorter than this are quarantined
    max_text_chars: int = 2000
    seed: int = 0  # drives the split and the validation manifest
    quality: int = 95  # jpeg/webp encoder quality
    upscaler_device: str = "cuda"  # diffusers upscaler: cuda (GPU actors, num_gpus=1) or cpu (slow; tests)
    upscaler_steps: int = 20  # diffusers upscaler denoising steps

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("data.val_fraction must be in (0, 1)")
        if self.image_format not in ("png", "jpeg", "webp"):
            raise ValueError("data.image_format must be png, jpeg or webp")
        if self.resolution < 8 or self.rows_per_shard < 1 or self.row_group_rows < 1 or self.batch_size < 1:
            raise ValueError("data.resolution must be >= 8 and rows_per_shard, row_group_rows, batch_size >= 1")
        if self.concurrency < 1:
            raise ValueError("data.concurrency must be >= 1 (Ray workers)")
        if self.val_refs < 1 or self.val_samples < 0:
            raise ValueError("data.val_refs must be >= 1 and data.val_samples >= 0")
        if self.upscaler_device not in ("cuda", "cpu"):
            raise ValueError("data.upscaler_device must be cuda or cpu")
        if not 1 <= self.quality <= 100:
            raise ValueError("data.quality must be in [1, 100]")


@dataclass
class BackboneConfig:
    """The frozen text-to-image transformer that LoRAs adapt."""

    kind: str = "toy"  # toy | flux2 | zimage | hidream_o1
    # local directory with a diffusers layout (toy: written by `i2l pretrain-backbone`; hidream_o1: as published)
    path: str = ""
    image_size: int = 32  # generation side in pixels
    # toy backbone only: tiny Flux2Transformer2DModel in pixel space through a patch codec
    patch: int = 4  # pixel patch side: one token = patch*patch*3 channels
    dim: int = 128  # attention_head_dim * num_attention_heads
    heads: int = 4
    double_layers: int = 1
    single_layers: int = 2
    text_dim: int = 64  # toy text encoder width (= joint_attention_dim)
    position_channels: bool = False  # toy: tokens carry their (row, col) as 2 extra input channels
    # toy, with position_channels: also cos / sin of (row, col) at periods of 2, 4, ... 2^k tokens (k octaves; 4k
    # input channels in all). RoPE turns at most 1 radian per token, too slow to tell a 2-token period apart.
    position_octaves: int = 0
    max_text_tokens: int = 12  # words a toy prompt may have
    text_context_tokens: int = 0  # text tokens the backbone attends to (the encoder's first K); 0 = max_text_tokens
    # which linear layers carry LoRA: suffixes of module names (diffusers' spelling)
    targets: tuple[str, ...] = ()
    dtype: str = "float32"  # float32 | bfloat16 (GPU)
    # flux2 / zimage only: prompt encoding as the diffusers pipelines do it
    max_sequence_length: int = 512  # prompt tokens (the pipelines' max_sequence_length)
    text_encoder_layers: tuple[int, ...] = ()  # flux2: stacked Qwen3 hidden states; () = the pipeline's (9, 18, 27)

    def __post_init__(self):
        if self.kind not in ("toy", "flux2", "zimage", "hidream_o1"):
            raise ValueError(f"backbone.kind must be toy, flux2, zimage or hidream_o1, not {self.kind!r}")
        if self.kind == "hidream_o1" and (self.image_size % 32 or self.image_size < 64):
            raise ValueError("backbone.image_size must be a multiple of 32 (HiDream-O1's pixel patch), at least 64")
        if self.position_octaves < 0 or (self.position_octaves and not self.position_channels):
            raise ValueError("backbone.position_octaves must be >= 0, and > 0 only with backbone.position_channels")
        if self.kind == "toy" and self.image_size % self.patch:
            raise ValueError("backbone.image_size must be a multiple of backbone.patch")
        if not 0 <= self.text_context_tokens <= self.max_text_tokens:
            raise ValueError(f"backbone.text_context_tokens={self.text_context_tokens} must lie in "
                             f"0..backbone.max_text_tokens={self.max_text_tokens} (0 = all of them)")


@dataclass
class EncoderConfig:
    """The frozen SigLIP-class image encoder that turns references into patch tokens."""

    kind: str = "toy"  # toy (tiny SiglipVisionModel trained by i2l) | siglip2 | siglip
    path: str = ""  # local directory (siglip2-* layout); toy: written by `i2l pretrain-encoder`
    image_size: int = 32
    patch: int = 8
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    pretrain_steps: int = 2000  # toy only: sigmoid image<->style-description training (docs/results.md)
    # toy only: torch threads while pretraining (0 = torch's default). One: its matmuls are too small for a second
    # (2000 steps took ~8 % longer on one thread), and pretrain_toy trains the one-thread scorer beside it
    pretrain_threads: int = 1

    def __post_init__(self):
        if self.kind not in ("toy", "siglip2", "siglip"):
            raise ValueError(f"encoder.kind must be toy, siglip2 or siglip, not {self.kind!r}")


@dataclass
class PredictorConfig:
    """The i2L predictor: LoRA queries + single-stream transformer + compressed linear heads."""

    rank: int = 4  # k: LoRA rank
    hidden: int = 96  # transformer width
    depth: int = 2  # single-stream blocks
    heads: int = 4
    compress: int = 32  # c: width of the compressed linear decoders
    max_refs: int = 4  # N: most references per sample in training
    alpha: float = 1.0  # initial per-layer LoRA scale (learned)

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError("predictor.hidden must be divisible by predictor.heads")


@dataclass
class TrainConfig:
    """Flow-matching training of the predictor (and of the toy backbone)."""

    steps: int = 600
    batch_size: int = 32  # targets per step (backbone samples)
    # G targets of one style share one reference set and so one predicted LoRA: the predictor runs on
    # batch_size / G reference sets per step (its cost per backbone sample falls G-fold)
    targets_per_lora: int = 4
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # how training draws t: logit_normal | uniform (continuous), or backbone = uniformly from the backbone's own
    # shifted training grid as the authors train (FLUX.2: mu 0.8; Z-Image: its scheduler's shift 3; toy: none,
    # so logit-normal, as it was pretrained). The predictor, mean-LoRA, adapter and per-style LoRAs all draw by it
    timesteps: str = "logit_normal"
    loss_weighting: str = "none"  # none | gaussian: the authors' Gaussian loss weight over the grid's t
    ckpt_every: int = 200
    num_workers: int = 1  # Ray Train workers (DDP)
    max_failures: int = 2  # worker-group restarts after a worker dies (each resumes from the latest checkpoint)
    use_gpu: bool = False
    seed: int = 0
    backbone_steps: int = 800  # toy backbone pretraining
    backbone_lr: float = 2e-3
    backbone_batch_size: int = 64
    # toy backbone: the share of each pretraining batch whose prompt also names the style's look (content +
    # style words, e.g. "one small circle in the center cream navy fine pink polka dots thin black grainy"),
    # so the backbone can draw styles, as a real text-to-image model can; the rest are content prompts
    backbone_styled: float = 0.0
    # keep the frozen reference encoder's tokens per reference row and the frozen text encoder's conditioning per
    # prompt (bounded LRU of cache_mb each; same losses as without): later epochs skip decoding and re-encoding
    cache_frozen: bool = True
    cache_mb: float = 1024.0

    def __post_init__(self):
        if self.targets_per_lora < 1 or self.num_workers < 1:
            raise ValueError("train.targets_per_lora and train.num_workers must be >= 1")
        if self.steps < 1 or self.ckpt_every < 1:  # else a Ray Train worker fails on it, and is retried
            raise ValueError(f"train.steps ({self.steps}) and train.ckpt_every ({self.ckpt_every}) must be >= 1")
        if not 0.0 <= self.backbone_styled <= 1.0:
            raise ValueError(f"train.backbone_styled is a share of the batch, in [0, 1], not {self.backbone_styled}")
        if self.batch_size < self.num_workers:
            raise ValueError(f"train.batch_size={self.batch_size} is the global batch: it must be at least "
                             f"train.num_workers={self.num_workers} (one target per worker)")
        if self.timesteps not in ("logit_normal", "uniform", "backbone"):
            raise ValueError(f"train.timesteps must be logit_normal, uniform or backbone, not {self.timesteps!r}")
        if self.loss_weighting not in ("none", "gaussian"):
            raise ValueError(f"train.loss_weighting must be none or gaussian, not {self.loss_weighting!r}")
        if self.loss_weighting == "gaussian" and self.timesteps != "backbone":
            raise ValueError("train.loss_weighting=gaussian weights the points of the backbone's training grid: set "
                             "train.timesteps=backbone too")


@dataclass
class EvalConfig:
    """Held-out evaluation and generation."""

    styles: int = 16  # held-out styles evaluated
    guidance: float = 2.0
    # the negative branch's gray LoRA (paper §3.4): from one gray image, or "per_reference": from as many gray
    # images as the positive LoRA has references, as the authors' release builds it (real presets)
    gray_negative: str = "one"
    sample_steps: int = 20
    fm_timesteps: int = 8  # fixed timestep grid for held-out FM loss
    fm_noise_seeds: int = 2
    optimize_budgets: tuple[int, ...] = (5, 25, 100)  # per-style LoRA step budgets
    seed: int = 0
    # Adam lr of the per-style LoRAs at every budget unless lora_lr_by_budget says otherwise (also `i2l
    # optimize-lora`'s default and the centre of `i2l bench amortization`'s sweep); the real presets set their own
    lora_lr: float = 5e-3
    # per-style lr by step budget, as "steps:lr" pairs: a budget takes the rate of the largest listed step count at
    # or below it (below them all: the smallest one's); () = lora_lr at every budget. The best fixed rate falls as
    # the budget grows, so one rate for 5, 25 and 100 steps leaves two of them short of their best (toy: 1e-2, 5e-3
    # and 2.5e-3; docs/results.md, "Which learning rate do the per-style LoRAs get?")
    lora_lr_by_budget: tuple[str, ...] = ()
    # Adam lr of the mean-LoRA baseline (batch train.batch_size, the predictor's schedule; swept on the toy)
    mean_lora_lr: float = 1e-2
    per_style_rows: int = 4  # rows per style per per-style optimisation step (its references, fresh noise)
    baseline_steps: int = 0  # mean-LoRA / adapter training steps; 0 = the predictor's train.steps (fair budget)
    # > 1: the missing mean-LoRA and adapter baselines train side by side on one CPU each, the first in the
    # evaluating process and the other in a Ray worker process (CPU evaluations only; on a GPU, and with 1, they
    # train one after another in the evaluating process)
    baseline_workers: int = 1
    gen_batch: int = 64  # images per batched sampling call (each runs 2 CFG rows per image)
    save_loras: bool = True  # write every evaluated LoRA as a safetensors file (off for 1,000-style evals)
    # out-of-family styles (i2l/toy/foreign.py, never trained on): styles drawn by base and i2L, same prompts/seeds
    foreign_styles: int = 8  # 0 (or 1): not evaluated
    foreign_prompts: int = 2
    # adapter baseline: encoder tokens -> extra context tokens; 0 = the predictor's value (same capacity)
    adapter_tokens: int = 8  # M context tokens appended to the prompt's
    adapter_hidden: int = 0
    adapter_depth: int = 0
    adapter_heads: int = 0

    def __post_init__(self):
        if min(self.styles, self.sample_steps, self.gen_batch, self.adapter_tokens, self.per_style_rows,
               self.baseline_workers) < 1:
            raise ValueError("eval.styles, sample_steps, gen_batch, adapter_tokens, per_style_rows and "
                             "baseline_workers must be >= 1")
        if self.gray_negative not in ("one", "per_reference"):
            raise ValueError(f"eval.gray_negative must be one or per_reference, not {self.gray_negative!r}")
        if any(b < 1 for b in self.optimize_budgets):
            raise ValueError("eval.optimize_budgets must be positive step counts, e.g. 5,25,100")
        self._lr_steps()  # refuses a malformed eval.lora_lr_by_budget now, not after training

    def _lr_steps(self) -> list[tuple[int, float]]:
        """eval.lora_lr_by_budget parsed: (steps, lr) pairs, ascending."""
        pairs = []
        for item in self.lora_lr_by_budget:
            steps, _, lr = str(item).partition(":")
            try:
                pairs.append((int(steps), float(lr)))
                ok = pairs[-1][0] >= 1 and pairs[-1][1] > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"eval.lora_lr_by_budget takes steps:lr pairs with steps >= 1 and lr > 0, e.g. "
                                 f"5:1e-2,25:5e-3,100:2.5e-3 (got {item!r})")
        return sorted(pairs)

    def per_style_lr(self, budget: int) -> float:
        """The per-style LoRAs' Adam lr at `budget` steps (eval.lora_lr_by_budget, else eval.lora_lr)."""
        pairs = self._lr_steps()
        if not pairs:
            return self.lora_lr
        below = [lr for steps, lr in pairs if steps <= budget]
        return below[-1] if below else pairs[0][1]


TOY_CLIP_NAME = "i2l-toy-clip"  # the toy world's own open_clip model (i2l.toy.scorer registers it)


@dataclass
class ScorerConfig:
    """Scorers: the toy open_clip model (trained by i2l) or real checkpoints from local paths."""

    clip_model: str = TOY_CLIP_NAME  # open_clip model name (custom config registered for toy)
    clip_checkpoint: str = ""  # local checkpoint file or toy scorer dir; empty => <data_root>/scorer
    device: str = "auto"  # auto (cuda when present) | cpu | cuda[:N]
    batch_size: int = 64  # images per scorer forward
    # toy scorer pretraining (`i2l pretrain-scorer`)
    pretrain_steps: int = 300
    pretrain_batch_size: int = 128
    pretrain_lr: float = 3e-3
    content_weight: float = 0.8  # loss share of image<->prompt vs image<->style text (content learns slower)
    pretrain_max_rows: int = 50_000  # cap on rows read (the toy preset's world has 16,000)
    image_size: int = 32  # toy CLIP input side
    # torch threads while training (0 = torch's default): its small matmuls gain little from a second thread
    # and run ~4x slower with two when the cores are shared
    pretrain_threads: int = 1
    seed: int = 0
    # Table-1 preference scorers, read through diffsynth.metrics (i2l/eval/metrics/plugins.py): each path is a
    # local folder of DiffSynth-Studio/ImageMetrics' layout (model.safetensors + the files below; config.json, when
    # present, gives the model's sizes, else DiffSynth's full-size default). Empty => skipped with a recorded reason.
    aesthetic_path: str = ""  # Aesthetic/: model.safetensors, preprocessor_config.json [, config.json CLIPVision]
    pickscore_path: str = ""  # PickScore/: model.safetensors, CLIP processor + tokenizer files [, config.json]
    imagereward_path: str = ""  # ImageReward/: model.safetensors, med_config.json, vocab.txt (+ tokenizer files)
    hpsv2_path: str = ""  # HPSv2/: model.safetensors (open_clip keys), CLIP processor files [, config.json]
    hpsv3_path: str = ""  # HPSv3/: model.safetensors, Qwen2-VL processor + tokenizer files [, config.json]
    # evaluation scoring on Ray (i2l/eval/metrics/actors.py): 0 = in the evaluating process; N >= 1 = N actors per
    # configured scorer, each holding that one model, asking gpus_per_actor GPUs when scorer.device is cuda (or
    # auto on a cluster with GPUs), else one CPU
    workers: int = 0
    gpus_per_actor: float = 1.0

    def __post_init__(self):
        if self.batch_size < 1 or self.pretrain_batch_size < 2:
            raise ValueError("scorer.batch_size must be >= 1 and scorer.pretrain_batch_size >= 2")
        if self.workers < 0 or self.gpus_per_actor <= 0:
            raise ValueError("scorer.workers must be >= 0 and scorer.gpus_per_actor > 0")
        if not 0.0 <= self.content_weight <= 1.0:
            raise ValueError("scorer.content_weight must be in [0, 1]")


@dataclass
class ProduceConfig:
    """Mass production of LoRAs on a Ray actor pool (`i2l produce`)."""

    workers: int = 2  # actors; each loads the predictor (and encoder) once
    batch_size: int = 8  # styles per actor call (one batched predictor forward)
    num_gpus: float = 0.0  # GPUs per actor: 0 = CPU actors; real presets use 1 on a GPU cluster
    max_retries: int = 3  # attempts per batch when its actor dies (then the run fails)
    format: str = "diffusers"  # LoRA file key layout: diffusers | diffsynth | comfyui (i2l.model.lora_formats)

    def __post_init__(self):
        if self.workers < 1 or self.batch_size < 1 or self.max_retries < 0 or self.num_gpus < 0:
            raise ValueError("produce.workers and produce.batch_size must be >= 1, produce.max_retries and "
                             "produce.num_gpus >= 0")
        if self.format not in LORA_FORMATS:
            raise ValueError(f"produce.format must be one of {', '.join(LORA_FORMATS)}, got {self.format!r}")


@dataclass
class Config:
    """A whole run: one preset plus overrides."""

    name: str = "toy"
    data_root: str = "data"  # toy world, shards, checkpoints, results.duckdb
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    produce: ProduceConfig = field(default_factory=ProduceConfig)

    @property
    def root(self) -> Path:
        return Path(self.data_root)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
