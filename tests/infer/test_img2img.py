"""Img2img with predicted LoRAs: the sampler starts on the backbone's own grid at the point where a fraction D
(denoise) of the steps remains, from the init image's latents noised to that point, and runs only those steps with
the same asymmetric CFG. D=1 is text-to-image bit for bit, D=0 the init image's VAE round trip; on the toy, the
FLUX.2 and Z-Image tiny backbones; and `i2l generate --init-image --denoise`, checked before any model loads."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import PROMPTS, tiny_flux2, tiny_zimage

from i2l.cli import main as cli
from i2l.config import get_config
from i2l.data.images import to_pil, to_tensor
from i2l.infer.api import I2L
from i2l.infer.generation import read_table
from i2l.infer.guidance import denoise_steps, sample
from i2l.model.predictor import I2LPredictor
from i2l.toy.encoder import new_toy_encoder

SIZE = 32


def picture(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


def pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])  # (B, H, W, 3)


def tiny_i2l(kind: str) -> I2L:
    """An I2L around a tiny FLUX.2 / Z-Image backbone with an untrained predictor whose LoRAs are not zero."""
    bb = (tiny_flux2 if kind == "flux2" else tiny_zimage)()
    cfg = get_config("debug")
    cfg.backbone.image_size = SIZE
    enc = new_toy_encoder(cfg.encoder)
    torch.manual_seed(0)
    pred = I2LPredictor(cfg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.1)  # non-zero LoRAs, so the gray negative differs from the positive
    return I2L(cfg, bb, enc, pred)


@pytest.fixture(scope="module")
def toy(debug_run):
    """The trained debug checkpoint, a style LoRA, prompts, and an init image of the toy world (another style)."""
    from i2l.eval.heldout_loss import load_val_samples

    model = I2L.load(debug_run.run_dir)
    s = load_val_samples(debug_run.prepared_dir)
    return model, model.predict_lora(s[0].refs), [s[0].prompt, s[1].prompt], s[1].target.convert("RGB")


@pytest.fixture(scope="module", params=["toy", "flux2", "zimage"])
def any_backbone(request, toy):
    """(model, LoRA, prompts) for each backbone kind."""
    if request.param == "toy":
        model, lora, prompts, _ = toy
        return model, lora, prompts
    model = tiny_i2l(request.param)
    return model, model.predict_lora([picture(5), picture(6)]), PROMPTS[:2]


def counted(monkeypatch, backbone) -> list[int]:
    """Counts the backbone's forward passes: one entry per call, its number of batch rows."""
    rows: list[int] = []
    forward = backbone._velocity

    def counting(x, t, cond):
        rows.append(len(x))
        return forward(x, t, cond)

    monkeypatch.setattr(backbone, "_velocity", counting)
    return rows


# ---------- the two ends ----------
def test_denoise_one_is_text_to_image_bit_for_bit(any_backbone):
    model, lora, prompts = any_backbone
    kw = {"guidance": 3.0, "steps": 3, "seed": [4, 5]}
    t2i = model.generate(prompts, lora, **kw)
    i2i = model.generate(prompts, lora, init_images=picture(1), denoise=1.0, **kw)
    assert torch.equal(pixels(i2i), pixels(t2i))
    # and in latent space, in the sampler itself: (1 - 0)·noise + 0·x1 is the noise, exactly
    bb = model.backbone
    shape = bb.latent_shape(SIZE)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    cond, neg = bb.encode_prompts(prompts), bb.encode_prompts([""] * 2)
    pos = lora.expand(2).to(bb.device)
    a = sample(bb, cond, neg, pos, None, 3.0, 3, noise=noise)
    b = sample(bb, cond, neg, pos, None, 3.0, 3, noise=noise, init=model.init_latents(picture(1)), denoise=1.0)
    assert torch.equal(a, b)


def test_denoise_zero_returns_the_init_images_vae_round_trip(any_backbone, monkeypatch):
    model, lora, prompts = any_backbone
    init = [picture(1), picture(2)]
    rows = counted(monkeypatch, model.backbone)
    out = model.generate(prompts, lora, init_images=init, denoise=0.0, guidance=3.0, steps=3, seed=0)
    assert rows == [], "denoise 0 samples no step"
    bb = model.backbone
    round_trip = to_pil(bb.decode_latents(bb.encode_images(to_tensor(init, SIZE).to(bb.device))))
    assert torch.equal(pixels(out), pixels(round_trip))
    if bb.kind == "toy":  # pixel space: the round trip is the image itself
        assert torch.equal(pixels(out), pixels(init))


# ---------- in between ----------
def test_partial_denoise_runs_its_share_of_the_steps_and_stays_near_the_init(toy, monkeypatch):
    model, lora, prompts, init = toy
    steps, n = 8, len(prompts)
    rows = counted(monkeypatch, model.backbone)
    far = {}
    for d in (0.25, 0.5, 0.75, 1.0):
        rows.clear()
        out = model.generate(prompts, lora, init_images=init, denoise=d, guidance=3.0, steps=steps, seed=[1, 2],
                             passes="joint")
        assert len(rows) == round(d * steps) and set(rows) == {2 * n}, (d, rows)  # both CFG branches, one forward
        far[d] = float((pixels(out) - pixels([init] * n)).abs().mean())  # mean |Δ| in 0..255 levels
    assert far[0.25] < far[0.5] < far[0.75] < far[1.0], far  # measured on the debug run: 31, 61, 86, 104
    assert far[0.25] < 0.5 * far[1.0], far


def test_the_start_is_the_noised_init_on_the_backbones_own_grid():
    """Against an independent two-pass loop on FLUX.2's shifted (non-uniform) grid: start at ts[k] with
    x = (1 - ts[k])·noise + ts[k]·x1, then the remaining Euler steps with v = v_neg + s·(v_pos − v_neg)."""
    model = tiny_i2l("flux2")
    bb = model.backbone
    steps, d, s = 5, 0.6, 2.5
    lora = model.predict_lora([picture(5)])
    gray = model.gray_lora()
    x1 = model.init_latents([picture(1)])
    noise = torch.randn(1, *bb.latent_shape(SIZE), generator=torch.Generator().manual_seed(3))
    cond, neg = bb.encode_prompts(PROMPTS[:1]), bb.encode_prompts([""])
    got = sample(bb, cond, neg, lora.expand(1), gray.expand(1), s, steps, noise=noise, init=x1, denoise=d)
    ts = bb.sampling_schedule(steps, tuple(noise.shape[1:]))
    k = steps - 3  # 0.6·5 = 3 steps remain
    x = (1 - ts[k]) * noise + ts[k] * x1
    with torch.no_grad():
        for i in range(k, steps):
            t = ts[i].expand(1)
            v_pos, v_neg = bb.velocity(x, t, cond, lora), bb.velocity(x, t, neg, gray)
            x = x + (ts[i + 1] - ts[i]) * (v_neg + s * (v_pos - v_neg))
    assert (got - x).abs().max() < 1e-5


@pytest.mark.parametrize("steps, denoise, guidance", [(4, 0.5, 1.0), (6, 0.25, 1.0), (10, 0.7, 1.0), (5, 0.6, 3.0)])
def test_img2img_equals_diffusers_zimage_img2img_pipeline(steps, denoise, guidance):
    """ZImageImg2ImgPipeline's own __call__ (its step count, start sigma, scale_noise and Euler steps; CFG with its
    guidance_scale g = i2l's s − 1), given the init latents i2l encodes (a latent `image` passes its preprocessing
    unchanged) and the same noise (its generator's first draw): the same images."""
    from diffusers import ZImageImg2ImgPipeline
    from diffusers.image_processor import VaeImageProcessor

    bb = tiny_zimage()
    p = bb.pipe
    pipe = ZImageImg2ImgPipeline(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                 transformer=p.transformer)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2,
                                             vae_latent_channels=p.vae.config.latent_channels)
    pipe.set_progress_bar_config(disable=True)
    x1 = bb.encode_images(to_tensor([picture(1)], SIZE))
    cond, neg = bb.encode_prompts(PROMPTS[:1]), bb.encode_prompts([""])
    caps = [[e[m] for e, m in zip(c.embeds, c.mask)] if c.mask is not None else list(c.embeds) for c in (cond, neg)]
    theirs = pipe(prompt_embeds=caps[0], negative_prompt_embeds=caps[1], image=x1, strength=denoise, height=SIZE,
                  width=SIZE, num_inference_steps=steps, guidance_scale=guidance - 1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images * 2 - 1
    noise = torch.randn(1, *bb.latent_shape(SIZE), generator=torch.Generator().manual_seed(3))
    ours = bb.decode_latents(sample(bb, cond, neg, None, None, guidance, steps, noise=noise, init=x1,
                                    denoise=denoise))
    assert (theirs - ours).abs().max() < 1e-5
    pipe.scheduler.set_timesteps(steps)
    assert pipe.get_timesteps(steps, denoise, "cpu")[1] == denoise_steps(steps, denoise)


def test_denoise_steps_counts_as_diffusers_and_refuses_what_is_not_a_fraction():
    assert [denoise_steps(10, d) for d in (0.0, 0.04, 0.35, 0.6, 0.7, 1.0)] == [0, 1, 4, 6, 7, 10]  # rounded up
    for bad in (1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="denoise"):
            denoise_steps(10, bad)


# ---------- init images ----------
def test_one_init_image_per_prompt_and_other_sizes_are_resized(toy, caplog):
    model, lora, prompts, init = toy
    other = picture(7, size=48)  # not the model's 32 px
    kw = {"denoise": 0.5, "guidance": 3.0, "steps": 4}
    with caplog.at_level(logging.WARNING, logger="i2l"):
        pair = model.generate(prompts, lora, init_images=[init, other], seed=[1, 2], **kw)
    assert any("48x48: resized to the model's 32x32" in r.getMessage() for r in caplog.records)
    first = model.generate(prompts[:1], lora, init_images=[init], seed=[1], **kw)
    second = model.generate(prompts[1:], lora, init_images=[other.resize((SIZE, SIZE), Image.LANCZOS)], seed=[2], **kw)
    assert (pixels(pair) - pixels(first + second)).abs().max() <= 1  # each prompt started from its own image
    shared = model.generate(prompts, lora, init_images=init, seed=[1, 2], **kw)  # one image for every prompt
    assert (pixels(shared[:1]) - pixels(first)).abs().max() <= 1
    with pytest.raises(ValueError, match="2 prompts but 3 init images"):
        model.generate(prompts, lora, init_images=[init] * 3, **kw)


def test_bad_img2img_arguments_are_clear_errors(toy):
    model, lora, prompts, init = toy
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="denoise"):
            model.generate(prompts, lora, init_images=init, denoise=bad, steps=2)
    with pytest.raises(ValueError, match="needs init_images"):
        model.generate(prompts, lora, denoise=0.5, steps=2)
    known = torch.zeros(1, *model.backbone.latent_shape(SIZE))
    with pytest.raises(ValueError, match="inpaint together are not supported"):
        model.generate(prompts[:1], lora, init_images=init, denoise=0.5, steps=2,
                       inpaint=(known, torch.ones(1, 1, SIZE, SIZE)))


# ---------- the command ----------
def test_generate_command_img2img_writes_and_records_it(debug_run, toy, tmp_path):
    model, lora, prompts, init = toy
    init_path, lora_path = tmp_path / "init.png", tmp_path / "style.safetensors"
    init.save(init_path)
    lora.save(lora_path, prefix=model.lora_prefix)
    base = ["generate", "--checkpoint", str(debug_run.run_dir), "--lora", str(lora_path), "--prompt", prompts[0],
            "--steps", "4", "--no-progress", "--init-image", str(init_path)]
    assert cli([*base, "--denoise", "0", "--out", str(tmp_path / "d0")]) == 0
    [row] = read_table(tmp_path / "d0" / "samples.csv")
    assert row["settings"]["denoise"] == 0.0 and row["settings"]["init_image"] == str(init_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d0" / row["image"])), np.asarray(init))
    assert cli([*base, "--denoise", "0.5", "--guidance", "3", "--out", str(tmp_path / "d5")]) == 0
    [row] = read_table(tmp_path / "d5" / "samples.csv")
    api = model.generate(prompts[:1], lora, init_images=init, denoise=0.5, guidance=3.0, steps=4, seed=[0])
    assert (pixels([Image.open(tmp_path / "d5" / row["image"])]) - pixels(api)).abs().max() <= 1
    assert json.dumps(row["settings"]["denoise"]) == "0.5" and row["settings"]["cfg"] == "asymmetric"


class Reached(Exception):
    """Raised by the instrumented loader: the command got past its checks."""


def test_generate_command_checks_img2img_flags_before_loading(debug_run, tmp_path, capsys, monkeypatch):
    reached = []

    def load(cls, *args, **kwargs):
        reached.append("model")
        raise Reached

    monkeypatch.setattr(I2L, "load", classmethod(load))
    ok = tmp_path / "init.png"
    picture(0).save(ok)
    gen = ["generate", "--checkpoint", str(debug_run.run_dir), "--prompt", "one circle", "--images", str(ok),
           "--out", str(tmp_path / "gen")]
    cases = [(["--init-image", str(ok), "--denoise", "1.5"], "--denoise must be in [0, 1]"),
             (["--init-image", str(ok), "--denoise", "nan"], "--denoise"),
             (["--init-image", str(tmp_path / "missing.png")], "not found"),
             (["--denoise", "0.5"], "--denoise needs --init-image"),
             (["--init-image", str(ok), "--init-image", str(ok)], "2 --init-image for 1 --prompt"),
             (["--init-image", str(ok), "--inpaint", str(ok), "--mask", str(ok)], "not supported")]
    for extra, words in cases:
        code = cli([*gen, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and reached == [], (extra, code, err)
        assert len(err.splitlines()) == 1 and words in err, (extra, err)
    with pytest.raises(Reached):  # the instrument: good flags do reach the loader
        cli(["--debug", *gen, "--init-image", str(ok), "--denoise", "0.3"])
    assert reached == ["model"]
