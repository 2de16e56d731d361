"""The Z-Image adapter: diffusers' ZImagePipeline components (ZImageTransformer2DModel, AutoencoderKL, Qwen3 text
encoder) behind i2l's Backbone interface, using the pipeline's own prompt encoding and latent scaling.

Shapes: B batch, C latent channels, h×w latent grid (image side / 8), L_i caption tokens of sample i
(variable; padded to L with a mask in a Cond), D = cap_feat_dim.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.loaders import ZImageLoraLoaderMixin

from i2l.backbones import schedule
from i2l.backbones.base import Backbone, Cond
from i2l.config import ZIMAGE_TARGETS, BackboneConfig

MAX_TEXT_TOKENS = 512  # the pipeline's max_sequence_length; padding is dropped, so short prompts stay short


class ZImageBackbone(Backbone):
    """Z-Image seen through i2l: x_t latents (B, C, h, w) in the pipeline's scaled VAE space.

    Every LoRA target (attention / feed-forward of noise_refiner, context_refiner and layers) sees padded
    per-sample batches (B, T, dim) inside the transformer, so BatchedLoRA's per-sample LoRAs apply unchanged."""

    kind = "zimage"
    lora_loader = ZImageLoraLoaderMixin
    chat_thinking = True  # ZImagePipeline's chat template: thinking on (no empty think block)

    def __init__(self, pipe: ZImagePipeline, targets: tuple[str, ...] = ZIMAGE_TARGETS,
                 max_sequence_length: int = MAX_TEXT_TOKENS):
        super().__init__(targets or ZIMAGE_TARGETS)
        self.pipe = pipe  # kept whole: its methods encode prompts, and diffusers LoRA loading goes through it
        self.transformer: ZImageTransformer2DModel = pipe.transformer
        self.vae: AutoencoderKL | None = getattr(pipe, "vae", None)
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.max_sequence_length = max_sequence_length
        c = self.transformer.config
        self.patch_size = 2 if 2 in c.all_patch_size else c.all_patch_size[0]  # the pipeline's default patch
        self.backbone_id = (f"zimage:c{c.in_channels}-d{c.dim}-l{c.n_layers}-r{c.n_refiner_layers}"
                            f"-cap{c.cap_feat_dim}")
        if self.text_encoder is not None and self.text_encoder.config.hidden_size != c.cap_feat_dim:
            raise ValueError(f"text encoder hidden size {self.text_encoder.config.hidden_size} != the "
                             f"transformer's cap_feat_dim {c.cap_feat_dim}")

    @classmethod
    def from_components(cls, transformer: ZImageTransformer2DModel, vae: AutoencoderKL | None = None,
                        text_encoder=None, tokenizer=None, scheduler=None, targets: tuple[str, ...] = ZIMAGE_TARGETS,
                        **kwargs) -> ZImageBackbone:
        """Build from ready modules (e.g. tiny random ones in tests); absent parts make their stage raise."""
        pipe = ZImagePipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        return cls(pipe, targets, **kwargs)

    def modules(self):
        return [m for m in (self.transformer, self.vae, self.text_encoder) if m is not None]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor  # 8 for the real VAE (the pipeline assumes 8 when there is none)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        n = 2 * (image_size // (self.vae_scale_factor * 2))  # as ZImagePipeline.prepare_latents
        return (self.transformer.config.in_channels, n, n)

    def sampling_schedule(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        seq = (latent_shape[1] // 2) * (latent_shape[2] // 2)  # tokens, counted as ZImagePipeline counts them
        return schedule.zimage(self.pipe.scheduler.config, steps, seq)

    # ----- text -----
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Caption features as ZImagePipeline._encode_prompt makes them (second-to-last hidden state, padding
        dropped), padded into (B, L, D) with mask (B, L) so that `_velocity` can hand back the exact list."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this zimage backbone has no text encoder/tokenizer: load the full pipeline directory "
                             "(text_encoder/ and tokenizer/) or pass a Cond of precomputed caption features")
        # list(...): the pipeline rewrites the list it is given in place (chat template)
        feats = self.pipe._encode_prompt(list(prompts), device=self.device,
                                         max_sequence_length=self.max_sequence_length)  # [(L_i, D)]
        return Cond.cat([Cond(f.unsqueeze(0).to(self.dtype)) for f in feats])

    # ----- images -----
    def _require_vae(self) -> AutoencoderKL:
        if self.vae is None:
            raise ValueError("this zimage backbone has no VAE: load the full pipeline directory (vae/) to encode or "
                             "decode images, or work with latents directly")
        return self.vae

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> x1 (B, C, h, w) = (mode − shift)·scale (ZImageImg2ImgPipeline's
        scaling; the mode, not a sample, so that targets are deterministic)."""
        vae = self._require_vae()
        lat = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()  # (B, C, h, w)
        shift = vae.config.shift_factor or 0.0
        return ((lat - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], as ZImagePipeline decodes."""
        vae = self._require_vae()
        x = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(x, return_dict=False)[0].clamp(-1, 1)

    # ----- velocity -----
    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        frames = list(x_t.unsqueeze(2).unbind(0))  # B × (C, 1, h, w): one frame per sample
        if cond.mask is None:
            caps = list(cond.embeds.unbind(0))  # B × (L, D)
        else:
            caps = [e[m] for e, m in zip(cond.embeds, cond.mask)]  # B × (L_i, D): padding dropped as the pipeline
        out = self.transformer(
            frames,
            # the pipeline passes (1000 − timestep)/1000 = 1 − sigma = t, and negates the output to get
            # noise − data, so the raw output is data − noise = x1 − x0 already
            t.float(), [c.to(self.dtype) for c in caps], patch_size=self.patch_size, return_dict=False,
        )[0]  # B × (C, 1, h, w)
        return torch.stack(out).squeeze(2)  # (B, C, h, w)


def load_zimage_backbone(bcfg: BackboneConfig) -> ZImageBackbone:
    """Load Z-Image from a local diffusers directory (`save_pretrained` layout; safetensors only)."""
    path = Path(bcfg.path) if bcfg.path else None
    if path is None or not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no Z-Image pipeline directory at {bcfg.path!r}: set backbone.path (or "
                                f"I2L_ZIMAGE_DIR) to a local diffusers directory with model_index.json")
    dtype = getattr(torch, bcfg.dtype)
    pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True)
    return ZImageBackbone(pipe, tuple(bcfg.targets) or ZIMAGE_TARGETS, max_sequence_length=bcfg.max_sequence_length)
