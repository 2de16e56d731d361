"""The FLUX.2-klein adapter: diffusers' Flux2KleinPipeline components (transformer, AutoencoderKLFlux2, Qwen3
text encoder) behind i2l's Backbone interface, using the pipeline's own prompt encoding and latent packing.

Shapes: B batch, C = transformer in_channels (4 × VAE latent channels: 2×2-patchified), h×w latent grid
(image side / 16), T = h·w image tokens, L text tokens, D = joint_attention_dim.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders import Flux2LoraLoaderMixin

from i2l.backbones import schedule
from i2l.backbones.base import Cond
from i2l.backbones.diffusers_base import DiffusersBackbone
from i2l.config import FLUX2_TARGETS, BackboneConfig

QWEN3_LAYERS = (9, 18, 27)  # text-encoder hidden states the pipeline stacks into one prompt embedding
MAX_TEXT_TOKENS = 512  # the pipeline pads every prompt to this length and attends to all of it
# FLUX.2-klein 4B transformer: hidden 3072 (24 heads × 128), 5 double-stream + 20 single-stream blocks, MLP ratio 3,
# text width 7680 = 3 stacked Qwen3-4B layers × 2560; no guidance embedding (klein is guidance-distilled away).
KLEIN4B_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000, "guidance_embeds": False,
}

class Flux2Backbone(DiffusersBackbone):
    """FLUX.2-klein seen through i2l: x_t latents (B, C, h, w) in the pipeline's normalised, patchified space."""

    kind = "flux2"
    model_name, path_env = "FLUX.2-klein", "I2L_KLEIN4B_DIR"
    base_checkpoint = "FLUX.2-klein-base-4B"  # what to train on instead of the step-distilled FLUX.2-klein-4B
    pipeline_class, transformer_class = Flux2KleinPipeline, Flux2Transformer2DModel
    default_targets = FLUX2_TARGETS
    published_config = KLEIN4B_TRANSFORMER
    lora_loader = Flux2LoraLoaderMixin
    chat_thinking = False  # Flux2KleinPipeline's chat template: thinking off (Qwen3 then adds an empty think block)

    def __init__(self, pipe: Flux2KleinPipeline, targets: tuple[str, ...] = FLUX2_TARGETS,
                 text_encoder_out_layers: tuple[int, ...] = QWEN3_LAYERS, max_sequence_length: int = MAX_TEXT_TOKENS):
        super().__init__(pipe, targets, max_sequence_length)
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        c = self.transformer.config
        if c.guidance_embeds:
            raise ValueError("this transformer has guidance embeddings (FLUX.2-dev); the flux2 backbone expects a "
                             "FLUX.2-klein checkpoint (guidance_embeds=False)")
        if c.patch_size != 1:
            raise ValueError(f"Flux2KleinPipeline packs latents itself and expects transformer patch_size=1, "
                             f"got {c.patch_size}")
        self.backbone_id = (f"flux2:c{c.in_channels}-d{c.num_attention_heads * c.attention_head_dim}"
                            f"-l{c.num_layers}-s{c.num_single_layers}-j{c.joint_attention_dim}")
        self._check_text_encoder()

    def _check_text_encoder(self) -> None:
        if self.text_encoder is None:
            return
        n = self.text_encoder.config.num_hidden_layers
        if max(self.text_encoder_out_layers) > n:
            raise ValueError(f"text_encoder_out_layers {self.text_encoder_out_layers} exceed the text encoder's "
                             f"{n} layers")
        D = len(self.text_encoder_out_layers) * self.text_encoder.config.hidden_size
        if D != self.text_width:
            raise ValueError(f"{len(self.text_encoder_out_layers)} stacked text layers × hidden "
                             f"{self.text_encoder.config.hidden_size} = {D}, but the transformer's "
                             f"joint_attention_dim is {self.text_width}")

    @property
    def text_width(self) -> int:
        return self.transformer.config.joint_attention_dim

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        n = image_size // (self.vae_scale_factor * 2)  # VAE downsampling, then the 2×2 patchify
        return (self.transformer.config.in_channels, n, n)

    def sampling_schedule(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return schedule.flux2_klein(self.pipe.scheduler.config, steps, latent_shape[1] * latent_shape[2])  # h·w tokens

    def training_timesteps(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return schedule.flux2_klein_training(self.pipe.scheduler.config)  # (1000,): mu 0.8, as the authors train

    # ----- text -----
    def _encode_prompts(self, prompts: list[str]) -> Cond:
        """Prompt embeddings (B, L, D) exactly as Flux2KleinPipeline.encode_prompt makes them (no mask: the
        pipeline pads to max_sequence_length and the transformer attends to the padding too)."""
        self._require_text_encoder("prompt embeddings")
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return Cond(embeds.to(self.dtype))  # (B, L, D)

    # ----- images -----
    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae: AutoencoderKLFlux2 = self._require_vae()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std  # (1, C, 1, 1) each

    def _encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        """VAE mode, 2×2 patchify, batch-norm statistics: the pipeline's `_encode_vae_image`."""
        return self.pipe._encode_vae_image(images, generator=None)  # (B, C, h, w)

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Undo batch-norm and patchify as the pipeline does before decoding."""
        mean, std = self._bn_stats(x)
        return self.pipe._unpatchify_latents(x * std + mean)  # (B, C/4, 2h, 2w)

    # ----- velocity -----
    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # cond.mask is not used: Flux2KleinPipeline passes no attention mask (its prompts are all padded to one length)
        B, C, h, w = x_t.shape
        tokens = self.pipe._pack_latents(x_t)  # (B, T, C), row-major over the grid
        img_ids = self.pipe._prepare_latent_ids(x_t).to(x_t.device)  # (B, T, 4): (0, row, col, 0)
        txt_ids = self.pipe._prepare_text_ids(cond.embeds).to(x_t.device)  # (B, L, 4): (0, 0, 0, i)
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=cond.embeds.to(tokens.dtype),
            # the pipeline passes sigma = 1 - t (1 = pure noise); the model predicts noise - data = -(x1 - x0)
            timestep=(1.0 - t).to(tokens.dtype), guidance=None, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]  # (B, T, C)
        return -out.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)


def load_flux2_backbone(bcfg: BackboneConfig) -> Flux2Backbone:
    """Load FLUX.2-klein from a local diffusers directory (`save_pretrained` layout; safetensors only)."""
    pipe = Flux2Backbone.load_pipeline(bcfg)
    layers = tuple(int(i) for i in bcfg.text_encoder_layers) or QWEN3_LAYERS
    return Flux2Backbone(pipe, tuple(bcfg.targets) or FLUX2_TARGETS, text_encoder_out_layers=layers,
                         max_sequence_length=bcfg.max_sequence_length)
