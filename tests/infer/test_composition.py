"""Composition: an i2l LoRA file inside diffusers' Flux2KleinInpaintPipeline, ZImageInpaintPipeline and
ZImageControlNetPipeline (tiny random components), and masked inpainting in i2l's own sampler on the toy world."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageInpaintPipeline,
)
from PIL import Image
from tiny_models import PROMPTS, random_lora, tiny_flux2, tiny_zimage

from i2l.cli import main as cli

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
SIZE = 32


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype("uint8"))


def right_half_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 2, 0, SIZE, SIZE))  # white = regenerate
    return mask


def with_lora_file(build, tmp_path):
    """A LoRA file written by i2l for a tiny backbone, and a second copy of that backbone for diffusers to load."""
    ours, client = build(seed=0), build(seed=0)
    path = random_lora(ours, None, scale=0.2).save(tmp_path / f"{ours.kind}.safetensors", prefix=ours.lora_prefix)
    return ours, client.pipe, path


def adapted(module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_modules() if ".lora_A." in n}


@pytest.mark.parametrize("kind", ["flux2", "zimage"])
def test_lora_file_works_in_the_diffusers_inpaint_pipeline(kind, tmp_path):
    ours, p, path = with_lora_file(tiny_flux2 if kind == "flux2" else tiny_zimage, tmp_path)
    cls = Flux2KleinInpaintPipeline if kind == "flux2" else ZImageInpaintPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=p.vae, text_encoder=p.text_encoder,
               tokenizer=p.tokenizer, transformer=p.transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="style")
    assert adapted(pipe.transformer) == set(ours.lora_targets())
    kw = {"prompt": PROMPTS[0], "image": picture(0), "mask_image": right_half_mask(), "height": SIZE, "width": SIZE,
          "strength": 1.0, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}
    kw.update(text_encoder_out_layers=(1, 2, 3), guidance_scale=1.0) if kind == "flux2" else kw.update(guidance_scale=0.0)
    styled = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.disable_lora()
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert styled.shape == (1, 3, SIZE, SIZE) and torch.isfinite(styled).all()
    diff = (styled - plain).abs()
    kept, painted = diff[..., : SIZE // 4].max(), diff[..., 3 * SIZE // 4:].max()  # away from the mask edge
    assert painted > 1e-3 and painted > 3 * kept, "the style must act inside the mask, not outside it"


def test_lora_file_works_with_zimage_controlnet(tmp_path):
    ours, p, path = with_lora_file(tiny_zimage, tmp_path)
    torch.manual_seed(1)
    cn = ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=16,
                               all_patch_size=(2,), all_f_patch_size=(1,), dim=64, n_refiner_layers=1, n_heads=2,
                               n_kv_heads=2)
    with torch.no_grad():  # its zero-initialised projections would make the control a no-op
        for name, param in cn.named_parameters():
            if "before_proj" in name or "after_proj" in name:
                param.normal_(0, 0.2)
    cn = ZImageControlNetModel.from_transformer(cn, p.transformer)
    pipe = ZImageControlNetPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=p.vae, text_encoder=p.text_encoder,
                                    tokenizer=p.tokenizer, transformer=p.transformer, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="style")
    assert adapted(pipe.transformer) == set(ours.lora_targets())

    def run(scale):
        return pipe(prompt=PROMPTS[0], control_image=picture(1), controlnet_conditioning_scale=scale, height=SIZE,
                    width=SIZE, num_inference_steps=2, max_sequence_length=16, guidance_scale=0.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    both, style_only = run(0.75), run(0.0)
    pipe.disable_lora()
    control_only = run(0.75)
    assert (both - style_only).abs().max() > 1e-3, "the control must act with the LoRA loaded"
    assert (both - control_only).abs().max() > 1e-3, "the LoRA must act under the control"


def test_toy_inpainting_in_i2ls_sampler_keeps_the_known_region(debug_run, tmp_path):
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.infer.api import I2L
    from i2l.infer.generation import load_inpaint

    model = I2L.load(debug_run.run_dir)
    s = load_val_samples(debug_run.prepared_dir)
    image, mask = tmp_path / "scene.png", tmp_path / "mask.png"
    s[0].target.save(image)
    right_half_mask().save(mask)
    known, m = load_inpaint(model.backbone, image, mask, model.cfg.backbone.image_size)
    lora = model.predict_lora(s[1].refs)
    painted = model.generate([s[1].prompt], [lora], steps=3, seed=0, inpaint=(known, m))[0]
    free = model.generate([s[1].prompt], [lora], steps=3, seed=0)[0]
    got, src, unmasked = (np.asarray(im, dtype=np.int16) for im in (painted, Image.open(image), free))
    assert np.array_equal(got[:, : SIZE // 2], src[:, : SIZE // 2]), "the kept region must be the input image"
    assert np.abs(got[:, SIZE // 2:] - src[:, SIZE // 2:]).max() > 20, "the masked region must be regenerated"
    assert not np.array_equal(got, unmasked)

    # the same through the command line, with the style given as reference images
    refs = []
    for i, im in enumerate(s[1].refs[:2]):
        refs.append(tmp_path / f"ref{i}.png")
        im.save(refs[-1])
    out = tmp_path / "out"
    assert cli(["generate", "--checkpoint", str(debug_run.run_dir), "--images", *map(str, refs),
                "--prompt", s[1].prompt, "--inpaint", str(image), "--mask", str(mask), "--steps", "2",
                "--out", str(out), "--no-progress"]) == 0
    [png] = out.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png), dtype=np.int16)[:, : SIZE // 2], src[:, : SIZE // 2])
