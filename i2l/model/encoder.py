"""The frozen SigLIP-class image encoder (paper §3.1): references -> patch-level tokens (not the pooled vector).

The checkpoint's own config.json decides the class (`read_encoder_checkpoint`): `siglip` / `siglip_vision_model`
(FixRes: SiglipVisionModel, conv patches, fixed positions, e.g. siglip2-so400m-patch16-512) or `siglip2` /
`siglip2_vision_model` (NaFlex: Siglip2VisionModel, pre-patchified pixels within its patch budget); whole image+text
checkpoints load their vision tower only. The toy encoder is a tiny SiglipVisionModel directory written by i2l.
Shapes: B batch, N references, P patches per image, D encoder width.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from i2l.config import EncoderConfig

# config.json model_type -> (NaFlex?, whole image+text checkpoint?)
MODEL_TYPES = {"siglip": (False, True), "siglip_vision_model": (False, False),
               "siglip2": (True, True), "siglip2_vision_model": (True, False)}


@dataclass(frozen=True)
class EncoderCheckpoint:
    """What an encoder directory says about itself (config.json, and a NaFlex processor's patch budget)."""

    path: Path
    model_type: str
    naflex: bool  # Siglip2VisionModel (linear patches, variable count) rather than SiglipVisionModel (FixRes)
    whole: bool  # vision + text towers: only `vision_model.*` is read
    vision: object  # the transformers vision config (defaults filled in)
    budget: int  # patches per image: FixRes (image_size / patch)², NaFlex the largest square grid in its budget

    @property
    def class_name(self) -> str:
        return "Siglip2VisionModel" if self.naflex else "SiglipVisionModel"

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def image_size(self) -> int:
        """The square side the encoder sees: FixRes its image_size; NaFlex patch × ⌊√budget⌋ (all patches used)."""
        return self.patch_size * math.isqrt(self.budget) if self.naflex else self.vision.image_size

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def model_class(self) -> type:
        from transformers import Siglip2VisionModel, SiglipVisionModel

        return Siglip2VisionModel if self.naflex else SiglipVisionModel


def read_encoder_checkpoint(path: str | Path) -> EncoderCheckpoint:
    """Read config.json (and preprocessor_config.json for NaFlex's max_num_patches); no weights, no remote code."""
    from transformers import Siglip2Config, Siglip2VisionConfig, SiglipConfig, SiglipVisionConfig

    path = Path(path)
    conf = path / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(f"{conf} not found: encoder.path must be a SigLIP checkpoint directory "
                                f"(config.json + model.safetensors)")
    model_type = json.loads(conf.read_text()).get("model_type", "")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{conf} says model_type {model_type!r}; i2l reads SigLIP checkpoints "
                         f"({', '.join(MODEL_TYPES)}): point encoder.path at a SigLIP / SigLIP2 directory")
    naflex, whole = MODEL_TYPES[model_type]
    config_cls = {(False, True): SiglipConfig, (False, False): SiglipVisionConfig,
                  (True, True): Siglip2Config, (True, False): Siglip2VisionConfig}[naflex, whole]
    config = config_cls.from_pretrained(path, local_files_only=True)
    vision = config.vision_config if whole else config
    if naflex:
        proc = path / "preprocessor_config.json"
        budget = json.loads(proc.read_text()).get("max_num_patches") if proc.is_file() else None
        budget = int(budget or vision.num_patches)
    else:
        budget = (vision.image_size // vision.patch_size) ** 2
    return EncoderCheckpoint(path, model_type, naflex, whole, vision, budget)


@contextmanager
def _pooling_head_off(models: list[nn.Module]):
    """Skip the pooling head of `models` (those whose use_head was on) for one forward; then turn it back on."""
    for m in models:
        m.use_head = False
    try:
        yield
    finally:
        for m in models:
            m.use_head = True


class ImageEncoder(nn.Module):
    """Frozen vision tower returning patch tokens (B, P, D) for images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, model: nn.Module, cfg: EncoderConfig, encoder_id: str):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.encoder_id = encoder_id
        self.siglip2 = type(model).__name__.startswith("Siglip2")
        self.dim = model.config.hidden_size
        # SigLIP's attention-pooling head makes pooler_output, which i2L never reads (it takes the patch tokens):
        # off for the forward (1.2x faster toy encoder), kept in the model (the toy pretraining trains through it)
        self._heads = [m for m in model.modules() if getattr(m, "use_head", False)]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never in training mode (no dropout drift)

    @property
    def tokens_per_image(self) -> int:
        return (self.cfg.image_size // self.model.config.patch_size) ** 2

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if images.shape[-1] != s or images.shape[-2] != s:
            images = nn.functional.interpolate(images, size=(s, s), mode="bilinear", antialias=True,
                                               align_corners=False)
        return images  # SigLIP normalises with mean = std = 0.5, i.e. exactly [-1, 1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # one memory layout whatever the caller built (to_tensor gives a channels-last view, a zero-padded batch a
        # contiguous one): conv kernels pick their algorithm by layout and batch, and on some CPUs (AVX2 without
        # AVX-512) those round differently, so a cached token would not equal a fresh one (tests/train)
        x = self._resize(images.to(self.device, self.dtype)).contiguous()  # (B, 3, S, S)
        with _pooling_head_off(self._heads):
            return self._tokens(x)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not self.siglip2:
            return self.model(pixel_values=x).last_hidden_state  # (B, P, D)
        # Siglip2 takes pre-patchified pixels: (B, P, p·p·3) in (row, col, channel) order + mask + grid shape
        p = self.model.config.patch_size
        B, C, H, W = x.shape
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        mask = torch.ones(B, patches.shape[1], dtype=torch.long, device=x.device)
        shapes = torch.tensor([[H // p, W // p]] * B, device=x.device)
        out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.last_hidden_state  # (B, P, D)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def encode_refs(self, refs: torch.Tensor, n_refs: torch.Tensor):
        """refs (B, N, 3, H, W) padded, n_refs (B,) -> tokens (B, N·P, D), keep-mask (B, N·P), ref index (B, N·P)."""
        B, N = refs.shape[:2]
        return _ref_layout(self.forward(refs.flatten(0, 1)).unflatten(0, (B, N)), n_refs)  # (B, N, P, D) in

    def encode_ref_sets(self, sets: list[list[Hashable]], images: Callable[[list], torch.Tensor],
                        cache: FrozenCache | None = None):
        """`encode_refs` for U reference sets named by key (a row id), through `cache`: only the images it lacks
        are loaded (`images(keys)` -> (M, 3, h, w) in [-1, 1]) and encoded, in one batch. The padding slots
        hold the tokens of an all-zero image, as `encode_refs` pads, so both give the same tensors."""
        cache = cache if cache is not None else FrozenCache(self)
        cache.check(self)
        N = max(len(s) for s in sets)
        slots = [s[j] if j < len(s) else _PAD for s in sets for j in range(N)]
        values = cache.held(slots)  # taken before any new entry can evict them
        missing = [k for k in dict.fromkeys(slots) if k not in values and k != _PAD]
        pad = _PAD in slots and _PAD not in values
        if missing or pad:
            x = images(missing) if missing else None
            if pad:
                s = self.cfg.image_size if x is None else x.shape[-1]
                zero = torch.zeros(1, 3, s, s, dtype=torch.float32 if x is None else x.dtype,
                                   device=self.device if x is None else x.device)
                x = zero if x is None else torch.cat([x, zero])
            tok = self.forward(x)  # (M [+1], P, D)
            cache.calls += 1
            for k, t in zip([*missing, _PAD] if pad else missing, tok):
                values[k] = cache.put(k, t)
        tok = torch.stack([values[k] for k in slots]).unflatten(0, (len(sets), N))  # (U, N, P, D)
        return _ref_layout(tok, torch.tensor([len(s) for s in sets]))


_PAD = ("i2l:padding-reference",)  # the cache key of the all-zero padding image (a row id is a str)


def _ref_layout(tok: torch.Tensor, n_refs: torch.Tensor):
    """tokens (B, N, P, D), n_refs (B,) -> tokens (B, N·P, D), keep-mask (B, N·P), ref index (B, N·P)."""
    B, N, P = tok.shape[:3]
    ref_index = torch.arange(N, device=tok.device).repeat_interleave(P).expand(B, -1)  # (B, N·P)
    keep = ref_index < n_refs.to(tok.device)[:, None]  # (B, N·P): padding references are masked out
    return tok.reshape(B, N * P, -1), keep, ref_index


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap digest of a module's weights (each tensor's name, shape, dtype, sum and 64 strided values): two
    checkpoints of one architecture differ in it, a GPU computes it in milliseconds even for a 400 M encoder."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            flat = t.detach().flatten()
            probe = torch.cat([flat.double().sum()[None], flat[:: max(1, flat.numel() // 64)].double()])
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(probe.cpu().numpy().tobytes())
    return h.hexdigest()


def _versions(module: nn.Module) -> int:
    """The sum of the weights' in-place version counters: any copy_ / load_state_dict / optimizer step moves it."""
    return sum(t._version for t in [*module.parameters(), *module.buffers()])


class FrozenCache:
    """A bounded LRU of a FROZEN model's outputs by key (a reference's row id, a prompt): training re-reads the
    same references and prompts every epoch, and a frozen model gives them the same output each time.

    Bound to one model's weights: `check(model)` (called on every use) empties it when it is given another
    model whose weights differ (`weights_fingerprint`) or when the bound model's weights were changed in place
    (their version counters moved), so it never serves outputs of other weights. max_mb bounds the bytes kept
    (least recently used out first); hits / misses / calls (batched model calls) count its use."""

    def __init__(self, model: nn.Module | None = None, max_mb: float = 1024.0):
        self.max_bytes = int(max_mb * 2**20)
        self.entries: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = self.calls = 0
        self.model, self.fingerprint, self.version = None, None, None
        if model is not None:
            self.check(model)

    def check(self, model: nn.Module | None) -> None:
        if model is None:
            return
        if model is self.model and _versions(model) == self.version:
            return
        fingerprint = weights_fingerprint(model)
        if fingerprint != self.fingerprint:
            self.clear()
        self.model, self.fingerprint, self.version = model, fingerprint, _versions(model)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def held(self, keys: list) -> dict:
        """The cached values of those of `keys` the cache holds (each lookup of one counts a hit); the caller keeps
        them for its use, so that entries it adds next may evict them from the cache but not from its batch."""
        out = {}
        for k in keys:
            if k in self.entries:
                out[k] = self.entries[k]
                self.entries.move_to_end(k)
                self.hits += 1
        return out

    def put(self, key, value):
        """Keep `value` (a tensor, or an object of tensors) under key and return it; evicts the least recently
        used beyond max_mb. The stored tensors are cloned: a view would keep its whole batch alive."""
        self.misses += 1
        value = _clone(value)
        size = _nbytes(value)
        if key in self.entries:
            self.bytes -= _nbytes(self.entries.pop(key))
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= _nbytes(old)
        return value

    def stats(self) -> dict:
        return {"entries": len(self), "mb": self.bytes / 2**20, "hits": self.hits, "misses": self.misses,
                "calls": self.calls}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in vars(value).values() if isinstance(v, torch.Tensor)]


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return type(value)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(value).items()})


def _vision_tower(ck: EncoderCheckpoint) -> nn.Module:
    """The vision model of a local checkpoint, refusing any weight it would have to invent (missing keys)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    if ck.whole:  # the text tower's keys are expected leftovers: keep transformers' load report quiet about them
        logging.set_verbosity_error()
    try:
        model, info = ck.model_class().from_pretrained(ck.path, local_files_only=True, use_safetensors=True,
                                                       output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{ck.path}: {len(missing)} weight(s) of its {ck.class_name} are not in the checkpoint "
                         f"(e.g. {missing[:3]}): the directory is incomplete; run `i2l doctor` on it and re-copy "
                         f"its .safetensors files")
    return model


def load_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """Load the frozen encoder from a local directory (no hub, no remote code). Its config.json decides the class
    and the input size: cfg.image_size is set to what the checkpoint sees (`i2l doctor` reports a preset that
    expects another)."""
    path = Path(cfg.path)
    if not path.is_dir():
        hint = "run `i2l pretrain-encoder --preset toy` (or `make run`)" if cfg.kind == "toy" else \
            "point encoder.path (or I2L_SIGLIP2_DIR) at a local SigLIP / SigLIP2 directory"
        raise FileNotFoundError(f"no image encoder at {path!r}: {hint}")
    ck = read_encoder_checkpoint(path)
    model = _vision_tower(ck)
    cfg.image_size = ck.image_size
    meta = path / "encoder.json"  # the toy encoder records the side it was trained at
    if meta.is_file():
        cfg.image_size = json.loads(meta.read_text()).get("image_size", cfg.image_size)
    family = "siglip2-naflex" if ck.naflex else "siglip"
    enc_id = f"{family}:{path.name}" if cfg.kind != "toy" else "toy-siglip"
    return ImageEncoder(model, cfg, enc_id)
