"""The Python API: `I2L.load(checkpoint_dir)`, `predict_lora(images)`, `gray_lora()`, `generate(...)`.

    from i2l import I2L
    model = I2L.load("data/runs/toy/train")
    lora = model.predict_lora(["a.png", "b.png"])        # one LoRA from 1..N references
    lora.save("style.safetensors")                         # loads in diffusers' load_lora_weights
    images = model.generate(["one large circle in the center"], [lora], guidance=2.0, seed=0)
    edited = model.generate(["one large circle"], [lora], init_images="photo.png", denoise=0.6)  # img2img
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from i2l.backbones import load_backbone
from i2l.backbones.base import Backbone
from i2l.backbones.registry import lora_naming
from i2l.config import Config
from i2l.data.images import gray_image, load_image_file, to_pil, to_tensor
from i2l.infer.guidance import DEFAULT_DENOISE, NEGATIVES, denoise_steps, sample, stack_rows
from i2l.model.encoder import ImageEncoder, load_encoder
from i2l.model.finite import require_finite
from i2l.model.flow_matching import mixed_precision
from i2l.model.lora import LoRA
from i2l.model.predictor import I2LPredictor, predict_lora
from i2l.train.checkpoint import check_fits, checkpoint_config, read_state, resolve_checkpoint

log = logging.getLogger(__name__)


class I2L:
    """A trained predictor with its frozen encoder and backbone."""

    def __init__(self, cfg: Config, backbone: Backbone, encoder: ImageEncoder, predictor: I2LPredictor,
                 checkpoint: Path | None = None):
        self.cfg, self.backbone, self.encoder, self.predictor = cfg, backbone, encoder, predictor
        self.checkpoint = checkpoint
        self._gray: dict[int, LoRA] = {}  # by the number of gray images

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str = "cpu", data_root: str | None = None,
             backbone: bool = True) -> I2L:
        """Load from a training run directory (its newest intact checkpoint) or one checkpoint directory (or, when
        that one is broken, the newest intact older step of its run); each broken step skipped is logged as a warning.

        backbone=False: predict-only (mass production): the adapted layers come from the checkpoint's record, so
        the (large) backbone is not loaded; `generate` then refuses."""
        from safetensors.torch import load_file

        ck = resolve_checkpoint(checkpoint_dir)
        cfg = checkpoint_config(ck, data_root)
        if data_root:
            cfg.data_root = data_root
        state = read_state(ck)
        if backbone:
            bb = load_backbone(cfg).to(device)
            check_fits(state, bb, str(ck))
            targets, backbone_id = bb.lora_targets(), bb.backbone_id
        else:
            bb, backbone_id = None, state["backbone_id"]
            targets = {k: tuple(v) for k, v in state["targets"].items()}
        encoder = load_encoder(cfg.encoder).to(device)
        predictor = I2LPredictor(cfg.predictor, targets, encoder.dim, backbone_id)
        predictor.load_state_dict(load_file(str(ck / "predictor.safetensors")))
        predictor.to(device).eval().requires_grad_(False)
        return cls(cfg, bb, encoder, predictor, ck)

    @property
    def checkpoint_id(self) -> str:
        return f"{self.checkpoint.parent.parent.name}/{self.checkpoint.name}" if self.checkpoint else "untrained"

    @property
    def lora_prefix(self) -> str:
        """Key prefix of this backbone's diffusers LoRA files (`LoRA.save(path, prefix=...)`)."""
        if self.backbone is not None:
            return self.backbone.lora_prefix
        return lora_naming(self.cfg.backbone.kind).lora_prefix  # the registry's: no backbone (nor its class) to load

    def _images(self, images) -> torch.Tensor:
        pil = [im if isinstance(im, Image.Image) else load_image_file(im) for im in images]
        if not pil:
            raise ValueError("no reference images given: i2L needs at least one")
        return to_tensor(pil, self.cfg.encoder.image_size)  # any size/mode in, one size out

    @torch.no_grad()
    def predict_lora(self, images) -> LoRA:
        """One LoRA from 1..N references (paths or PIL images), fused by token concatenation (paper §4.5)."""
        refs = self._images(images).unsqueeze(0)  # (1, N, 3, S, S)
        lora = self._predict(refs)[0]
        lora.meta.update({"checkpoint": self.checkpoint_id, "n_refs": refs.shape[1]})
        return lora

    @torch.no_grad()
    def predict_loras(self, ref_sets: list[list]) -> list[LoRA]:
        """A batch of style LoRAs, one per reference set (sets may differ in size)."""
        tensors = [self._images(s) for s in ref_sets]
        N = max(t.shape[0] for t in tensors)
        refs = torch.zeros(len(tensors), N, *tensors[0].shape[1:])
        for i, t in enumerate(tensors):
            refs[i, : t.shape[0]] = t
        n = torch.tensor([t.shape[0] for t in tensors])
        out = self._predict(refs, n).unbind()
        for lo, k in zip(out, n.tolist()):
            lo.meta.update({"checkpoint": self.checkpoint_id, "n_refs": k})
        return out

    def _predict(self, refs: torch.Tensor, n_refs: torch.Tensor | None = None) -> LoRA:
        """Reference sets (U, N, 3, S, S) -> U LoRAs, predicted in the backbone's precision and returned as fp32 on
        the CPU: files and mixing stay fp32 whatever the forward ran in."""
        with mixed_precision(self.encoder.device, self.cfg.backbone.dtype):
            out = predict_lora(self.predictor, self.encoder, refs.to(self.encoder.device), n_refs)
        out.check_finite(f"LoRA predicted by checkpoint {self.checkpoint_id}")  # on the device: one sync
        return out.to_host(torch.float32)

    def gray_lora(self, n_refs: int = 1) -> LoRA:
        """The neutral LoRA predicted from pure gray images: the negative branch of asymmetric guidance. One gray
        image, or (eval.gray_negative="per_reference", as the authors' release) as many as the positive LoRA's
        n_refs references."""
        n = max(1, int(n_refs)) if self.cfg.eval.gray_negative == "per_reference" else 1
        if n not in self._gray:
            self._gray[n] = self.predict_lora([gray_image(self.cfg.encoder.image_size)] * n)
            self._gray[n].meta["kind"] = "gray"
        return self._gray[n]

    def init_latents(self, init_images) -> torch.Tensor:
        """Init images of img2img (a path or PIL image, or a list of them) -> latents x1 (K, *latent). An image not
        of the model's size (backbone.image_size, square) is resized to it, with a warning saying so."""
        if isinstance(init_images, (str, Path, Image.Image)):
            init_images = [init_images]
        pil = [im if isinstance(im, Image.Image) else load_image_file(im, "init image") for im in init_images]
        if not pil:
            raise ValueError("init_images is empty: give one init image, or one per prompt")
        size = self.cfg.backbone.image_size
        for src, im in zip(init_images, pil):
            if im.size != (size, size):
                name = src if not isinstance(src, Image.Image) else "an init image"
                log.warning(f"init image {name} is {im.size[0]}x{im.size[1]}: resized to the model's {size}x{size}"
                            " (backbone.image_size)")
        images = to_tensor(pil, size).to(self.backbone.device)  # (K, 3, S, S) in [-1, 1]
        return self.backbone.encode_images(images).float()  # (K, *latent)

    def _check_generate_args(self, negative, negative_lora, init_images, denoise, steps, inpaint) -> float:
        """Refuse what `generate` cannot do, before any work; the denoise it runs (default: 1, or 0.6 for img2img)."""
        if self.backbone is None:
            raise ValueError("this I2L was loaded with backbone=False (predict-only): load it with the backbone "
                             "to generate")
        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {', '.join(NEGATIVES)}, got {negative!r}")
        if isinstance(negative_lora, str) and negative_lora != "gray":
            raise ValueError("negative_lora must be 'gray', None or a LoRA")
        if negative != "gray" and not isinstance(negative_lora, str):
            raise ValueError(f"negative={negative!r} and negative_lora= both choose the negative branch: give one")
        if denoise is None:
            denoise = 1.0 if init_images is None else DEFAULT_DENOISE
        denoise_steps(steps, denoise)  # checks denoise is in [0, 1]
        if init_images is None and denoise != 1.0:
            raise ValueError(f"denoise={denoise:g} needs init_images (img2img) to start from")
        if init_images is not None and inpaint is not None:
            raise ValueError("init_images (img2img) and inpaint together are not supported: inpaint regenerates "
                             "the mask's region from noise; use one of them")
        return denoise

    @torch.no_grad()
    def generate(self, prompts: list[str], loras: list[LoRA | None] | LoRA | None = None,
                 negative_lora: LoRA | str | None = "gray", guidance: float | None = None, steps: int | None = None,
                 seed: int | list[int] = 0, strength: float = 1.0, negative_prompt: str = "",
                 inpaint: tuple[torch.Tensor, torch.Tensor] | None = None, negative: str = "gray",
                 init_images=None, denoise: float | None = None, passes: str = "auto") -> list[Image.Image]:
        """Sample one image per prompt with its LoRA.

        negative: the CFG negative branch. "gray" = the gray-image LoRA (the paper's asymmetric guidance); "base" =
        the base model, no LoRA (the authors' Z-Image example); "none" = no CFG, one positive pass per step,
        guidance ignored. A step-distilled backbone samples without CFG whatever is asked (it warns). With "gray",
        negative_lora may replace the gray LoRA: None = plain CFG (the positive LoRA on both branches), or a LoRA.
        init_images (img2img): one image (path or PIL) for every prompt or one per prompt, or their latents
        (K, *latent); denoise in [0, 1] (default 0.6, as diffusers' img2img pipelines) is the fraction of the
        steps sampled, from the init image noised to that point (1 = from pure noise: text-to-image; 0 = the init
        image back through the VAE).
        seed: one for the batch, or one per prompt (then an image does not depend on what it is batched with).
        passes: how the two CFG branches run per step, "joint" (one forward of 2B rows), "split" (two of B rows) or
        "auto" (the one measured faster on this device); the images are the same."""
        steps = steps or self.cfg.eval.sample_steps
        denoise = self._check_generate_args(negative, negative_lora, init_images, denoise, steps, inpaint)
        guidance = require_finite(self.cfg.eval.guidance if guidance is None else guidance, "guidance")
        if hasattr(self.backbone, "sampling_guidance"):  # a step-distilled backbone: no CFG, as its own pipeline
            guidance = self.backbone.sampling_guidance(guidance)
        if negative == "none":
            guidance = 1.0  # one positive pass per step
        strength = require_finite(strength, "strength")
        n = len(prompts)
        if isinstance(loras, LoRA) or loras is None:
            loras = [loras] * n
        if len(loras) != n:
            raise ValueError(f"{n} prompts but {len(loras)} LoRAs")
        init = None
        if init_images is not None:
            init = init_images if isinstance(init_images, torch.Tensor) else self.init_latents(init_images)
            if len(init) not in (1, n):
                raise ValueError(f"{n} prompts but {len(init)} init images: give one for all prompts or one each")
        base_targets = self.backbone.lora_targets()
        for lo in loras:
            if lo is not None:
                from i2l.model.lora import check_compatible
                check_compatible(lo, self.backbone)
                lo.check_finite()
        zero = LoRA({k: torch.zeros(1, v[0]) for k, v in base_targets.items()},
                    {k: torch.zeros(v[1], 1) for k, v in base_targets.items()}, self.backbone.backbone_id)
        pos = LoRA.stack([lo if lo is not None else zero for lo in loras]).to(self.backbone.device)
        cfg = guidance != 1.0  # else `sample` runs the positive branch only: no negative LoRA or prompt to make
        neg = None  # negative="base": no LoRA on the negative branch (`sample` gives it a zero LoRA)
        if cfg and negative == "gray":
            if isinstance(negative_lora, str):  # "gray"
                neg = stack_rows([self.gray_lora(lo.meta.get("n_refs", 1) if lo is not None else 1) for lo in loras])
            elif negative_lora is None:
                neg = pos  # plain CFG: the same LoRA on both branches
            else:
                neg = LoRA.stack([negative_lora.check_finite("negative_lora")] * n)
        shape = self.backbone.latent_shape(self.cfg.backbone.image_size)
        # noise (B, *latent) fp32 on the CPU: `sample` moves it to the device (its state stays fp32)
        if isinstance(seed, int):
            noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        elif len(seed) == n:
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seed])
        else:
            raise ValueError(f"{n} prompts but {len(seed)} seeds")
        if init is not None and tuple(init.shape[1:]) != tuple(shape):
            raise ValueError(f"init latents have shape {tuple(init.shape[1:])} but this model samples {tuple(shape)}")
        cond = self.backbone.encode_prompts(prompts)
        neg_cond = self.backbone.encode_prompts([negative_prompt] * n) if cfg else None
        x = sample(self.backbone, cond, neg_cond, pos, None if neg is None else neg.to(self.backbone.device),
                   guidance, steps, noise=noise, strength=strength, inpaint=inpaint, init=init, denoise=denoise,
                   passes=passes)
        return to_pil(self.backbone.decode_latents(x))
