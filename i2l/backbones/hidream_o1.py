"""The HiDream-O1-Image adapter: DiffSynth's HiDreamO1ImageModel (a pixel-level unified transformer on a Qwen3-VL
trunk; not in diffusers) behind i2l's Backbone interface, with DiffSynth's HiDream-O1 pipeline's own prompt
processing, pixel normalisation, patch layout and scheduler. diffsynth is imported on use only.

Shapes: B batch, x (B, 3, H, W) latents = pixels in [-1, 1] / NOISE_SCALE, P = 32 the pixel patch side,
N = (H/P)(W/P) image tokens, L_i prompt tokens of sample i (chat template + <|boi|><|tms|>), S = L + N.
"""

from __future__ import annotations

import contextlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.config import BackboneConfig
from i2l.config.presets import HIDREAM_O1_TARGETS

# the pipeline's noise: noise_scale·N(0, I) in pixel space (HiDreamO1ImagePipeline.__call__ default, and the
# `noise_scale` FlowMatchSFTLoss draws training noise with). i2l's latents are pixels / NOISE_SCALE, so i2l's unit
# noise is exactly the pipeline's noise, and a seed gives the pipeline's image.
NOISE_SCALE = 8.0
SHIFT = 3.0  # FlowMatchScheduler("HiDream-O1-Image"): the full (undistilled) model's static shift
PATCH = 32  # diffsynth.models.hidream_common.PATCH_SIZE: the model's pixel patch (hard-coded in DiffSynth too)
TRAIN_STEPS = 1000  # the scheduler's num_train_timesteps: the grid DiffSynth trains on
TEXT_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim", "vocab_size")
VISION_SIZE_KEYS = ("hidden_size", "depth", "num_heads", "intermediate_size", "out_hidden_size",
                    "num_position_embeddings", "deepstack_visual_indexes")
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")

_BUILD_LOCK = threading.Lock()
_PATCH_LOCK = threading.Lock()


def _published_config():
    from diffsynth.models.hidream_o1_image_dit import _build_hidream_config

    return _build_hidream_config()


def _sized_config(arch: dict):
    """DiffSynth's own HiDream-O1 config with the sizes of `arch` (a config.json's text_config / vision_config);
    every other value stays DiffSynth's."""
    config = _published_config()
    text, vision = arch.get("text_config", {}), arch.get("vision_config", {})
    for k in TEXT_SIZE_KEYS:
        if k in text:
            setattr(config.text_config, k, text[k])
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if "mrope_section" in rope:  # the rotary split over (t, h, w): a size, it sums to head_dim / 2
        section = list(rope["mrope_section"])
        config.text_config.rope_scaling = dict(config.text_config.rope_scaling, mrope_section=section)
    for k in VISION_SIZE_KEYS:
        if k in vision:
            setattr(config.vision_config, k, vision[k])
    return config


@contextmanager
def _building_with(config):
    """HiDreamO1ImageModel() builds the published full-size config itself (`_build_hidream_config`); for one
    construction that function hands out `config` instead, so that DiffSynth's own constructor builds a model of
    the checkpoint's sizes (a tiny replica, or the published one when `config` is the published config)."""
    import diffsynth.models.hidream_o1_image_dit as dit

    with _BUILD_LOCK:
        published = dit._build_hidream_config
        dit._build_hidream_config = lambda: config
        try:
            yield dit.HiDreamO1ImageModel
        finally:
            dit._build_hidream_config = published


def build_transformer(arch: dict):
    """DiffSynth's HiDreamO1ImageModel with the sizes of `arch` (random init, on the current default device)."""
    with _building_with(_sized_config(arch)) as model_class:
        return model_class()


def model_files(path: Path) -> list[Path]:
    """The model's weight files in a published directory: `model-*.safetensors` (shards, DiffSynth's
    origin_file_pattern), or one `model.safetensors`."""
    files = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("model.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model-*.safetensors in {path}: backbone.path must be a HiDream-O1-Image "
                                f"directory as published (config.json, model-0000k-of-0000N.safetensors, processor "
                                f"files)")
    return files


def _velocity_from_x(x_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model predicts the clean image; the pipeline's v = (x_t − x̂)/σ with σ = 1 − t, i.e. noise − data.
    The paper's velocity is the opposite: u = x1 − x0 = (x̂ − x_t)/(1 − t)."""
    return (x_pred - x_t) / (1.0 - t.float()).view(-1, 1, 1, 1).to(x_t.dtype)


class HiDreamO1Backbone(Backbone):
    """HiDream-O1-Image seen through i2l: x_t (B, 3, H, W) = pipeline pixels / NOISE_SCALE; prompts are token ids
    the transformer embeds itself (its text and image tokens share the decoder layers the LoRAs adapt).

    A Cond holds ids (B, L, 1) with a mask (B, L): DiffSynth's decoder has no padding mask (its attention picks
    the text rows from the first sample's layout), so `_velocity` runs each prompt length as its own batch, with
    the matching rows of a per-sample LoRA."""

    kind = "hidream_o1"
    model_name, path_env = "HiDream-O1-Image", "I2L_HIDREAM_O1_DIR"
    default_targets = HIDREAM_O1_TARGETS
    # its LoRA files' names (no key prefix: DiffSynth's keys): the registry's (i2l.backbones.registry)

    def __init__(self, transformer, processor=None, targets: tuple[str, ...] = HIDREAM_O1_TARGETS,
                 noise_scale: float = NOISE_SCALE, shift: float = SHIFT):
        super().__init__(targets or HIDREAM_O1_TARGETS)
        self.transformer = transformer
        self.processor = processor
        self.tokenizer = None if processor is None else getattr(processor, "tokenizer", processor)
        if self.tokenizer is not None:
            from diffsynth.models.hidream_common import add_special_tokens

            add_special_tokens(self.tokenizer)  # the <|boi|>, <|tms|> shortcuts the pipeline reads
        self.text_encoder = None  # the transformer embeds the prompt tokens itself
        self.noise_scale, self.shift = noise_scale, shift
        # i2l's train loop and benches switch checkpointing with diffusers' method names on the transformer, and
        # read transformers' `is_gradient_checkpointing` (any module's `gradient_checkpointing` flag); DiffSynth's
        # model takes a forward argument instead, which `_velocity` sets from that flag
        transformer.gradient_checkpointing = False
        transformer.enable_gradient_checkpointing = self.enable_gradient_checkpointing
        transformer.disable_gradient_checkpointing = self.disable_gradient_checkpointing
        c = transformer.config.text_config
        self.backbone_id = (f"hidream_o1:h{c.hidden_size}-l{c.num_hidden_layers}-a{c.num_attention_heads}"
                            f"-kv{c.num_key_value_heads}-i{c.intermediate_size}")

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.gradient_checkpointing = False

    # ----- construction -----
    @classmethod
    def architecture(cls, bc: BackboneConfig) -> dict:
        """The model's config: the local directory's config.json if the preset names one, else DiffSynth's
        `_build_hidream_config()` (the published architecture); no weights are read."""
        if bc.path:
            local = Path(bc.path, "config.json")
            if not local.is_file():
                raise FileNotFoundError(f"{local} not found: backbone.path must be a HiDream-O1-Image directory "
                                        f"(or leave it empty for the published architecture)")
            return json.loads(local.read_text())
        return _published_config().to_dict()

    @staticmethod
    def build_transformer(arch: dict):
        return build_transformer(arch)

    @classmethod
    def random(cls, bc: BackboneConfig, seed: int = 0) -> HiDreamO1Backbone:
        """The architecture with random weights and no processor: speed, memory and shapes only."""
        torch.manual_seed(seed)
        return cls(build_transformer(cls.architecture(bc)), targets=tuple(bc.targets))

    @property
    def text_width(self) -> int:
        return self.transformer.config.text_config.hidden_size

    def modules(self):
        return [self.transformer]

    # ----- text -----
    def _require_processor(self) -> None:
        if self.processor is None:
            raise ValueError("this hidream_o1 backbone has no processor: load the published directory (its "
                             "tokenizer and processor files) or pass a Cond of precomputed token ids")

    def prompt_text(self, prompt: str) -> str:
        """The text the pipeline tokenizes: the processor's chat template, then <|boi_token|><|tms_token|>."""
        self._require_processor()
        return (self.processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
                + self.tokenizer.boi_token + self.tokenizer.tms_token)

    def _encode_prompts(self, prompts: list[str]) -> Cond:
        """Token ids as the pipeline's prompt unit makes them (HiDreamO1ImageUnit_PromptTokenizer's text-to-image
        sample), each (1, L_i), padded into ids (B, L, 1) with mask (B, L)."""
        from diffsynth.pipelines.hidream_o1_image import HiDreamO1ImageUnit_PromptTokenizer

        self._require_processor()
        unit = HiDreamO1ImageUnit_PromptTokenizer()
        conds = []
        for p in prompts:  # the ids do not depend on the image size: the smallest it lays out stands in for it
            s = unit.build_text_sample(p, PATCH, 2 * PATCH, self.tokenizer, self.processor, self.transformer.config,
                                       self.device)
            conds.append(Cond(s["input_ids"].unsqueeze(-1)))  # (1, L_i, 1)
        return Cond.cat(conds)

    def random_cond(self, n: int, tokens: int, generator: torch.Generator | None = None) -> Cond:
        """Prompt ids for a benchmark without a tokenizer: `tokens` random text ids ending in the timestep token."""
        ids = torch.randint(0, self.transformer.model.tms_token_id - 32, (n, tokens, 1), generator=generator)
        ids[:, -1] = self.transformer.model.tms_token_id
        return Cond(ids.to(self.device))

    def _layout(self, ids: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids (3, G, S), token_types (G, S)) for prompt ids (G, L) of one length and an h×w image: the
        pipeline's text-to-image layout (build_text_sample): the image tokens follow the prompt, their rotary
        positions from DiffSynth's get_rope_index_fix_point; types 1 for the timestep token and the image (full
        attention), 0 for the prompt (causal)."""
        from diffsynth.models.hidream_common import get_rope_index_fix_point

        c = self.transformer.config
        G, L = ids.shape
        n = (h // PATCH) * (w // PATCH)
        vision = torch.full((1, n), c.image_token_id, dtype=ids.dtype, device=ids.device)
        vision[0, 0] = c.vision_start_token_id
        pos, _ = get_rope_index_fix_point(
            spatial_merge_size=1, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id, input_ids=torch.cat([ids[:1], vision], 1),
            image_grid_thw=torch.tensor([[1, h // PATCH, w // PATCH]], device=ids.device), video_grid_thw=None,
            attention_mask=None, skip_vision_start_token=[1])  # (3, 1, S)
        types = torch.zeros(1, L + n, dtype=ids.dtype, device=ids.device)
        types[0, L - 1:] = 1  # the <|tms|> token and the image
        return pos.expand(3, G, -1), types.expand(G, -1)

    # ----- images -----
    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        if image_size % PATCH or image_size < 2 * PATCH:  # the pipeline's layout needs two image tokens
            raise ValueError(f"backbone.image_size {image_size} must be a multiple of HiDream-O1's {PATCH}-pixel "
                             f"patch, at least {2 * PATCH}")
        return (3, image_size, image_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] (the pipeline's preprocess_image range) -> x1 = images / noise_scale."""
        return (images.to(self.device, torch.float32) / self.noise_scale).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() * self.noise_scale).clamp(-1, 1)

    # ----- schedules -----
    def _scheduler(self):
        from diffsynth.diffusion import FlowMatchScheduler

        return FlowMatchScheduler("HiDream-O1-Image")

    def sampling_schedule(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The pipeline's grid (model_type "full"): the scheduler's sigmas, then the final step to sigma 0."""
        sched = self._scheduler()
        sched.set_timesteps(steps, shift=self.shift)
        return 1.0 - torch.cat([sched.sigmas.float(), torch.zeros(1)])  # (steps+1,)

    def training_timesteps(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """DiffSynth's training grid: the scheduler set to 1000 steps (sigmas 1 .. 1/1000 shifted by 3)."""
        sched = self._scheduler()
        sched.set_timesteps(TRAIN_STEPS, shift=self.shift, training=True)
        return 1.0 - sched.sigmas.float()  # (1000,)

    # ----- velocity -----
    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        from diffsynth.models.hidream_common import patchify, unpatchify

        B, _, H, W = x_t.shape
        pixels = x_t * self.noise_scale  # (B, 3, H, W): the pipeline's latents
        patches = patchify(pixels)  # (B, N, 3·P·P)
        ids = cond.embeds[..., 0].to(self.device)  # (B, L)
        lengths = (cond.mask.sum(1) if cond.mask is not None else torch.full((B,), ids.shape[1])).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(int(n), []).append(i)
        checkpointing = self.transformer.gradient_checkpointing and torch.is_grad_enabled()
        adapter = self._lora
        active = adapter.active if adapter is not None else None
        out = [None] * B
        for n, rows in groups.items():
            idx = torch.tensor(rows, device=x_t.device)
            g_ids = ids[idx, :n]  # (G, L): padding is at the end (Cond.cat)
            pos, types = self._layout(g_ids, H, W)
            sub = active.take(idx) if active is not None and active.batched and len(groups) > 1 else active
            with _group_lora(adapter, sub, checkpointing):
                x_pred = self.transformer(
                    input_ids=g_ids, position_ids=pos, vinputs=patches[idx], timestep=t[idx].to(x_t.dtype),
                    token_types=types, use_gradient_checkpointing=checkpointing,
                ).x_pred[:, n:]  # (G, N, 3·P·P): the image tokens' predictions
            v = _velocity_from_x(unpatchify(x_pred, H, W), pixels[idx], t[idx]) / self.noise_scale  # (G, 3, H, W)
            for j, r in enumerate(rows):
                out[r] = v[j]
        return torch.stack(out)  # (B, 3, H, W)


@contextmanager
def _group_lora(adapter, lora, checkpointing: bool):
    """One prompt-length group's forward with its rows of the per-sample LoRA active. With checkpointing, DiffSynth
    recomputes each decoder layer in backward, after this block has put the whole batch's LoRA back: its layer
    checkpointing (`gradient_checkpoint_forward`, a module global of the model's file) is swapped for one that
    recomputes with this group's LoRA active again (torch.utils.checkpoint's context_fn), for this forward only."""
    if adapter is None:
        yield
        return
    if not checkpointing:
        with adapter.use(lora, adapter.strength):
            yield
        return
    import diffsynth.models.hidream_o1_image_dit as dit
    from torch.utils.checkpoint import checkpoint

    strength = adapter.strength

    def recompute_context():
        return contextlib.nullcontext(), adapter.use(lora, strength)

    def layer_checkpoint(fn, use_gradient_checkpointing, use_gradient_checkpointing_offload, *args, **kwargs):
        if not use_gradient_checkpointing:
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=recompute_context, **kwargs)

    with _PATCH_LOCK, adapter.use(lora, strength):
        own = dit.gradient_checkpoint_forward
        dit.gradient_checkpoint_forward = layer_checkpoint
        try:
            yield
        finally:
            dit.gradient_checkpoint_forward = own


def load_processor(path: Path):
    """The directory's processor, as the pipeline loads it (AutoProcessor.from_pretrained; local files only)."""
    from transformers import AutoProcessor

    missing = [f for f in PROCESSOR_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(missing)}: backbone.path must hold the published "
                                f"processor files (tokenizer, chat template, preprocessor_config.json)")
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def load_hidream_o1_backbone(bcfg: BackboneConfig) -> HiDreamO1Backbone:
    """Load HiDream-O1-Image from a local directory as published (config.json for the sizes, model-*.safetensors
    through DiffSynth's own `load_model`, the processor files); safetensors only, nothing downloaded."""
    from diffsynth.core.loader.model import load_model

    path = Path(bcfg.path) if bcfg.path else None
    if path is None or not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HiDream-O1-Image directory at {bcfg.path!r}: set backbone.path (or "
                                f"{HiDreamO1Backbone.path_env}) to a local copy of the published model "
                                f"(config.json, model-*.safetensors, processor files)")
    arch = json.loads((path / "config.json").read_text())
    files = [str(f) for f in model_files(path)]
    with _building_with(_sized_config(arch)) as model_class:
        model = load_model(model_class, files if len(files) > 1 else files[0], torch_dtype=getattr(torch, bcfg.dtype),
                           device="cpu")
    return HiDreamO1Backbone(model, load_processor(path), tuple(bcfg.targets) or HIDREAM_O1_TARGETS)
