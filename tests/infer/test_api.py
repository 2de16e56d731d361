"""The user API on a debug checkpoint: predict -> save -> load round trip, strength, multi-reference fusion by token
concatenation, LoRA-space mixing, batched prediction, predict-only loading, per-sample seeds."""

from __future__ import annotations

import pytest
import torch

from i2l.eval.heldout_loss import load_val_samples
from i2l.infer.api import I2L
from i2l.model.lora import LoRA


@pytest.fixture(scope="module")
def model(debug_run) -> I2L:
    return I2L.load(debug_run.run_dir)


@pytest.fixture(scope="module")
def samples(debug_run):
    return load_val_samples(debug_run.prepared_dir)  # one per held-out style, 4 references each


def delta_dist(a: LoRA, b: LoRA) -> float:
    """Σ over layers of ‖ΔW_a − ΔW_b‖_F: LoRAs compared as the weight updates they make."""
    return sum(float(torch.linalg.matrix_norm(a.delta(k) - b.delta(k))) for k in a.names)


def test_predict_save_load_round_trip(model, samples, tmp_path):
    lora = model.predict_lora(samples[0].refs)
    assert sorted(lora.names) == sorted(model.backbone.lora_targets())
    assert delta_dist(lora, lora.scaled(0.0)) > 0, "a trained predictor's LoRA must not be a no-op"
    path = lora.save(tmp_path / "style.safetensors", prefix=model.lora_prefix)
    back = LoRA.load(path, backbone=model.backbone)
    assert back.backbone == model.backbone.backbone_id and back.meta["checkpoint"] == model.checkpoint_id
    for k in lora.names:
        assert torch.equal(back.A[k], lora.A[k]) and torch.equal(back.B[k], lora.B[k])


def test_strength_scales_the_update_and_zero_is_the_base_model(model, samples):
    lora = model.predict_lora(samples[0].refs[:1])
    half = lora.scaled(0.5)
    for k in lora.names:
        assert torch.allclose(half.delta(k), 0.5 * lora.delta(k), atol=1e-7)
    prompt = [samples[0].prompt]
    off = model.generate(prompt, [lora], negative_lora="gray", strength=0.0, steps=2, seed=1)[0]
    base = model.generate(prompt, None, negative_lora=None, steps=2, seed=1)[0]
    on = model.generate(prompt, [lora], negative_lora="gray", strength=1.0, steps=2, seed=1)[0]
    assert torch.equal(torch.tensor(list(off.getdata())), torch.tensor(list(base.getdata())))
    assert list(on.getdata()) != list(base.getdata())


def test_repeated_reference_fuses_to_the_single_reference_lora(model, samples):
    x, y = samples[0].refs[0], samples[1].refs[0]
    one, four, other = model.predict_lora([x]), model.predict_lora([x] * 4), model.predict_lora([y])
    assert four.meta["n_refs"] == 4
    # copies of one reference carry that reference's attention mass, nothing more: the same style
    # (exactly, up to the small learned reference-index embedding)
    assert delta_dist(one, four) < 0.2 * delta_dist(one, other)
    fused = model.predict_lora([x, y])  # two different styles: a third LoRA, neither of the two
    assert min(delta_dist(fused, one), delta_dist(fused, other)) > 2 * delta_dist(one, four)


def test_mixing_weights(model, samples):
    a, b = model.predict_lora(samples[0].refs), model.predict_lora(samples[1].refs)
    first = LoRA.mix([a, b], [1.0, 0.0])
    assert all(torch.equal(first.delta(k), a.delta(k)) for k in a.names)
    half = LoRA.mix([a, b], [0.5, 0.5])
    assert all(torch.allclose(half.delta(k), 0.5 * (a.delta(k) + b.delta(k)), atol=1e-6) for k in a.names)
    with pytest.raises(ValueError, match="one weight per LoRA"):
        LoRA.mix([a, b], [1.0])


def test_batched_prediction_equals_one_at_a_time(model, samples):
    sets = [samples[0].refs[:1], samples[1].refs[:3], samples[0].refs]  # different sizes: padded in the batch
    batch = model.predict_loras(sets)
    for s, lo in zip(sets, batch):
        assert delta_dist(lo, model.predict_lora(s)) < 1e-4
        assert lo.meta["n_refs"] == len(s)


def test_predict_only_load_gives_the_same_loras(debug_run, model, samples):
    light = I2L.load(debug_run.run_dir, backbone=False)
    assert light.backbone is None and light.lora_prefix == model.lora_prefix
    assert delta_dist(light.predict_lora(samples[0].refs), model.predict_lora(samples[0].refs)) < 1e-6
    with pytest.raises(ValueError, match="backbone=False"):
        light.generate(["one small circle"])


def test_per_sample_seeds_do_not_depend_on_the_batch(model, samples):
    a, b = model.predict_lora(samples[0].refs), model.predict_lora(samples[1].refs)
    prompts = [samples[0].prompt, samples[1].prompt]
    pair = model.generate(prompts, [a, b], seed=[3, 4], steps=2)
    alone = model.generate(prompts[1:], [b], seed=[4], steps=2)
    diff = (torch.tensor(list(pair[1].getdata())) - torch.tensor(list(alone[0].getdata()))).abs()
    assert int(diff.max()) <= 1  # uint8 rounding of float noise at most
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        model.generate(prompts, [a, b], seed=[3], steps=1)


def test_no_references_and_unreadable_images_are_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="no reference images"):
        model.predict_lora([])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        model.predict_lora([bad])
    with pytest.raises(FileNotFoundError, match="reference image not found"):
        model.predict_lora([tmp_path / "missing.png"])


def test_reference_files_are_decoded_like_training_images(model, tmp_path):
    """A 16-bit PNG and a transparent PNG predict the LoRA of the images `prepare` would have made of them (mid-gray,
    white), not of a bare convert("RGB") (white, the hidden red)."""
    import numpy as np
    from PIL import Image

    from i2l.data.validate import decode_image

    files = {"gray16.png": Image.fromarray(np.full((32, 32), 128 * 257, np.uint16)),
             "logo.png": Image.new("RGBA", (32, 32), (255, 0, 0, 0))}
    for name, im in files.items():
        im.save(tmp_path / name)
    from_files = model.predict_lora([tmp_path / n for n in files])
    as_trained = model.predict_lora([decode_image((tmp_path / n).read_bytes(), 10**8) for n in files])
    for k in from_files.names:
        assert torch.equal(from_files.A[k], as_trained.A[k]) and torch.equal(from_files.B[k], as_trained.B[k])


def test_predict_command_does_not_load_the_backbone(debug_run, model, samples, tmp_path):
    """`i2l predict` needs the encoder and predictor only: it must work where the (GBs) backbone is absent."""
    import json
    import shutil

    from i2l.cli import main as cli

    ck = shutil.copytree(debug_run.checkpoint_dir, tmp_path / "ck")
    state = json.loads((ck / "state.json").read_text())
    state["config"]["backbone"]["path"] = str(tmp_path / "no-backbone-here")
    (ck / "state.json").write_text(json.dumps(state))
    refs = []
    for i, im in enumerate(samples[0].refs[:2]):
        im.save(tmp_path / f"ref{i}.png")
        refs.append(str(tmp_path / f"ref{i}.png"))
    out = tmp_path / "style.safetensors"
    assert cli(["predict", "--checkpoint", str(ck), "--images", *refs, "--out", str(out)]) == 0
    lora = LoRA.load(out, backbone=model.backbone)  # a file for this backbone, with its key prefix
    assert delta_dist(lora, model.predict_lora(refs)) < 1e-6


def test_a_run_whose_data_root_moved_still_loads(debug_run, model, samples, tmp_path, monkeypatch):
    """A renamed clone: the checkpoint records its toy backbone and encoder under the old data root, which is gone;
    they are found under the root the run now lies in, and predict as before."""
    import json
    import shutil

    monkeypatch.delenv("I2L_DATA_ROOT", raising=False)
    old, new = str(debug_run.data_root), tmp_path / "renamed"
    shutil.copytree(debug_run.data_root / "toy", new / "toy")
    run = shutil.copytree(debug_run.run_dir, new / "runs" / "debug" / "train")
    for state_file in run.glob("checkpoints/*/state.json"):  # as if trained under a root that no longer exists
        state_file.write_text(state_file.read_text().replace(json.dumps(old)[1:-1], str(tmp_path / "gone")))
    moved = I2L.load(run)
    assert moved.cfg.backbone.path == str(new / "toy" / "debug" / "backbone")
    refs = samples[0].refs[:2]
    assert delta_dist(moved.predict_lora(refs), model.predict_lora(refs)) < 1e-6
