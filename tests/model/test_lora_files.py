"""The real-client check: LoRA files written by i2l load with diffusers' own `load_lora_weights` into
Flux2KleinPipeline / ZImagePipeline and give what i2l's batched, hook-based application gives."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE, PROMPTS, inputs, pipeline_images, random_lora, tiny_flux2, tiny_zimage

from i2l.model.lora import LoRA

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


# ---------- other trainers' files: α/r scales ----------
def assert_loads_as_diffusers_loads(name: str, path, ours, client) -> None:
    """i2l's LoRA.load of `path` changes the model exactly as diffusers' load_lora_weights of it does."""
    lora = LoRA.load(path, ours)
    client.pipe.load_lora_weights(str(path), adapter_name="file")
    x, t, cond = inputs(ours, 2)
    with torch.no_grad():
        theirs, mine, base = client.velocity(x, t, cond), ours.velocity(x, t, cond, lora), ours.velocity(x, t, cond)
    assert (theirs - base).abs().max() > 1e-3, "the file must change the output"
    assert (theirs - mine).abs().max() <= 1e-5, f"{name}: i2l applies the file otherwise than diffusers"


def test_alpha_keys_scale_as_diffusers_loads_them(tmp_path):
    """ai-toolkit / community Z-Image files: `diffusion_model.<module>.lora_A.weight` + `<module>.alpha`, which
    diffusers applies with scale α/r per module (r = 4 here, α different per module)."""
    from safetensors.torch import save_file

    ours, client = tiny_zimage(seed=0), tiny_zimage(seed=0)
    lora = random_lora(ours, None, rank=4, scale=0.1)
    tensors = {}
    for i, k in enumerate(lora.names):
        tensors[f"diffusion_model.{k}.lora_A.weight"] = lora.A[k].contiguous()
        tensors[f"diffusion_model.{k}.lora_B.weight"] = lora.B[k].contiguous()
        tensors[f"diffusion_model.{k}.alpha"] = torch.tensor(float(1 + i % 3))  # α/r = 0.25, 0.5, 0.75
    save_file(tensors, str(tmp_path / "alpha.safetensors"))
    assert_loads_as_diffusers_loads("zimage", tmp_path / "alpha.safetensors", ours, client)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_diffusers_saved_lora_config_scales_as_diffusers_loads_it(name, tmp_path):
    """A LoRA trained with PEFT (lora_alpha != r, per-module rank and alpha patterns) and saved by the pipeline's
    own save_lora_weights, which records the LoraConfig in the file's `lora_adapter_metadata`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ours, client, writer = BUILDERS[name](seed=0), BUILDERS[name](seed=0), BUILDERS[name](seed=0, parts=False)
    first, second = list(ours.lora_targets())[:2]
    config = LoraConfig(r=4, lora_alpha=2, rank_pattern={first: 2}, alpha_pattern={second: 12},
                        target_modules=list(ours.lora_targets()))
    writer.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(1)  # as if trained: B no longer zero
    layers = {k: torch.randn(v.shape, generator=g) * 0.1
              for k, v in get_peft_model_state_dict(writer.transformer).items()}
    type(writer.pipe).save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                        transformer_lora_adapter_metadata=config.to_dict())
    assert_loads_as_diffusers_loads(name, tmp_path / "pytorch_lora_weights.safetensors", ours, client)


# ---------- other trainers' files: key layouts ----------
def _bfl_flux2_lora(rank: int, fused_down: str, fused_up: str, sep: str, g: torch.Generator) -> dict:
    """A LoRA over every i2l target of the tiny FLUX.2 (1 double, 2 single blocks) in BFL's module names, with
    q·k·v fused as the original model has them; `sep` joins the name parts (kohya: "_", ai-toolkit: ".")."""
    modules = {f"double_blocks{sep}0{sep}{s}_attn{sep}{m}": (64, out) for s in ("img", "txt")
               for m, out in (("qkv", 192), ("proj", 64))}
    modules |= {f"double_blocks{sep}0{sep}{s}_mlp{sep}{i}": dims for s in ("img", "txt")
                for i, dims in ((0, (64, 384)), (2, (192, 64)))}
    modules |= {f"single_blocks{sep}{b}{sep}{m}": dims for b in (0, 1)
                for m, dims in (("linear1", (64, 576)), ("linear2", (256, 64)))}
    out = {}
    for name, (d_in, d_out) in modules.items():
        out[f"{name}.{fused_down}.weight"] = torch.randn(rank, d_in, generator=g) * 0.2
        out[f"{name}.{fused_up}.weight"] = torch.randn(d_out, rank, generator=g) * 0.2
    return out


def test_kohya_flux2_file_loads_as_diffusers_loads_it(tmp_path):
    """kohya / sd-scripts FLUX.2 LoRAs: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (+ α), fused q·k·v
    split into diffusers' to_q / to_k / to_v by the pipeline's own converter."""
    from safetensors.torch import save_file

    ours, client = tiny_flux2(seed=0), tiny_flux2(seed=0)
    g = torch.Generator().manual_seed(3)
    tensors = {f"lora_unet_{k}": v for k, v in _bfl_flux2_lora(4, "lora_down", "lora_up", "_", g).items()}
    for i, k in enumerate(sorted({k.split(".")[0] for k in tensors})):
        tensors[f"{k}.alpha"] = torch.tensor(float(1 + i % 4))  # α/r = 0.25 … 1
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    assert_loads_as_diffusers_loads("flux2", tmp_path / "kohya.safetensors", ours, client)
    lora = LoRA.load(tmp_path / "kohya.safetensors", ours)
    assert set(lora.names) == set(ours.lora_targets())  # q, k and v each got their share of the fused qkv
    with pytest.raises(ValueError, match="kohya-style keys are converted when the backbone is given"):
        LoRA.load(tmp_path / "kohya.safetensors")


def test_ai_toolkit_flux2_file_with_bfl_names_loads_as_diffusers_loads_it(tmp_path):
    """ai-toolkit FLUX.2 LoRAs: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, BFL's names."""
    from safetensors.torch import save_file

    ours, client = tiny_flux2(seed=0), tiny_flux2(seed=0)
    tensors = {f"diffusion_model.{k}": v for k, v in
               _bfl_flux2_lora(4, "lora_A", "lora_B", ".", torch.Generator().manual_seed(4)).items()}
    save_file(tensors, str(tmp_path / "ai-toolkit.safetensors"))
    assert_loads_as_diffusers_loads("flux2", tmp_path / "ai-toolkit.safetensors", ours, client)
    assert set(LoRA.load(tmp_path / "ai-toolkit.safetensors", ours).names) == set(ours.lora_targets())


def test_a_pipe_a_device_or_a_directory_is_refused_without_reading_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it to read would block until a writer comes
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")  # reading it would never end
    for odd in ("pipe.safetensors", "zero.safetensors"):
        with pytest.raises(ValueError, match="not a regular file"):
            LoRA.load(tmp_path / odd)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        LoRA.load(tmp_path / "adir")
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        LoRA.load(tmp_path / "gone.safetensors")
