"""The Z-Image adapter: diffusers' ZImagePipeline components (ZImageTransformer2DModel, AutoencoderKL, Qwen3 text
encoder) behind i2l's Backbone interface, using the pipeline's own prompt encoding and latent scaling.

Shapes: B batch, C latent channels, h×w latent grid (image side / 8), L_i caption tokens of sample i
(variable; padded to L with a mask in a Cond), D = cap_feat_dim.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from diffusers.loaders import ZImageLoraLoaderMixin

from i2l.backbones import schedule
from i2l.backbones.base import Cond
from i2l.backbones.diffusers_base import DiffusersBackbone
from i2l.config import ZIMAGE_TARGETS, BackboneConfig

MAX_TEXT_TOKENS = 512  # the pipeline's max_sequence_length; padding is dropped, so short prompts stay short
# Z-Image 6B transformer: width 3840, 30 layers (+2 noise and 2 context refiners), 30 heads, Qwen3-4B text width.
ZIMAGE_TRANSFORMER = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560,
}


class ZImageBackbone(DiffusersBackbone):
    """Z-Image seen through i2l: x_t latents (B, C, h, w) in the pipeline's scaled VAE space.

    Every LoRA target (attention / feed-forward of noise_refiner, context_refiner and layers) sees padded
    per-sample batches (B, T, dim) inside the transformer, so BatchedLoRA's per-sample LoRAs apply unchanged."""

    kind = "zimage"
    model_name, path_env = "Z-Image", "I2L_ZIMAGE_DIR"
    pipeline_class, transformer_class = ZImagePipeline, ZImageTransformer2DModel
    default_targets = ZIMAGE_TARGETS
    published_config = ZIMAGE_TRANSFORMER
    lora_loader = ZImageLoraLoaderMixin
    chat_thinking = True  # ZImagePipeline's chat template: thinking on (no empty think block)

    def __init__(self, pipe: ZImagePipeline, targets: tuple[str, ...] = ZIMAGE_TARGETS,
                 max_sequence_length: int = MAX_TEXT_TOKENS):
        super().__init__(pipe, targets, max_sequence_length)
        c = self.transformer.config
        self.patch_size = 2 if 2 in c.all_patch_size else c.all_patch_size[0]  # the pipeline's default patch
        self.backbone_id = (f"zimage:c{c.in_channels}-d{c.dim}-l{c.n_layers}-r{c.n_refiner_layers}"
                            f"-cap{c.cap_feat_dim}")
        if self.text_encoder is not None and self.text_encoder.config.hidden_size != c.cap_feat_dim:
            raise ValueError(f"text encoder hidden size {self.text_encoder.config.hidden_size} != the "
                             f"transformer's cap_feat_dim {c.cap_feat_dim}")

    @property
    def text_width(self) -> int:
        return self.transformer.config.cap_feat_dim

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        n = 2 * (image_size // (self.vae_scale_factor * 2))  # as ZImagePipeline.prepare_latents
        return (self.transformer.config.in_channels, n, n)

    def sampling_schedule(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        seq = (latent_shape[1] // 2) * (latent_shape[2] // 2)  # tokens, counted as ZImagePipeline counts them
        return schedule.zimage(self.pipe.scheduler.config, steps, seq)

    def training_timesteps(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        seq = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        return schedule.zimage_training(self.pipe.scheduler.config, seq)  # (1000,): shift 3, as the authors train

    # ----- text -----
    def _encode_prompts(self, prompts: list[str]) -> Cond:
        """Caption features as ZImagePipeline._encode_prompt makes them (second-to-last hidden state, padding
        dropped), padded into (B, L, D) with mask (B, L) so that `_velocity` can hand back the exact list."""
        self._require_text_encoder("caption features")
        # list(...): the pipeline rewrites the list it is given in place (chat template)
        feats = self.pipe._encode_prompt(list(prompts), device=self.device,
                                         max_sequence_length=self.max_sequence_length)  # [(L_i, D)]
        return Cond.cat([Cond(f.unsqueeze(0).to(self.dtype)) for f in feats])

    # ----- images -----
    def _encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        """(mode − shift)·scale: ZImageImg2ImgPipeline's scaling."""
        vae = self.vae
        lat = vae.encode(images).latent_dist.mode()  # (B, C, h, w)
        shift = vae.config.shift_factor or 0.0
        return (lat - shift) * vae.config.scaling_factor

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)

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
    return ZImageBackbone(ZImageBackbone.load_pipeline(bcfg), tuple(bcfg.targets) or ZIMAGE_TARGETS,
                          max_sequence_length=bcfg.max_sequence_length)
