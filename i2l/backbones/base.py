"""The one backbone interface every adapter implements: prompts -> conditioning, images <-> latents,
velocity v(x_t, t, cond) in the paper's convention, and the adaptable linear layers.

Convention (paper §3.2): x_t = (1 - t)·x0 + t·x1 with x0 noise, x1 data, t in [0, 1]; the velocity target is
u = x1 - x0. Each adapter maps this onto its diffusers model's own time/sign convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from i2l.backbones import schedule
from i2l.backbones.registry import lora_naming
from i2l.config import BackboneConfig
from i2l.model.batched_lora import BatchedLoRA
from i2l.model.lora import LoRA


@dataclass
class Cond:
    """Text conditioning for a batch: embeds (B, L, D), optional mask (B, L) (True = real token)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        L = max(c.embeds.shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            pad = L - c.embeds.shape[1]
            e = c.embeds if not pad else torch.cat([c.embeds, c.embeds.new_zeros(len(c), pad, c.embeds.shape[2])], 1)
            m = c.mask if c.mask is not None else torch.ones(len(c), c.embeds.shape[1], dtype=torch.bool,
                                                              device=c.embeds.device)
            if pad:
                m = torch.cat([m, m.new_zeros(len(c), pad)], 1)
            embeds.append(e)
            masks.append(m)
        any_mask = any(c.mask is not None for c in conds) or any(c.embeds.shape[1] != L for c in conds)
        return Cond(torch.cat(embeds), torch.cat(masks) if any_mask else None)

    def index(self, idx) -> Cond:
        return Cond(self.embeds[idx], None if self.mask is None else self.mask[idx])

    def to(self, device) -> Cond:
        return Cond(self.embeds.to(device), None if self.mask is None else self.mask.to(device))


class Backbone:
    """A frozen text-to-image transformer seen through i2l's interface."""

    kind: str = ""
    lora_prefix: str = "transformer"  # key prefix of diffusers LoRA files: its kind's (set below)
    transformer: nn.Module
    backbone_id: str = ""  # names the architecture; LoRA files record it and loading checks it
    chat_thinking: bool = False  # enable_thinking of the pipeline's chat template (`prompt_text`)
    # diffusers' LoRA loader for this transformer: its lora_state_dict knows the other trainers' key layouts
    lora_loader: type | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # how a kind's LoRA files name its layers lives in the registry, where writing a file reads it without
        # importing this class (and diffusers): i2l.backbones.lora_naming
        if cls.kind:
            cls.lora_prefix = lora_naming(cls.kind).lora_prefix

    @classmethod
    def lora_names(cls, format: str) -> tuple[tuple[str, str], ...]:
        """The renaming table `LoRA.save(..., format=format, backbone=cls)` writes this backbone's layers with."""
        return lora_naming(cls.kind).lora_names(format)

    def __init__(self, targets: tuple[str, ...]):
        self.target_suffixes = tuple(targets)
        self._lora: BatchedLoRA | None = None
        self._targets: dict[str, tuple[int, int]] | None = None

    def convert_lora_keys(self, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors in another trainer's key layout (kohya `lora_unet_*` with lora_down/up and α,
        ai-toolkit / BFL module names with fused q·k·v, PEFT) -> diffusers keys, converted by the pipeline's own
        `lora_state_dict`, so a file changes i2l's model as `load_lora_weights` changes the pipeline. It is given
        the tensors, not the path: diffusers reads no file here (safetensors only, never a pickle)."""
        if self.lora_loader is None:
            return tensors
        try:
            return self.lora_loader.lora_state_dict(dict(tensors))
        except (ValueError, KeyError, IndexError, AssertionError) as e:
            raise ValueError(f"{source}: diffusers' {self.lora_loader.__name__} cannot read this file's LoRA keys "
                             f"(e.g. {list(tensors)[:3]}): {e}") from e

    # ----- to implement -----
    transformer_class: type  # the diffusers transformer class, as random init and sizing build it from `architecture`

    @classmethod
    def architecture(cls, bc: BackboneConfig) -> dict:
        """The transformer's config for the preset `bc`, read without weights (sizing and random init)."""
        raise NotImplementedError

    @classmethod
    def random(cls, bc: BackboneConfig, seed: int = 0) -> Backbone:
        """A backbone of the preset's architecture with random weights: speed, memory and shapes only."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditioning (B, L, D) for `prompts`, each distinct prompt encoded once: batches often repeat one
        (CFG's negative prompt on every row, a held-out sample's prompt over its noise grid), and a real text
        encoder (Qwen3 at 512 tokens) costs per row. Rows are independent in every backbone's encoding (fixed
        padding, or Cond.cat's padding to the longest, which the distinct prompts already have), so the gathered
        rows equal a full batch's. Not while gradients train the text encoder (the toy backbone's pretraining):
        a gathered row would sum its gradients in another order."""
        prompts = list(prompts)
        distinct = list(dict.fromkeys(prompts))
        encoder = getattr(self, "text_encoder", None)
        learns = torch.is_grad_enabled() and isinstance(encoder, nn.Module) and any(
            p.requires_grad for p in encoder.parameters())
        if len(distinct) == len(prompts) or learns:
            return self._encode_prompts(prompts)
        cond = self._encode_prompts(distinct)
        where = {p: i for i, p in enumerate(distinct)}
        return cond.index(torch.tensor([where[p] for p in prompts], device=cond.embeds.device))

    def _encode_prompts(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents x1."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        raise NotImplementedError

    def sampling_schedule(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """steps+1 values of t from 0 (noise) to 1 (data): the grid this backbone's own pipeline samples on for
        latents of latent_shape (C, h, w). Uniform here; the diffusers backbones ask their pipeline's scheduler."""
        return schedule.uniform(steps)

    def training_timesteps(self, latent_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The grid of t (G,) this backbone's own training recipe draws training timesteps from (uniformly), for
        latents of latent_shape (C, h, w); None = no grid: a continuous logit-normal t, as the toy backbone is
        pretrained. The diffusers backbones give their scheduler's shifted grid (i2l/backbones/schedule.py)."""
        return None

    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v for x_t already in the backbone's weight dtype (`velocity` casts in and back out)."""
        raise NotImplementedError

    def prompt_text(self, prompt: str) -> str:
        """The text the diffusers pipeline tokenizes for a prompt: its chat template (`chat_thinking` as the
        pipeline sets enable_thinking), so prompt lengths are counted on what the text encoder really gets."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=self.chat_thinking)

    # ----- shared -----
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, lora: LoRA | None = None,
                 strength: float = 1.0) -> torch.Tensor:
        """v(x_t, t, c) ≈ x1 - x0, with an optional (batched) LoRA on the target layers: computed in the
        backbone's weight dtype, handed back in x_t's."""
        x = x_t.to(self.dtype)
        if lora is None:
            return self._velocity(x, t, cond).to(x_t.dtype)
        with self.lora_adapter.use(lora, strength):
            return self._velocity(x, t, cond).to(x_t.dtype)

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """Adaptable linear layers: module name (diffusers' spelling) -> (in_features, out_features)."""
        if self._targets is None:
            found = {}
            for name, m in self.transformer.named_modules():
                if isinstance(m, nn.Linear) and any(name == s or name.endswith("." + s) for s in self.target_suffixes):
                    found[name] = (m.in_features, m.out_features)
            if not found:
                raise ValueError(f"no linear layer of {type(self.transformer).__name__} matches targets "
                                 f"{self.target_suffixes}")
            self._targets = found
        return self._targets

    @property
    def lora_adapter(self) -> BatchedLoRA:
        if self._lora is None:
            self._lora = BatchedLoRA(self.transformer, list(self.lora_targets()))
        return self._lora

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def modules(self) -> list[nn.Module]:
        """All frozen modules of the backbone (for .to / freezing)."""
        return [self.transformer]

    def freeze(self) -> Backbone:
        for m in self.modules():
            m.eval()
            m.requires_grad_(False)
        return self

    def to(self, device=None, dtype=None) -> Backbone:
        for m in self.modules():
            # no cast when it is already that dtype: diffusers warns on any dtype in `to()` (make run printed a
            # float32 warning for an empty list of float32 modules)
            if dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                         for t in [*m.parameters(), *m.buffers()]):
                m.to(device=device, dtype=dtype)
            else:
                m.to(device=device)
        return self
