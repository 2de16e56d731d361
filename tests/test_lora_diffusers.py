"""The real-client check: LoRA files written by i2l load with diffusers' own `load_lora_weights` into
Flux2KleinPipeline / ZImagePipeline and give what i2l's batched, hook-based application gives."""

from __future__ import annotations

import pytest
import torch
from test_backbones import IMAGE, PROMPTS, inputs, pipeline_images, random_lora, tiny_flux2, tiny_zimage

from i2l.lora import LoRA

BUILDERS = {"flux2": tiny_flux2, "zimage": tiny_zimage}
# PEFT warns whenever a second adapter joins a model: several adapters are the point here
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


def load_into_pipeline(client, loras: list[LoRA], tmp_path) -> list[str]:
    """Write each LoRA as a file (LoRA.save) and load it as a named diffusers adapter; returns the names."""
    names = []
    for i, lo in enumerate(loras):
        path = lo.save(tmp_path / f"{client.kind}-{i}.safetensors", prefix=client.lora_prefix)
        client.pipe.load_lora_weights(str(path), adapter_name=f"style{i}")
        names.append(f"style{i}")
    return names


@pytest.mark.parametrize("name", list(BUILDERS))
def test_diffusers_adapters_equal_i2l_batched_loras(name, tmp_path):
    ours, client = BUILDERS[name](seed=0), BUILDERS[name](seed=0)  # same weights, separate modules
    x, t, cond = inputs(ours, 3)
    lora = random_lora(ours, 3)
    with torch.no_grad():
        base = ours.velocity(x, t, cond)
        batched = ours.velocity(x, t, cond, lora)  # (3, *latent): one LoRA per sample, one forward
    names = load_into_pipeline(client, lora.unbind(), tmp_path)
    peft_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in client.transformer.named_modules() if ".lora_A." in n}
    assert peft_layers == set(ours.lora_targets()), "diffusers must adapt exactly i2l's target layers"
    with torch.no_grad():
        for i, adapter in enumerate(names):
            client.pipe.set_adapters([adapter])
            v = client.velocity(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1)))  # no i2l LoRA here
            assert (v[0] - batched[i]).abs().max() <= 1e-4, f"sample {i}: diffusers adapter != i2l LoRA"
            assert (v[0] - base[i]).abs().max() > 1e-3, "the loaded adapter must change the output"
        client.pipe.disable_lora()
        assert (client.velocity(x, t, cond) - base).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pipeline_call_with_loaded_lora_matches_i2l_sampling(name, tmp_path):
    """End to end: the pipeline's own sampler with the diffusers-loaded file = i2l's Euler loop with the LoRA."""
    ours, client = BUILDERS[name](seed=0), BUILDERS[name](seed=0)
    lora = random_lora(ours, None, scale=0.1)
    load_into_pipeline(client, [lora], tmp_path)
    cond = ours.encode_prompts(PROMPTS[:1])
    x0 = torch.randn(1, *ours.latent_shape(IMAGE), generator=torch.Generator().manual_seed(5))
    theirs, mine = pipeline_images(client, ours, x0, cond, steps=2, lora=lora)
    _, plain = pipeline_images(ours, ours, x0, cond, steps=2)
    assert (theirs - mine).abs().max() <= 1e-4
    assert (plain - mine).abs().max() > 1e-3, "the LoRA must change the image"


def test_flux2_lora_file_does_not_fit_zimage(tmp_path):
    flux, zimg = tiny_flux2(parts=False), tiny_zimage(parts=False)
    path = random_lora(flux, None).save(tmp_path / "flux.safetensors", prefix=flux.lora_prefix)
    with pytest.raises(ValueError, match="made for backbone 'flux2:"):
        LoRA.load(path, zimg)
    LoRA.load(path, flux)  # fits its own backbone
