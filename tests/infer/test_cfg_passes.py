"""The two arrangements of the CFG branches (`sample(passes=...)`): one forward of 2B rows per step ("joint") or two
of B rows ("split", a LoRA shared by the negative branch applied as one matrix); "auto" runs the one measured faster
on the device. Both must give the same images, whatever the branches carry."""

from __future__ import annotations

import pytest
import torch
from test_img2img import counted
from test_negative import pixels
from tiny_models import inputs, random_lora, tiny_toy

from i2l.cli import main as cli
from i2l.infer.guidance import FASTER_PASSES, cfg_passes_for, sample, stack_rows

N, STEPS = 3, 3


@pytest.fixture(scope="module")
def bb():
    return tiny_toy()


def _run(bb, pos, neg, passes, **kw):
    x, _, cond = inputs(bb, N)
    neg_cond = bb.encode_prompts([""] * N)
    return sample(bb, cond, neg_cond, pos, neg, guidance=3.0, steps=STEPS, noise=x, passes=passes, **kw)


BRANCHES = {  # what the positive and negative branches carry
    "per-sample both": (lambda bb: random_lora(bb, N, seed=1), lambda bb: random_lora(bb, N, seed=2)),
    "one shared gray": (lambda bb: random_lora(bb, N, seed=1), lambda bb: random_lora(bb, None, seed=3)),
    "base negative": (lambda bb: random_lora(bb, N, seed=1), lambda bb: None),
    "base positive": (lambda bb: None, lambda bb: random_lora(bb, N, seed=2)),
    "one LoRA, batch of one": (lambda bb: random_lora(bb, 1, seed=1), lambda bb: random_lora(bb, 1, seed=2)),
}


@pytest.mark.parametrize("branches", list(BRANCHES))
def test_joint_and_split_give_the_same_images(bb, branches):
    pos, neg = (make(bb) for make in BRANCHES[branches])
    joint, split = _run(bb, pos, neg, "joint"), _run(bb, pos, neg, "split")
    assert torch.allclose(joint, split, atol=1e-5)
    assert not torch.allclose(joint, _run(bb, None, None, "joint"), atol=1e-4)  # the LoRAs were applied


def test_a_lora_repeated_over_the_rows_samples_as_its_copies(bb):
    """A batched LoRA that serves its rows in groups (`repeat_each`, as training builds them) samples as the
    per-row copies `take` makes, on either branch and in either arrangement."""
    one = random_lora(bb, 1, seed=2)
    grouped, copies = one.repeat_each(N), one.take(torch.zeros(N, dtype=torch.long))
    pos = random_lora(bb, N, seed=1)
    for passes in ("joint", "split"):
        want = _run(bb, pos, copies, passes)
        assert torch.allclose(_run(bb, pos, grouped, passes), want, atol=1e-5)
        assert torch.allclose(_run(bb, grouped, pos, passes), _run(bb, copies, pos, passes), atol=1e-5)
    assert not torch.allclose(want, _run(bb, pos, None, "joint"), atol=1e-4)  # the grouped LoRA was applied


def test_joint_and_split_agree_for_inpainting_and_img2img(bb):
    pos, neg = random_lora(bb, N, seed=1), random_lora(bb, None, seed=3)
    x1, _, _ = inputs(bb, N, seed=7)
    mask = torch.zeros(N, 1, *x1.shape[2:])
    mask[..., : x1.shape[2] // 2, :] = 1
    for kw in ({"inpaint": (x1, mask)}, {"init": x1, "denoise": 0.5}):
        assert torch.allclose(_run(bb, pos, neg, "joint", **kw), _run(bb, pos, neg, "split", **kw), atol=1e-5)


def test_each_arrangement_runs_its_own_forwards(bb, monkeypatch):
    pos, gray = random_lora(bb, N, seed=1), random_lora(bb, None, seed=3)
    rows = counted(monkeypatch, bb)
    seen: list[bool] = []  # per forward: was the LoRA it ran with per-sample?
    use = bb.lora_adapter.use

    def recording(lora, strength=1.0):
        seen.append(lora.batched)
        return use(lora, strength)

    monkeypatch.setattr(bb.lora_adapter, "use", recording)
    _run(bb, pos, gray, "joint")
    assert rows == [2 * N] * STEPS and seen == [True] * STEPS
    rows.clear(), seen.clear()
    _run(bb, pos, gray, "split")
    assert rows == [N] * 2 * STEPS
    assert seen == [True, False] * STEPS  # the shared gray LoRA is one matrix, not N copies
    rows.clear()
    _run(bb, pos, gray, "auto")  # this backbone is on the CPU
    assert rows == ([2 * N] * STEPS if FASTER_PASSES["cpu"] == "joint" else [N] * 2 * STEPS)
    rows.clear()
    sample(bb, inputs(bb, N)[2], None, pos, None, steps=STEPS, noise=inputs(bb, N)[0], passes="joint")
    assert rows == [N] * STEPS  # no CFG: one positive pass whatever the arrangement


def test_auto_resolves_per_device_and_bad_names_are_refused():
    assert cfg_passes_for("cpu") == FASTER_PASSES["cpu"] and cfg_passes_for("cuda:0") == FASTER_PASSES["cuda"]
    assert cfg_passes_for("meta") == "joint"  # a device never measured: the fewest forwards
    assert cfg_passes_for("cuda", "split") == "split"  # asked for: kept
    with pytest.raises(ValueError, match="auto, joint, split"):
        cfg_passes_for("cpu", "two")
    bb = tiny_toy()
    with pytest.raises(ValueError, match="cfg passes"):
        _run(bb, None, None, "both")
    x, _, cond = inputs(bb, N)
    with pytest.raises(ValueError, match="cfg passes"):  # refused without CFG too, not silently ignored
        sample(bb, cond, None, None, None, steps=1, noise=x, passes="both")


def test_stack_rows_keeps_one_shared_lora_unbatched(bb):
    gray, other = random_lora(bb, None, seed=3), random_lora(bb, None, seed=4)
    assert stack_rows([gray] * 4) is gray
    mixed = stack_rows([gray, other, gray])
    assert mixed.batched and mixed.batch_size == 3
    assert torch.equal(mixed.A[gray.names[0]][1], other.A[gray.names[0]])
    per_sample = random_lora(bb, 2, seed=5)
    assert stack_rows([per_sample, per_sample]).batch_size == 4  # batched LoRAs are always stacked


def test_generate_gives_the_same_images_in_both_arrangements(debug_run, tmp_path):
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.infer.api import I2L

    model = I2L.load(debug_run.run_dir)
    s = load_val_samples(debug_run.prepared_dir)
    loras = [model.predict_lora(s[0].refs), model.predict_lora(s[1].refs[:1])]  # two n_refs: two gray LoRAs
    prompts = [s[0].prompt, s[1].prompt]
    joint, split = (pixels(model.generate(prompts, loras, guidance=3.0, steps=3, seed=[1, 2], passes=p))
                    for p in ("joint", "split"))
    assert (joint - split).abs().max() <= 1  # uint8 pixels: at most a rounding step apart
    with pytest.raises(SystemExit):  # argparse refuses an unknown arrangement before anything loads
        cli(["generate", "--checkpoint", str(debug_run.run_dir), "--lora", "x.safetensors", "--prompt", "x",
             "--out", str(tmp_path), "--cfg-passes", "both"])


def test_generate_command_takes_an_arrangement(debug_run, tmp_path, capsys):
    from i2l.eval.heldout_loss import load_val_samples

    s = load_val_samples(debug_run.prepared_dir)
    refs = []  # the references as files, as a user hands them over
    for i, im in enumerate(s[0].refs[:2]):
        refs.append(str(tmp_path / f"ref{i}.png"))
        im.save(refs[-1])
    outs = {}
    for p in ("joint", "split"):
        out = tmp_path / p
        assert cli(["generate", "--checkpoint", str(debug_run.run_dir), "--images", *refs, "--prompt",
                    s[0].prompt, "--steps", "2", "--out", str(out), "--no-progress", "--cfg-passes", p]) == 0
        outs[p] = sorted(out.glob("*.png"))
    assert len(outs["joint"]) == len(outs["split"]) == 1
    from PIL import Image

    a, b = (pixels([Image.open(outs[p][0])]) for p in ("joint", "split"))
    assert (a - b).abs().max() <= 1
