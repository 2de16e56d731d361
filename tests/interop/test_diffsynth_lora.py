"""The real clients of i2l's LoRA files besides diffusers: DiffSynth's `GeneralLoRALoader` fuses a diffsynth-format
file into DiffSynth's own FLUX.2 and Z-Image DiT classes (tiny configs, the diffusers model's weights) on every
target layer, and the patched DiT computes what i2l's hooks compute; the comfyui files' names are checked by the
loaders that read them here (DiffSynth for Z-Image, diffusers' BFL converter for FLUX.2)."""

from __future__ import annotations

import re

import pytest
import torch
from diffsynth.models.flux2_dit import Flux2DiT
from diffsynth.models.z_image_dit import ZImageDiT
from diffsynth.pipelines.z_image import model_fn_z_image
from diffsynth.utils.lora.general import GeneralLoRALoader
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file, save_file
from tiny_models import random_lora, tiny_flux2, tiny_zimage

from i2l.backbones.base import Cond
from i2l.model.lora import LoRA

DITS = {"flux2": Flux2DiT, "zimage": ZImageDiT}
BUILDERS = {"flux2": tiny_flux2, "zimage": tiny_zimage}
# PEFT warns whenever a second adapter joins a model
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


def diffsynth_dit(bb):
    """DiffSynth's DiT of the same config, holding the diffusers model's weights: its parameter names are diffusers'
    (DiffSynth loads diffusers' transformer files without a converter), so they load strictly, name for name."""
    config = {k: v for k, v in bb.transformer.config.items() if not k.startswith("_")}
    kw = {k: v for k, v in config.items() if k in DITS[bb.kind].__init__.__code__.co_varnames}
    dit = DITS[bb.kind](**kw)
    dit.load_state_dict(bb.transformer.state_dict(), strict=True)
    return dit.eval()


def fuse(dit, path, capsys) -> int:
    """DiffSynth's loader on the file; the number of layers it says it patched."""
    capsys.readouterr()
    GeneralLoRALoader(device="cpu", torch_dtype=torch.float32).fuse_lora_to_base_model(dit, load_file(str(path)))
    return int(re.search(r"(\d+) tensors are fused by LoRA", capsys.readouterr().out).group(1))


def forwards(bb, dit, lora):
    """The raw transformer output of i2l's model (LoRA by BatchedLoRA hooks) and of DiffSynth's DiT run as its
    pipeline runs it, on the same inputs. Z-Image runs in bf16, as DiffSynth runs it: its timestep embedder casts
    to bf16 whatever the weights are."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad(), bb.lora_adapter.use(lora):
        if bb.kind == "flux2":
            x = torch.randn(1, *bb.latent_shape(32), generator=g)
            txt = torch.randn(1, 6, bb.text_width, generator=g)
            kw = {"hidden_states": Flux2KleinPipeline._pack_latents(x), "encoder_hidden_states": txt,
                  "timestep": torch.tensor([0.7]), "img_ids": Flux2KleinPipeline._prepare_latent_ids(x),
                  "txt_ids": Flux2KleinPipeline._prepare_text_ids(txt)}
            return bb.transformer(**kw, guidance=None, return_dict=False)[0], dit(**kw)  # (1, T, C) each
        bf = torch.bfloat16
        lat = torch.randn(1, bb.transformer.config.in_channels, 8, 8, generator=g).to(bf)  # (1, C, h, w)
        cap = torch.randn(5, bb.text_width, generator=g).to(bf)  # (L, D)
        t = 0.3  # i2l's t (1 = data); DiffSynth's timestep is 1000·sigma = 1000·(1 - t), its output -(raw output)
        ours = bb.transformer([lat[0].unsqueeze(1)], torch.tensor([t]), [cap], patch_size=2, return_dict=False)[0]
        theirs = -model_fn_z_image(dit, latents=lat, timestep=torch.tensor([1000 * (1 - t)]), prompt_embeds=cap)
        return ours[0].squeeze(1).float(), theirs[0].float()  # (C, h, w) each


def close(theirs, ours, base) -> None:
    """fp32: equal to float rounding; bf16: well within the LoRA's own effect (fused W + ΔW is rounded once, the
    hooks round W·x and ΔW·x apart)."""
    if ours.dtype == torch.float32 and base is None:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        return
    err, effect = (theirs - ours).abs().max(), (ours - base).abs().max()
    assert err <= 0.05 * effect, f"DiffSynth differs by {err:.3g}, the LoRA changes the output by {effect:.3g}"


@pytest.mark.parametrize("kind", list(DITS))
def test_diffsynth_patches_every_target_and_computes_what_i2l_computes(kind, tmp_path, capsys):
    bb = BUILDERS[kind](parts=False)
    dit = diffsynth_dit(bb)
    lora = random_lora(bb, None, scale=0.2)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    path = lora.save(tmp_path / "style.safetensors", format="diffsynth", backbone=bb)
    assert fuse(dit, path, capsys) == len(bb.lora_targets())
    after = dit.state_dict()
    for name in bb.lora_targets():  # each target's weight moved by exactly ΔW = B·A (no α/r scale: none written)
        torch.testing.assert_close(after[f"{name}.weight"] - before[f"{name}.weight"], lora.delta(name),
                                   rtol=0, atol=1e-6)
    assert all(torch.equal(after[k], v) for k, v in before.items()
               if k.removesuffix(".weight") not in bb.lora_targets()), "DiffSynth changed a layer i2l does not adapt"
    if kind == "zimage":
        bb.transformer.to(torch.bfloat16)
        dit.to(torch.bfloat16)
    base, _ = forwards(bb, dit, None)
    ours, theirs = forwards(bb, dit, lora)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must change the output"
    close(theirs, ours, None if kind == "flux2" else base)


@pytest.mark.parametrize("kind", list(DITS))
def test_diffsynth_reads_nothing_from_a_prefixed_file(kind, tmp_path, capsys):
    """Why the format exists: DiffSynth matches module names as they are, so a `transformer.`-prefixed (diffusers)
    file patches no layer; the diffsynth file of the same LoRA has no `transformer.` key and patches all."""
    bb = BUILDERS[kind](parts=False)
    lora = random_lora(bb, None)
    diffusers_file = lora.save(tmp_path / "d.safetensors", backbone=bb)
    diffsynth_file = lora.save(tmp_path / "s.safetensors", format="diffsynth", backbone=bb)
    assert fuse(diffsynth_dit(bb), diffusers_file, capsys) == 0
    assert not any(k.startswith("transformer.") for k in load_file(str(diffsynth_file)))
    assert fuse(diffsynth_dit(bb), diffsynth_file, capsys) == len(bb.lora_targets())


def test_zimage_comfyui_file_has_the_diffsynth_names_under_diffusion_model(tmp_path, capsys):
    """ComfyUI's Z-Image LoRA keys are `diffusion_model.<diffusers name>`; DiffSynth strips that prefix, so the
    same file patches every layer of its ZImageDiT by exactly ΔW."""
    bb = tiny_zimage(parts=False)
    dit = diffsynth_dit(bb)
    lora = random_lora(bb, None)
    path = lora.save(tmp_path / "c.safetensors", format="comfyui", backbone=bb)
    assert all(k.startswith("diffusion_model.") for k in load_file(str(path)))
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    assert fuse(dit, path, capsys) == len(bb.lora_targets())
    for name in bb.lora_targets():
        torch.testing.assert_close(dit.state_dict()[f"{name}.weight"] - before[f"{name}.weight"], lora.delta(name),
                                   rtol=0, atol=1e-6)


def test_flux2_comfyui_file_loads_in_diffusers_by_its_bfl_names(tmp_path):
    """The comfyui FLUX.2 file (BFL names, fused qkv) read by diffusers' own BFL-LoRA converter, as a pipeline's
    `load_lora_weights` and as i2l reads other trainers' files (no i2l metadata): the same model as i2l's LoRA."""
    ours, client = tiny_flux2(seed=0, parts=False), tiny_flux2(seed=0, parts=False)
    lora = random_lora(ours, None, scale=0.1)
    path = lora.save(tmp_path / "c.safetensors", format="comfyui", backbone=ours)
    foreign = tmp_path / "foreign.safetensors"  # as ComfyUI users pass files around: the keys only
    save_file(load_file(str(path)), str(foreign))
    read = LoRA.load(foreign, backbone=ours)  # through Flux2LoraLoaderMixin.lora_state_dict
    assert set(read.names) == set(lora.names)
    for k in lora.names:
        torch.testing.assert_close(read.delta(k), lora.delta(k), rtol=0, atol=1e-6)
    client.pipe.load_lora_weights(str(path))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, *ours.latent_shape(32), generator=g), torch.rand(1, generator=g)
    cond = Cond(torch.randn(1, 6, ours.text_width, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(client.velocity(x, t, cond), ours.velocity(x, t, cond, lora), rtol=0, atol=1e-4)
        assert (ours.velocity(x, t, cond, lora) - ours.velocity(x, t, cond)).abs().max() > 1e-3
