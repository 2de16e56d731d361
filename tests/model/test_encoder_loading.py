"""The encoder loader reads the checkpoint's own config.json: FixRes SigLIP (`siglip`, `siglip_vision_model`) loads
as SiglipVisionModel at its own resolution, NaFlex SigLIP2 (`siglip2`, `siglip2_vision_model`) as
Siglip2VisionModel within its patch budget, whole image+text checkpoints give their vision tower only; the preset's
encoder.kind and image_size decide nothing."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from doctor.layouts import SIDE, TOKENS, siglip2_naflex, siglip_fixres
from PIL import Image

from i2l.config import get_config
from i2l.model.encoder import load_encoder, read_encoder_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {(naflex, whole): (siglip2_naflex if naflex else siglip_fixres)(root / f"{naflex}-{whole}", whole)
            for naflex in (False, True) for whole in (False, True)}


def _cfg(path, kind="siglip2", image_size=512):
    return replace(get_config("klein4b").encoder, kind=kind, path=str(path), image_size=image_size)


@pytest.mark.parametrize("naflex", [False, True], ids=["fixres", "naflex"])
@pytest.mark.parametrize("whole", [False, True], ids=["vision-only", "whole"])
def test_the_checkpoint_decides_class_and_resolution(ckpts, naflex, whole):
    for kind in ("siglip2", "siglip"):  # the preset's kind no longer picks the class
        cfg = _cfg(ckpts[naflex, whole], kind)
        enc = load_encoder(cfg)
        assert type(enc.model).__name__ == ("Siglip2VisionModel" if naflex else "SiglipVisionModel")
        assert cfg.image_size == SIDE and enc.tokens_per_image == TOKENS  # the preset said 512: the checkpoint wins
        tok = enc(torch.rand(3, 3, 48, 40) * 2 - 1)  # any input size is resized to what the checkpoint sees
        assert tok.shape == (3, TOKENS, 32) and torch.isfinite(tok).all()
    assert enc.encoder_id == f"{'siglip2-naflex' if naflex else 'siglip'}:{ckpts[naflex, whole].name}"


def test_a_whole_checkpoint_gives_exactly_its_vision_tower(ckpts):
    from transformers import Siglip2Model, SiglipModel

    x = torch.rand(2, 3, SIDE, SIDE) * 2 - 1
    whole = SiglipModel.from_pretrained(ckpts[False, True]).vision_model
    assert torch.equal(load_encoder(_cfg(ckpts[False, True]))(x), whole(pixel_values=x).last_hidden_state)
    # NaFlex: i2l's patchify must give what transformers' own processor gives for the same image
    from transformers import Siglip2ImageProcessor

    path = ckpts[True, True]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    inputs = Siglip2ImageProcessor.from_pretrained(path)(images=[image], return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[4, 4]]  # its patch budget (16) at 32 px: a 4 x 4 grid
    want = Siglip2Model.from_pretrained(path).vision_model(**inputs).last_hidden_state  # (1, 16, 32)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, S, S)
    assert torch.allclose(load_encoder(_cfg(path))(pixels), want, atol=1e-5)


def test_a_patch_budget_sets_the_side_a_naflex_encoder_sees(ckpts, tmp_path):
    path = shutil.copytree(ckpts[True, False], tmp_path / "naflex")
    proc = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**proc, "max_num_patches": 64}))
    ck = read_encoder_checkpoint(path)
    assert (ck.naflex, ck.budget, ck.image_size, ck.tokens) == (True, 64, 64, 64)
    enc = load_encoder(_cfg(path))
    assert enc(torch.zeros(1, 3, 20, 20)).shape == (1, 64, 32)  # 8 x 8 patches: positions interpolated


def test_what_is_not_a_siglip_checkpoint_is_refused_by_name(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    other = shutil.copytree(ckpts[False, False], tmp_path / "clip")
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'"):
        load_encoder(_cfg(other))
    # a whole checkpoint whose vision tower lost a weight: refused, never filled with random numbers
    holed = shutil.copytree(ckpts[False, True], tmp_path / "holed")
    sd = load_file(str(holed / "model.safetensors"))
    del sd["vision_model.post_layernorm.weight"]
    save_file(sd, str(holed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not in the checkpoint"):
        load_encoder(_cfg(holed))
    with pytest.raises(FileNotFoundError, match="no image encoder"):
        load_encoder(_cfg(tmp_path / "missing"))


@pytest.mark.parametrize("naflex", [False, True], ids=["fixres", "naflex"])
def test_the_pooling_head_is_skipped_for_tokens_and_kept_in_the_model(ckpts, naflex):
    """i2L reads patch tokens only: the attention-pooling head (pooler_output) is not run by the encoder's forward,
    the tokens are the tower's own last_hidden_state, and the model keeps its head for whoever asks for it (the
    toy encoder's pretraining trains through pooler_output)."""
    enc = load_encoder(_cfg(ckpts[naflex, False]))
    head = enc.model.head
    runs = []
    head.register_forward_hook(lambda *a: runs.append(1))
    x = torch.rand(2, 3, SIDE, SIDE) * 2 - 1
    tokens = enc(x)
    assert not runs and enc.model.use_head  # skipped for the forward, still on in the model
    if not naflex:  # (the NaFlex tokens are checked against transformers' own processor above)
        out = enc.model(pixel_values=x)
        assert runs and out.pooler_output is not None
        assert torch.equal(tokens, out.last_hidden_state)
