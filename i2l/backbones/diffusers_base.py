"""What the diffusers adapters (flux2, zimage) share: a pipeline's components behind i2l's Backbone interface,
loaded from a local directory or built from ready modules, the VAE round trip, and the architecture that random
init and sizing build without weights. Each subclass adds its prompt encoding, latent layout and schedule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from i2l.backbones.base import Backbone
from i2l.config import BackboneConfig

log = logging.getLogger(__name__)


def read_model_index(path: str | Path) -> dict:
    """model_index.json of a diffusers pipeline directory: `_class_name`, the components, flags such as
    `is_distilled` (no weights are read)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: backbone.path must be a diffusers pipeline directory "
                                f"(`save_pretrained` layout, as the checkpoints are published)")
    return json.loads(index.read_text())


class DiffusersBackbone(Backbone):
    """A diffusers pipeline seen through i2l: x_t latents (B, C, h, w) in the subclass's latent space."""

    pipeline_class: type  # the diffusers pipeline whose components and methods the adapter uses
    default_targets: tuple[str, ...] = ()
    published_config: dict | None = None  # the published checkpoint's transformer config.json
    model_name = ""  # the model as messages name it
    path_env = ""  # the environment variable the preset reads backbone.path from
    base_checkpoint = ""  # the undistilled checkpoint to train on, named when a step-distilled one is given

    def __init__(self, pipe, targets: tuple[str, ...] = (), max_sequence_length: int = 512):
        super().__init__(targets or self.default_targets)
        self.pipe = pipe  # kept whole: its methods encode prompts and images, and diffusers LoRA loading goes through it
        self.transformer = pipe.transformer
        self.vae = getattr(pipe, "vae", None)
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.max_sequence_length = max_sequence_length
        # a step-distilled checkpoint (FLUX.2-klein-4B) samples without CFG, as its pipeline does (`sampling_guidance`)
        self.distilled = bool(pipe.config.get("is_distilled", False))

    @classmethod
    def from_components(cls, transformer, vae=None, text_encoder=None, tokenizer=None, scheduler=None,
                        targets: tuple[str, ...] = (), **kwargs) -> DiffusersBackbone:
        """Build from ready modules (e.g. tiny random ones in tests); absent parts make their stage raise."""
        pipe = cls.pipeline_class(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae,
                                  text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        return cls(pipe, targets, **kwargs)

    @classmethod
    def check_index(cls, path: str | Path, index: dict) -> None:
        """Refuse a pipeline directory whose model_index.json names another pipeline than this adapter's."""
        from i2l.backbones.registry import kind_for_pipeline

        name = index.get("_class_name", "")
        if name != cls.pipeline_class.__name__:
            other = kind_for_pipeline(name)
            fix = f"set backbone.kind={other}" if other else f"point backbone.path at a {cls.model_name} directory"
            raise ValueError(f"{Path(path) / 'model_index.json'} names a {name or 'unnamed'} pipeline, but "
                             f"backbone.kind={cls.kind} reads {cls.pipeline_class.__name__}: {fix}")

    @classmethod
    def distillation(cls, path: str | Path, index: dict) -> tuple[str, str] | None:
        """(why a step-distilled checkpoint cannot be trained on, what to use instead); None when not distilled."""
        if not index.get("is_distilled"):
            return None
        base = cls.base_checkpoint or f"the undistilled {cls.model_name}"
        why = f"{Path(path) / 'model_index.json'} says is_distilled: true, the step-distilled {cls.model_name}"
        return (f"{why} that samples without CFG",
                f"i2l trains (and guides) on the base model: point backbone.path ({cls.path_env}) at {base}")

    def sampling_guidance(self, guidance: float) -> float:
        """The CFG scale this backbone's own pipeline samples with: a step-distilled pipeline ignores guidance (one
        branch, no CFG), and says so once (logger warning), naming the base model asymmetric guidance needs."""
        if not self.distilled or guidance == 1.0:
            return guidance
        base = self.base_checkpoint or f"the undistilled {self.model_name}"
        log.warning(f"this {self.model_name} is step-distilled (model_index.json is_distilled: true): sampled as its "
                    f"pipeline does, without CFG (guidance {guidance:g} ignored); asymmetric LoRA guidance needs the "
                    f"base model, {base}")
        return 1.0

    @classmethod
    def load_pipeline(cls, bcfg: BackboneConfig):
        """The pipeline of a local diffusers directory (`save_pretrained` layout; safetensors only, no download),
        after its model_index.json names this adapter's pipeline."""
        path = Path(bcfg.path) if bcfg.path else None
        if path is None or not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"no {cls.model_name} pipeline directory at {bcfg.path!r}: set backbone.path (or "
                                    f"{cls.path_env}) to a local diffusers directory with model_index.json")
        cls.check_index(path, read_model_index(path))
        return cls.pipeline_class.from_pretrained(str(path), dtype=getattr(torch, bcfg.dtype), local_files_only=True,
                                                  use_safetensors=True)

    @classmethod
    def architecture(cls, bc: BackboneConfig) -> dict:
        """The transformer's config: the local config.json if the preset names a directory, else the published
        architecture (no weights are read)."""
        if bc.path:
            local = Path(bc.path, "transformer", "config.json")
            if not local.is_file():
                raise FileNotFoundError(f"{local} not found: backbone.path must be a diffusers pipeline directory "
                                        f"(or leave it empty for the published {bc.kind} architecture)")
            return json.loads(local.read_text())
        if cls.published_config is None:
            raise ValueError(f"no published architecture for backbone kind {bc.kind!r}")
        return dict(cls.published_config)

    @classmethod
    def random(cls, bc: BackboneConfig, seed: int = 0) -> DiffusersBackbone:
        """The architecture with random weights and no VAE or text encoder: speed, memory and shapes only."""
        torch.manual_seed(seed)
        return cls.from_components(cls.transformer_class.from_config(cls.architecture(bc)), targets=tuple(bc.targets))

    def modules(self):
        return [m for m in (self.transformer, self.vae, self.text_encoder) if m is not None]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor  # 8 for the real VAE (the pipeline assumes 8 when there is none)

    @property
    def text_width(self) -> int:
        """D, the width of the prompt embeddings the transformer takes."""
        raise NotImplementedError

    def _require_text_encoder(self, precomputed: str) -> None:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"this {self.kind} backbone has no text encoder/tokenizer: load the full pipeline "
                             f"directory (text_encoder/ and tokenizer/) or pass a Cond of precomputed {precomputed}")

    # ----- images -----
    def _require_vae(self):
        if self.vae is None:
            raise ValueError(f"this {self.kind} backbone has no VAE: load the full pipeline directory (vae/) to "
                             f"encode or decode images, or work with latents directly")
        return self.vae

    def _encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in the VAE's dtype -> x1 (B, C, h, w) in the pipeline's latent space."""
        raise NotImplementedError

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) in the VAE's dtype -> the latents the VAE decodes (the inverse of `_encode_vae`'s scaling)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> x1 (B, C, h, w), from the VAE's mode (not a sample, so that targets
        are deterministic)."""
        vae = self._require_vae()
        return self._encode_vae(images.to(vae.device, vae.dtype)).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], as the pipeline decodes."""
        vae = self._require_vae()
        x = self._vae_latents(latents.to(vae.device, vae.dtype))
        return vae.decode(x, return_dict=False)[0].clamp(-1, 1)
