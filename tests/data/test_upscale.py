"""Upscalers: Lanczos gives exact square outputs; a diffusers super-resolution pipeline loads from a local
directory (safetensors only) and runs inside `prepare` (on CPU here; GPU actors on a real cluster)."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import conftest_ray
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from i2l.config import get_config
from i2l.data.upscale import (
    DiffusersUpscaler,
    LanczosUpscaler,
    center_square,
    load_upscaler,
    upscaler_needs_gpu,
)

ray_session = conftest_ray.ray_session


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_lanczos_square_and_exact():
    up = LanczosUpscaler(64)
    out = up([_img(32, 32), _img(48, 32), _img(100, 100)])
    assert [im.size for im in out] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in out)
    wide = _img(48, 32)
    assert center_square(wide).tobytes() == wide.crop((8, 0, 40, 32)).tobytes()  # the middle, not a squash
    same = _img(64, 64)
    assert up([same])[0].tobytes() == same.tobytes()  # already there: untouched
    assert isinstance(load_upscaler(get_config("debug").data), LanczosUpscaler)


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory):
    """A tiny random LDM super-resolution pipeline (x2), saved like a downloaded one, as safetensors."""
    import torch
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, norm_num_groups=8, num_vq_embeddings=16, vq_embed_dim=3)
    unet = UNet2DModel(sample_size=32, in_channels=6, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=8)
    path = tmp_path_factory.mktemp("sr") / "ldm-sr"
    LDMSuperResolutionPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(
        path, safe_serialization=True)
    return path


@pytest.mark.slow  # importing torch + diffusers alone takes ~10 s on 2 busy cores
def test_diffusers_upscaler(sr_dir):
    up = DiffusersUpscaler(sr_dir, resolution=64, device="cpu", steps=2)
    batch = [_img(32, 32, 1), _img(40, 32, 2)]
    out = up(batch)
    assert [im.size for im in out] == [(64, 64)] * 2 and up.name == "diffusers:LDMSuperResolutionPipeline"
    assert [im.tobytes() for im in up(batch)] == [im.tobytes() for im in out]  # seeded: re-runs agree
    big = _img(80, 80, 3)  # already above the resolution: Lanczos only, the pipeline is not run
    assert up([big])[0].tobytes() == LanczosUpscaler(64)([big])[0].tobytes()


class FakeSDUpscale:
    """The call contract of diffusers' StableDiffusionUpscalePipeline (0.42): guidance_scale defaults to 9, and
    guidance_scale > 1 runs classifier-free guidance, i.e. the unet sees 2B latents instead of B."""

    def __init__(self):
        self.unet_batches = []

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt, image, num_inference_steps=75, guidance_scale=9.0, generator=None, output_type="pil"):
        self.unet_batches.append(len(prompt) * (2 if guidance_scale > 1.0 else 1))
        return SimpleNamespace(images=[im.resize((4 * im.size[0],) * 2) for im in image])


def test_text_conditioned_upscaler_runs_without_guidance(tmp_path, monkeypatch):
    """An empty prompt on both CFG branches changes nothing but doubles the unet's work: the call must turn it off."""
    pipe = FakeSDUpscale()
    fake = SimpleNamespace(DiffusionPipeline=SimpleNamespace(from_pretrained=lambda *a, **kw: pipe))
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    (tmp_path / "model_index.json").write_text("{}")
    up = DiffusersUpscaler(tmp_path, resolution=64, device="cpu", steps=2)
    out = up([_img(16, 16, 1), _img(16, 16, 2), _img(16, 16, 3)])
    assert [im.size for im in out] == [(64, 64)] * 3
    assert pipe.unet_batches == [3]  # B, not 2B


@pytest.mark.slow
def test_diffusers_upscaler_refuses_unsafe_or_missing(sr_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusersUpscaler(tmp_path, resolution=64, device="cpu")
    cfg = get_config("debug", {"data.upscaler": str(tmp_path / "nope")}).data
    with pytest.raises(FileNotFoundError, match="lanczos"):
        upscaler_needs_gpu(cfg)
    from diffusers import LDMSuperResolutionPipeline

    pickled = tmp_path / "pickled"  # the same pipeline saved as .bin pickles must not load
    LDMSuperResolutionPipeline.from_pretrained(sr_dir).save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(OSError, match="safetensors"):
        DiffusersUpscaler(pickled, resolution=64, device="cpu")


@pytest.mark.slow
def test_prepare_with_diffusers_upscaler(ray_session, sr_dir, tmp_path):
    from i2l.data.prepare import prepare
    from i2l.toy.world import write_toyworld

    cfg = get_config("debug", {"data.upscaler": str(sr_dir), "data.upscaler_device": "cpu",
                               "data.upscaler_steps": 2, "data.resolution": 64, "data.concurrency": 2})
    cfg.toyworld.styles = 4
    write_toyworld(cfg.toyworld, tmp_path / "in", progress=False)
    s = prepare(cfg, tmp_path / "in", tmp_path / "out", progress=False)
    assert s.rows_written == 32 and s.rows_quarantined == 0
    t = pq.read_table(min((tmp_path / "out").glob("*/part-*.parquet")))
    assert set(t.column("width").to_pylist()) == {64}
    assert Image.open(io.BytesIO(t.column("image")[0].as_py())).size == (64, 64)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["data_config"]["upscaler"] == str(sr_dir)
