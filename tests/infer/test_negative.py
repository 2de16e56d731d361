"""The CFG negative branch as a choice: gray (the gray-image LoRA, the paper and the default, unchanged), base (the
base model, no LoRA: the authors' Z-Image example) or none (no CFG: one positive pass per step, guidance ignored);
a step-distilled backbone still samples without CFG; `i2l generate --negative` records its choice."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_distilled import _model as klein_model
from test_img2img import counted

from i2l.cli import main as cli
from i2l.infer.api import I2L
from i2l.infer.generation import read_table
from i2l.infer.guidance import sample
from i2l.model.lora import LoRA


@pytest.fixture(scope="module")
def toy(debug_run):
    from i2l.eval.heldout_loss import load_val_samples

    model = I2L.load(debug_run.run_dir)
    s = load_val_samples(debug_run.prepared_dir)
    return model, model.predict_lora(s[0].refs), [s[0].prompt, s[1].prompt]


def pixels(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])


def latents(model: I2L, prompts, lora: LoRA, neg: LoRA | None, guidance: float, steps: int, seed: int,
            cfg: bool = True) -> torch.Tensor:
    """What `generate` should decode, from the sampler directly (the same noise as generate's seed)."""
    bb = model.backbone
    n = len(prompts)
    noise = torch.randn((n, *bb.latent_shape(model.cfg.backbone.image_size)),
                        generator=torch.Generator().manual_seed(seed))
    neg_cond = bb.encode_prompts([""] * n) if cfg else None
    return sample(bb, bb.encode_prompts(prompts), neg_cond, lora.expand(n), neg, guidance, steps, noise=noise)


def test_gray_is_the_default_and_unchanged(toy):
    model, lora, prompts = toy
    default = model.generate(prompts, lora, guidance=3.0, steps=3, seed=1)
    gray = model.generate(prompts, lora, negative="gray", guidance=3.0, steps=3, seed=1)
    assert torch.equal(pixels(gray), pixels(default))
    from i2l.data.images import to_pil

    gray_lora = LoRA.stack([model.gray_lora(lora.meta["n_refs"])] * 2)  # the paper's negative, made by hand
    expected = to_pil(model.backbone.decode_latents(latents(model, prompts, lora, gray_lora, 3.0, 3, seed=1)))
    assert torch.equal(pixels(gray), pixels(expected))


def test_base_is_no_lora_on_the_negative_branch(toy):
    model, lora, prompts = toy
    from i2l.data.images import to_pil

    base = model.generate(prompts, lora, negative="base", guidance=3.0, steps=3, seed=1)
    explicit = latents(model, prompts, lora, None, 3.0, 3, seed=1)  # guidance.sample with neg_lora=None
    assert torch.equal(pixels(base), pixels(to_pil(model.backbone.decode_latents(explicit))))
    # independently: two passes per step, the negative one through the backbone with no LoRA at all
    bb, n, steps = model.backbone, len(prompts), 3
    x = torch.randn((n, *bb.latent_shape(model.cfg.backbone.image_size)), generator=torch.Generator().manual_seed(1))
    cond, neg = bb.encode_prompts(prompts), bb.encode_prompts([""] * n)
    ts = bb.sampling_schedule(steps, tuple(x.shape[1:]))
    with torch.no_grad():
        for k in range(steps):
            t = ts[k].expand(n)
            v_pos, v_neg = bb.velocity(x, t, cond, lora.expand(n)), bb.velocity(x, t, neg)
            x = x + (ts[k + 1] - ts[k]) * (v_neg + 3.0 * (v_pos - v_neg))
    assert (explicit - x).abs().max() < 1e-5
    gray = latents(model, prompts, lora, LoRA.stack([model.gray_lora(lora.meta["n_refs"])] * n), 3.0, 3, seed=1)
    assert (explicit - gray).abs().max() > 1e-3, "the negative branch must matter"


def test_none_is_one_positive_pass_per_step_and_ignores_guidance(toy, monkeypatch):
    model, lora, prompts = toy
    rows = counted(monkeypatch, model.backbone)
    none = model.generate(prompts, lora, negative="none", guidance=3.0, steps=3, seed=1)
    assert rows == [len(prompts)] * 3, rows
    assert torch.equal(pixels(none), pixels(model.generate(prompts, lora, negative="none", guidance=7.0, steps=3,
                                                           seed=1)))
    assert torch.equal(pixels(none), pixels(model.generate(prompts, lora, guidance=1.0, steps=3, seed=1)))
    rows.clear()
    model.generate(prompts, lora, negative="base", guidance=3.0, steps=3, seed=1, passes="joint")
    assert rows == [2 * len(prompts)] * 3, rows  # CFG: both branches in one forward per step
    rows.clear()
    model.generate(prompts, lora, negative="base", guidance=3.0, steps=3, seed=1, passes="split")
    assert rows == [len(prompts)] * 6, rows  # or in two forwards of one branch each


def test_bad_negative_choices_are_clear_errors(toy):
    model, lora, prompts = toy
    with pytest.raises(ValueError, match="negative must be one of gray, base, none"):
        model.generate(prompts, lora, negative="grey", steps=1)
    with pytest.raises(ValueError, match="both choose the negative branch"):
        model.generate(prompts, lora, negative="base", negative_lora=None, steps=1)


def test_a_distilled_backbone_still_samples_without_cfg(tmp_path, caplog):
    model = klein_model(tmp_path, distilled=True)
    from PIL import Image

    lora = model.predict_lora([Image.new("RGB", (32, 32), "red")])
    with caplog.at_level(logging.WARNING, logger="i2l"):
        out = {neg: pixels(model.generate(["a cat"], lora, negative=neg, guidance=4.0, steps=2, seed=0))
               for neg in ("gray", "base", "none")}
    assert torch.equal(out["gray"], out["none"]) and torch.equal(out["base"], out["none"])
    assert any("is_distilled" in r.getMessage() for r in caplog.records)


def test_generate_command_negative_flag_is_recorded(debug_run, toy, tmp_path, capsys):
    model, lora, prompts = toy
    lora_path = lora.save(tmp_path / "style.safetensors", prefix=model.lora_prefix)
    gen = ["generate", "--checkpoint", str(debug_run.run_dir), "--lora", str(lora_path), "--prompt", prompts[0],
           "--steps", "3", "--guidance", "3", "--no-progress"]
    for neg, cfg in (("gray", "asymmetric"), ("base", "base"), ("none", "none")):
        out = tmp_path / neg
        assert cli([*gen, "--negative", neg, "--out", str(out)]) == 0
        [row] = read_table(out / "samples.csv")
        assert row["settings"]["negative"] == neg and row["settings"]["cfg"] == cfg, row["settings"]
        api = model.generate(prompts[:1], lora, negative=neg, guidance=3.0, steps=3, seed=[0])
        from PIL import Image

        assert (pixels([Image.open(out / row["image"])]) - pixels(api)).abs().max() <= 1
    assert "no CFG" in capsys.readouterr().out
    assert cli([*gen, "--negative", "base", "--plain-cfg", "--out", str(tmp_path / "x")]) == 2
    assert "both choose the negative branch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # argparse's own choices check
        cli([*gen, "--negative", "grey", "--out", str(tmp_path / "y")])
    assert exit.value.code == 2 and "invalid choice: 'grey'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
