"""Upscalers that bring validated images to the preset's square resolution: Lanczos on CPU (default) or a
diffusers super-resolution pipeline loaded from a local directory (run on GPU actors by `prepare`)."""

from __future__ import annotations

import inspect
import zlib
from pathlib import Path
from typing import Protocol

from PIL import Image

from i2l.config import DataConfig


class Upscaler(Protocol):
    name: str
    needs_gpu: bool

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        """RGB images of any size (aspect within data.max_aspect) -> resolution x resolution RGB images."""
        ...


def center_square(im: Image.Image) -> Image.Image:
    """Crop the central square: training wants square images and MegaStyle is square already."""
    w, h = im.size
    if w == h:
        return im
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def lanczos(im: Image.Image, resolution: int) -> Image.Image:
    im = center_square(im)
    if im.size == (resolution, resolution):
        return im
    return im.resize((resolution, resolution), Image.LANCZOS)


class LanczosUpscaler:
    """Plain Lanczos resampling on CPU: exact, fast, deterministic."""

    name = "lanczos"
    needs_gpu = False

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        return [lanczos(im, self.resolution) for im in images]


class DiffusersUpscaler:
    """A diffusers upscale / super-resolution pipeline from a local directory (safetensors only, no remote code).

    Images already at or above the resolution are only Lanczos-resized (super-resolution cannot help them);
    the pipeline's output is Lanczos-resized to the exact resolution, whatever its scale factor.
    """

    needs_gpu = True

    def __init__(self, path: str | Path, resolution: int, device: str = "cuda", steps: int = 20, seed: int = 0):
        import torch
        from diffusers import DiffusionPipeline

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"data.upscaler={path} is not a diffusers pipeline directory (no "
                                    "model_index.json); use data.upscaler=lanczos or a local pipeline dir")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("data.upscaler_device=cuda but this worker sees no GPU; use data.upscaler_device=cpu")
        dtype = torch.float16 if device == "cuda" else torch.float32
        # local_files_only: never reach a hub; use_safetensors: never unpickle weights.
        self.pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                      dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = f"diffusers:{type(self.pipe).__name__}"
        self.resolution, self.device, self.steps, self.seed = resolution, device, steps, seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        params = inspect.signature(self.pipe.__call__).parameters
        self._takes_prompt = "prompt" in params
        # SD x4 / latent x2 default to guidance_scale=9: CFG with "" on both branches only doubles the unet batch.
        # diffusers runs CFG only when guidance_scale > 1.
        self._no_cfg = {"guidance_scale": 1.0} if "guidance_scale" in params else {}

    def _run(self, images: list[Image.Image]) -> list[Image.Image]:
        import numpy as np
        import torch

        # Seeded from the batch (batches are fixed by the plan): a re-run gives the same pixels on any worker.
        self.generator.manual_seed(self.seed ^ zlib.crc32(images[0].tobytes()))
        kw = {"num_inference_steps": self.steps, "generator": self.generator, "output_type": "pil"}
        if self._takes_prompt:  # text-conditioned upscalers (SD x4): an empty prompt, no guidance
            return self.pipe(prompt=[""] * len(images), image=images, **self._no_cfg, **kw).images
        # Unconditional SR (LDM): a (B, 3, H, W) batch in [-1, 1], sides a multiple of 32.
        side = max(32, images[0].size[0] // 32 * 32)
        arr = np.stack([np.asarray(im.resize((side, side), Image.LANCZOS), np.float32) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W)
        return self.pipe(image=x, **kw).images

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        out: list[Image.Image | None] = [None] * len(images)
        small = {}  # group by side: a pipeline batch needs one size
        for i, im in enumerate(images):
            im = center_square(im)
            if im.size[0] >= self.resolution:
                out[i] = lanczos(im, self.resolution)
            else:
                small.setdefault(im.size[0], []).append((i, im))
        for group in small.values():
            results = self._run([im for _, im in group])
            for (i, _), res in zip(group, results):
                out[i] = lanczos(res.convert("RGB"), self.resolution)
        return out  # type: ignore[return-value]


def load_upscaler(cfg: DataConfig) -> Upscaler:
    """`data.upscaler`: `lanczos`, or a local diffusers pipeline directory."""
    if cfg.upscaler == "lanczos":
        return LanczosUpscaler(cfg.resolution)
    return DiffusersUpscaler(cfg.upscaler, cfg.resolution, device=cfg.upscaler_device, steps=cfg.upscaler_steps,
                             seed=cfg.seed)


def upscaler_needs_gpu(cfg: DataConfig) -> bool:
    """Whether prepare must place the upscaler on GPU actors (decided without loading it)."""
    if cfg.upscaler == "lanczos":
        return False
    if not Path(cfg.upscaler).is_dir():
        raise FileNotFoundError(f"data.upscaler must be 'lanczos' or a local diffusers pipeline directory; "
                                f"{cfg.upscaler!r} does not exist")
    return cfg.upscaler_device == "cuda"
