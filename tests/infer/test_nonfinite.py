"""Nothing silent: NaN / Inf / absurd / integer LoRA weights, non-finite flags and arguments, and samples that go
non-finite are errors that say where, never a black image written with exit 0."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import PROMPTS, random_lora, tiny_toy

from i2l.cli import main as cli
from i2l.data.images import to_pil
from i2l.infer.guidance import NonFiniteSample, sample
from i2l.model.lora import LoRA


# ---------- LoRA files ----------
def _corrupt(tmp_path, fix) -> tuple[str, str]:
    """A valid LoRA file with one lora_B tensor replaced by fix(tensor); returns (path, that key)."""
    bb = tiny_toy()
    path = random_lora(bb, None).save(tmp_path / "style.safetensors")
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[1]
    tensors[key] = fix(tensors[key])
    with open(path, "rb") as f:  # keep the file's own metadata (i2l's format)
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    save_file(tensors, str(path), metadata=meta)
    return str(path), key


def _with(value):
    def fix(t):
        t = t.clone()
        t[0, 0] = value
        return t
    return fix


@pytest.mark.parametrize("fix, found", [
    (_with(float("nan")), "1 NaN"),
    (_with(float("inf")), "1 Inf"),
    (_with(-float("inf")), "1 Inf"),
    (_with(1e30), "above 10000"),
    (lambda t: (t * 100).to(torch.int8), "torch.int8, not floating point"),
])
def test_corrupt_lora_files_are_refused_naming_file_and_key(tmp_path, fix, found):
    path, key = _corrupt(tmp_path, fix)
    with pytest.raises(ValueError) as e:
        LoRA.load(path)
    msg = str(e.value)
    assert path in msg and key in msg and found in msg, msg
    with pytest.raises(ValueError, match="not floating point|NaN|above"):  # with the backbone too
        LoRA.load(path, backbone=tiny_toy())


def test_a_nan_alpha_in_adapter_metadata_is_refused(tmp_path):
    bb = tiny_toy()
    lora = random_lora(bb, None)
    tensors = {f"transformer.{k}.lora_{s}.weight": getattr(lora, s)[k] for k in lora.names for s in "AB"}
    path = tmp_path / "peft.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": '{"r": 2, "lora_alpha": NaN}'})
    with pytest.raises(ValueError, match="alpha/rank scale nan"):
        LoRA.load(path)


def test_finite_lora_files_load_unchanged(tmp_path):
    bb = tiny_toy()
    lora = random_lora(bb, None)
    back = LoRA.load(lora.save(tmp_path / "ok.safetensors"), backbone=bb)
    assert all(torch.equal(back.A[k], lora.A[k]) and torch.equal(back.B[k], lora.B[k]) for k in lora.names)


# ---------- LoRAs made in memory, arguments ----------
def test_non_finite_strengths_weights_and_loras_are_refused():
    bb = tiny_toy()
    a, b = random_lora(bb, None, seed=1), random_lora(bb, None, seed=2)
    with pytest.raises(ValueError, match="LoRA strength must be a finite number"):
        a.scaled(float("nan"))
    with pytest.raises(ValueError, match="mixing weight 2 must be a finite number"):
        LoRA.mix([a, b], [0.5, float("inf")])
    k = a.names[0]
    a.B[k] = a.B[k].clone()
    a.B[k][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"my style: {k}.lora_B holds 1 NaN"):
        a.check_finite("my style")


def test_sample_refuses_non_finite_guidance_and_strength():
    bb = tiny_toy()
    cond = bb.encode_prompts(PROMPTS[:1])
    noise = torch.randn(1, *bb.latent_shape(32))
    for kw, name in (({"guidance": float("inf")}, "guidance"), ({"strength": float("nan")}, "strength")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sample(bb, cond, cond, steps=2, noise=noise, **kw)


def test_to_pil_refuses_non_finite_pixels():
    x = torch.zeros(3, 3, 4, 4)
    assert len(to_pil(x)) == 3
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] of a batch of 3 hold NaN/Inf"):
        to_pil(x)


# ---------- the sampler ----------
def _nan_from_step(bb, monkeypatch, step: int, row: int, forwards_per_step: int = 1):
    """Make the backbone's velocity NaN for batch row `row` from sampler step `step` (1-based) on (a split CFG
    step runs two forwards: the NaN then comes from the step's first, the positive branch)."""
    real, calls = bb.velocity, []

    def velocity(x, t, *args, **kw):
        calls.append(1)
        v = real(x, t, *args, **kw)
        if len(calls) >= (step - 1) * forwards_per_step + 1:
            v = v.clone()
            v[row] = float("nan")
        return v
    monkeypatch.setattr(bb, "velocity", velocity)


@torch.no_grad()
@pytest.mark.parametrize("passes", ["joint", "split"])
def test_a_sample_going_nan_names_its_row_and_step(monkeypatch, passes):
    bb = tiny_toy()
    n = len(PROMPTS)
    cond, neg = bb.encode_prompts(PROMPTS), bb.encode_prompts([""] * n)
    noise = torch.randn(n, *bb.latent_shape(32), generator=torch.Generator().manual_seed(0))
    _nan_from_step(bb, monkeypatch, step=2, row=1, forwards_per_step=1 if passes == "joint" else 2)  # positive row 1
    with pytest.raises(NonFiniteSample, match="row 1 at step 2 of 3") as e:
        sample(bb, cond, neg, random_lora(bb, n), None, guidance=3.0, steps=3, noise=noise, passes=passes)
    assert e.value.first_bad == {1: 2}


# ---------- the commands ----------
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.replace("\r", "\n")  # loading progress bars may come before the error
    errors = [line for line in err.splitlines() if line.startswith("i2l ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert all(s in errors[0] for s in needles), err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_predict_refuses_a_non_finite_strength(debug_run, tmp_path, capsys, value):
    out = tmp_path / "style.safetensors"
    rc = cli(["predict", "--checkpoint", str(debug_run.checkpoint_dir), "--images", str(tmp_path / "none.png"),
              "--out", str(out), f"--strength={value}"])  # = : "-inf" is a value, not an option
    assert rc == 2 and not out.exists()
    _one_line_error(capsys, "i2l predict: error:", "--strength must be a finite number")


@pytest.mark.parametrize("flag, value", [("--guidance", "inf"), ("--guidance", "nan"), ("--strength", "nan"),
                                         ("--mix", "1,nan")])
def test_generate_refuses_non_finite_flags(debug_run, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    rc = cli(["generate", "--checkpoint", str(debug_run.checkpoint_dir), "--lora", str(tmp_path / "a.safetensors"),
              "--prompt", "a red cat", "--out", str(out), "--steps", "2", "--no-progress", f"{flag}={value}"])
    assert rc == 2 and not out.exists()
    _one_line_error(capsys, "i2l generate: error:", f"{flag}", "must be a finite number")


def test_generate_refuses_a_nan_lora_file(debug_run, tmp_path, capsys):
    path, key = _corrupt(tmp_path, _with(float("nan")))
    out = tmp_path / "out"
    rc = cli(["generate", "--checkpoint", str(debug_run.checkpoint_dir), "--lora", path, "--prompt", "a red cat",
              "--out", str(out), "--steps", "2", "--no-progress"])
    assert rc == 2 and not out.exists()
    _one_line_error(capsys, path, key, "NaN")


def test_generation_going_nan_names_the_lora_and_the_step(debug_run, tmp_path, monkeypatch):
    from i2l.infer.api import I2L
    from i2l.infer.generation import GenerateSettings, generate_samples, style_from_file

    model = I2L.load(debug_run.run_dir)
    path = model.predict_lora([tmp_path_image(tmp_path)]).save(tmp_path / "style.safetensors")
    style = style_from_file(path, model.backbone)
    from i2l.infer.guidance import cfg_passes_for

    forwards = 1 if cfg_passes_for(model.backbone.device) == "joint" else 2  # generate runs "auto"
    _nan_from_step(model.backbone, monkeypatch, step=2, row=0, forwards_per_step=forwards)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"lora {style.lora_id} from .*style.safetensors\) at sampler step 2 of 3"):
        generate_samples(model, [style], ["a red cat"], out, GenerateSettings(steps=3), progress=False)
    assert not any(out.glob("*.png")), "no image may be written for a non-finite sample"


def tmp_path_image(tmp_path):
    from PIL import Image

    p = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(p)
    return str(p)
