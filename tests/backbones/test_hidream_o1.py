"""The HiDream-O1 backbone on a tiny replica of the published directory (DiffSynth's own HiDreamO1ImageModel with
small sizes): the pipeline's prompt ids and layout, the velocity convention against DiffSynth's model_fn, exact
no-LoRA behaviour and per-sample LoRAs, the pipeline's schedules, images equal to DiffSynth's HiDream-O1 pipeline
with the same LoRA files loaded its way (asymmetric CFG included), sizing on the meta device, the doctor, and a
few training steps, then predict and generate through `I2L`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from i2l.backbones.base import Cond
from i2l.backbones.hidream_o1 import NOISE_SCALE, HiDreamO1Backbone, load_hidream_o1_backbone
from i2l.backbones.schedule import timestep_schedule
from i2l.config import BackboneConfig, get_config
from i2l.config.presets import HIDREAM_O1_TARGETS
from i2l.data.images import to_pil
from i2l.infer.guidance import sample
from i2l.model.lora import LoRA

REPLICA = "HiDream-O1-Image"
SIDE = 64  # 2x2 patches of 32 px: the smallest image the pipeline's layout takes
PROMPTS = ["a red cat", "a small blue house on a green hill"]  # two prompt lengths


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from i2l.replicas import write_replica

    return write_replica(REPLICA, tmp_path_factory.mktemp("hidream"))


def _bc(path, **kw) -> BackboneConfig:
    return BackboneConfig(kind="hidream_o1", path=str(path), image_size=SIDE, targets=HIDREAM_O1_TARGETS,
                          dtype="float32", **kw)


@pytest.fixture(scope="module")
def bb(replica) -> HiDreamO1Backbone:
    return load_hidream_o1_backbone(_bc(replica)).freeze()


def _lora(bb, seed: int, scale: float = 0.5, batch: int | None = None) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    A = {k: torch.randn(*shape, 2, i, generator=g) * scale / i**0.5 for k, (i, o) in bb.lora_targets().items()}
    B = {k: torch.randn(*shape, o, 2, generator=g) * scale for k, (i, o) in bb.lora_targets().items()}
    return LoRA(A, B, bb.backbone_id)


def _pipeline(replica):
    """DiffSynth's own HiDream-O1 pipeline on the replica: its from_pretrained finds models by a hash of the full-size
    keys and shapes, so its components are put in place as from_pretrained would (dit, processor + special tokens)."""
    from diffsynth.models.hidream_common import add_special_tokens
    from diffsynth.pipelines.hidream_o1_image import HiDreamO1ImagePipeline
    from transformers import AutoProcessor

    pipe = HiDreamO1ImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = load_hidream_o1_backbone(_bc(replica)).transformer  # a model of its own: fusing changes weights
    pipe.processor = AutoProcessor.from_pretrained(str(replica), local_files_only=True)
    add_special_tokens(pipe.processor.tokenizer)
    return pipe


# ---------- the published layout and the pipeline's prompt processing ----------
def test_replica_is_the_published_layout_read_by_diffsynth(replica, bb):
    from diffsynth.core.loader.file import load_state_dict

    tok = bb.tokenizer
    assert tok.convert_tokens_to_ids("<|tms_token|>") == bb.transformer.model.tms_token_id == 151673
    assert tok.convert_tokens_to_ids("<|image_pad|>") == bb.transformer.config.image_token_id
    shards = sorted(p.name for p in replica.glob("model-*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    sd = load_state_dict([str(replica / s) for s in shards])  # DiffSynth's reader: its keys are the model's
    assert set(sd) == set(bb.transformer.state_dict())
    assert json.loads((replica / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2


def test_prompt_ids_and_layout_are_the_pipelines(bb):
    from diffsynth.pipelines.hidream_o1_image import HiDreamO1ImageUnit_PromptTokenizer

    cond = bb.encode_prompts(PROMPTS)
    unit = HiDreamO1ImageUnit_PromptTokenizer()
    for i, p in enumerate(PROMPTS):
        ref = unit.build_text_sample(p, 96, 64, bb.tokenizer, bb.processor, bb.transformer.config, "cpu")
        n = int(cond.mask[i].sum())
        ids = cond.embeds[i, :n, 0]
        assert torch.equal(ids, ref["input_ids"][0])
        pos, types = bb._layout(ids[None], 96, 64)
        assert torch.equal(pos, ref["position_ids"]) and torch.equal(types, ref["token_types"])
    assert bb.prompt_text("a red cat").endswith("a red cat<|im_end|>\n<|im_start|>assistant\n<|boi_token|>"
                                                "<|tms_token|>")


# ---------- velocity ----------
def _inputs(bb, n: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, SIDE, SIDE, generator=g)
    t = torch.tensor([0.3, 0.8, 0.55][:n])
    return x, t, bb.encode_prompts((PROMPTS * 2)[:n])


def test_velocity_is_diffsynth_model_fn_in_the_papers_convention(bb):
    """DiffSynth's model_fn gives noise − data in pixels at sigma = 1 − t; i2l's latents are pixels / 8 and its
    velocity data − noise: v_i2l = −v_ds / 8."""
    from diffsynth.pipelines.hidream_o1_image import (
        HiDreamO1ImageUnit_PromptTokenizer,
        model_fn_hidream_o1_image,
    )

    x, t, cond = _inputs(bb)
    with torch.no_grad():
        v = bb.velocity(x, t, cond)  # mixed prompt lengths in one batch
        unit = HiDreamO1ImageUnit_PromptTokenizer()
        for i, p in enumerate(PROMPTS):
            s = unit.build_text_sample(p, SIDE, SIDE, bb.tokenizer, bb.processor, bb.transformer.config, "cpu")
            v_ds = model_fn_hidream_o1_image(bb.transformer, latents=x[i:i + 1] * NOISE_SCALE,
                                             timestep=(1 - t[i:i + 1]) * 1000, **s)
            torch.testing.assert_close(v[i:i + 1], -v_ds / NOISE_SCALE, rtol=1e-4, atol=1e-4)


def test_zero_lora_leaves_velocity_unchanged_and_a_lora_changes_it(replica, bb):
    fresh = load_hidream_o1_backbone(_bc(replica)).freeze()  # never had hooks installed
    x, t, cond = _inputs(bb)
    zero = _lora(bb, 0).scaled(0.0)
    with torch.no_grad():
        base = fresh.velocity(x, t, cond)
        v_zero = bb.velocity(x, t, cond, zero)
        v_lora = bb.velocity(x, t, cond, _lora(bb, 0))
        v_after = bb.velocity(x, t, cond)
    assert torch.equal(base, v_zero) and torch.equal(base, v_after)
    assert not torch.allclose(base, v_lora, atol=1e-4)


def test_per_sample_loras_in_a_mixed_length_batch_match_one_at_a_time(bb):
    x, t, cond = _inputs(bb, 3)  # lengths a, b, a: two groups, rows taken out of the batched LoRA
    lora = _lora(bb, 5, batch=3)
    with torch.no_grad():
        v = bb.velocity(x, t, cond, lora)
        for i in range(3):
            one = bb.velocity(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1)), lora[i])
            torch.testing.assert_close(v[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_a_lora_repeated_over_a_mixed_length_batch_serves_each_row(bb):
    x, t, cond = _inputs(bb, 3)  # lengths a, b, a: the prompt-length groups take their rows of the LoRA
    one = _lora(bb, 6, batch=1)
    with torch.no_grad():
        grouped = bb.velocity(x, t, cond, one.repeat_each(3))
        copies = bb.velocity(x, t, cond, one.take(torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(grouped, copies, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_lora_only(bb):
    x, t, cond = _inputs(bb)
    lora = _lora(bb, 2, batch=2)
    for m in (*lora.A.values(), *lora.B.values()):
        m.requires_grad_(True)
    bb.velocity(x, t, cond, lora).square().mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in lora.A.values())
    assert all(p.grad is None for p in bb.transformer.parameters())


def test_gradient_checkpointing_through_the_trainers_switch_keeps_the_gradients(bb):
    """As fm_backward runs it: the batch's LoRA active through backward, where checkpointed layers recompute; the
    two prompt lengths run as two groups, each recomputed with its own rows of the LoRA."""
    x, t, cond = _inputs(bb, 3)
    grads = []
    for on in (False, True):
        (bb.transformer.enable_gradient_checkpointing if on else bb.transformer.disable_gradient_checkpointing)()
        assert bb.transformer.is_gradient_checkpointing is on  # what the benches read
        lora = _lora(bb, 4, batch=3)
        for m in (*lora.A.values(), *lora.B.values()):
            m.requires_grad_(True)
        with bb.lora_adapter.use(lora):
            bb.velocity(x, t, cond, lora).square().mean().backward()
        grads.append(torch.cat([m.grad.flatten() for m in (*lora.A.values(), *lora.B.values())]))
    bb.transformer.disable_gradient_checkpointing()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_schedules_are_the_pipelines(bb):
    from diffsynth.diffusion import FlowMatchScheduler

    sched = FlowMatchScheduler("HiDream-O1-Image")
    sched.set_timesteps(7, shift=3.0)
    grid = bb.sampling_schedule(7, (3, SIDE, SIDE))
    torch.testing.assert_close(grid, 1 - torch.cat([sched.sigmas, torch.zeros(1)]))
    torch.testing.assert_close(grid, timestep_schedule(7, 3.0))  # the static shift 3 formula, independently
    train = bb.training_timesteps((3, SIDE, SIDE))
    s = torch.linspace(1, 0, 1001)[:-1]
    torch.testing.assert_close(train, 1 - 3 * s / (1 + 2 * s))


# ---------- equality with DiffSynth's pipeline ----------
def _i2l_image(pipe, bb, prompt, lora, neg_lora, guidance, steps, seed):
    """i2l's sample, made an image by the pipeline's own conversion (it truncates to uint8; i2l's to_pil rounds)."""
    noise = torch.randn((1, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))  # = the pipeline's / 8
    x = sample(bb, bb.encode_prompts([prompt]), bb.encode_prompts([" "]), lora, neg_lora, guidance, steps,
               noise=noise)
    return np.asarray(pipe.vae_output_to_image(bb.decode_latents(x)), dtype=np.int16)


def _assert_same_image(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.int16)
    diff = np.abs(ours - theirs)
    print(f"image vs DiffSynth: max |diff| {diff.max()}, {(diff > 0).mean():.4%} of values differ")
    assert ours.shape == theirs.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), diff.mean())


def test_asymmetric_cfg_image_equals_diffsynth_pipeline_with_the_same_lora_files(replica, bb, tmp_path):
    """The paper's asymmetric guidance: one LoRA on the positive branch, another on the negative. DiffSynth's
    pipeline takes them as `lora` / `negative_lora`, hot-loaded per branch through its GeneralLoRALoader."""
    from safetensors.torch import load_file

    pos, neg = _lora(bb, 11), _lora(bb, 12)
    pos_file = pos.save(tmp_path / "pos.safetensors", format="diffsynth", backbone=bb)
    neg_file = neg.save(tmp_path / "neg.safetensors", format="diffsynth", backbone=bb)
    assert all(not k.startswith(("transformer.", "diffusion_model.")) for k in load_file(str(pos_file)))
    pipe = _pipeline(replica)
    # hot-loadable linears, as a quantized or offloaded DiT has them: each branch loads and clears its own LoRA
    # (the pipeline's own device shuffling stays off: it calls torch.cpu.empty_cache, which torch lacks)
    pipe.dit = pipe.enable_lora_hot_loading(pipe.dit)
    theirs = pipe("a red cat", negative_prompt=" ", cfg_scale=4.0, height=SIDE, width=SIDE, seed=3,
                  num_inference_steps=4, lora=load_file(str(pos_file)), negative_lora=load_file(str(neg_file)),
                  progress_bar_cmd=lambda x: x)
    ours = _i2l_image(pipe, bb, "a red cat", pos, neg, 4.0, 4, seed=3)
    base = _i2l_image(pipe, bb, "a red cat", None, None, 4.0, 4, seed=3)
    _assert_same_image(ours, theirs)
    assert np.abs(ours - base).max() > 8, "the LoRAs must change the image"


def test_image_with_a_lora_file_fused_by_pipe_load_lora_equals_i2l(replica, bb, tmp_path, capsys):
    lora = _lora(bb, 21)
    path = lora.save(tmp_path / "style.safetensors", format="diffsynth", backbone=bb)
    pipe = _pipeline(replica)
    pipe.load_lora(pipe.dit, str(path))  # GeneralLoRALoader: W + B·A into every target layer
    assert f"{len(bb.lora_targets())} tensors are fused" in capsys.readouterr().out
    theirs = pipe("a small blue house", negative_prompt=" ", cfg_scale=2.5, height=SIDE, width=SIDE, seed=5,
                  num_inference_steps=3, progress_bar_cmd=lambda x: x)
    ours = _i2l_image(pipe, bb, "a small blue house", lora, lora, 2.5, 3, seed=5)
    _assert_same_image(ours, theirs)
    # i2l's default (diffusers-format) file for this backbone has DiffSynth's keys too: no prefix
    plain = lora.save(tmp_path / "plain.safetensors", backbone=bb)
    back = LoRA.load(plain, backbone=bb)
    assert all(torch.equal(back.B[k], lora.B[k]) for k in lora.B)


# ---------- sizing, random weights, config, doctor ----------
def test_info_sizes_the_predictor_on_the_meta_device():
    from i2l.backbones.sizes import describe

    lines = describe(get_config("hidream_o1", {"backbone.path": ""}))
    assert "HiDreamO1ImageModel" in lines[0] and "252 adapted linear layers" in lines[0]
    assert "2016 LoRA queries" in lines[1]


def test_random_backbone_of_the_replicas_sizes_runs_a_benchmark_cond(replica):
    from i2l.backbones.random_init import random_backbone, random_cond

    cfg = get_config("hidream_o1", {"backbone.path": str(replica), "backbone.dtype": "float32",
                                    "backbone.image_size": SIDE})
    rb = random_backbone(cfg)
    cond = random_cond(rb, ["a", "b"], generator=torch.Generator().manual_seed(0))
    assert cond.embeds.shape == (2, 64, 1) and (cond.embeds[:, -1, 0] == rb.transformer.model.tms_token_id).all()
    with torch.no_grad():
        v = rb.velocity(torch.randn(2, 3, SIDE, SIDE), torch.tensor([0.2, 0.6]), cond)
    assert v.shape == (2, 3, SIDE, SIDE) and torch.isfinite(v).all()
    assert len(rb.lora_targets()) == 14


def test_image_size_must_be_whole_patches():
    with pytest.raises(ValueError, match="multiple of 32"):
        BackboneConfig(kind="hidream_o1", image_size=48)


def test_doctor_passes_the_replica_and_names_what_is_missing_or_wrong(replica, tmp_path):
    from i2l.doctor.backbone import check_backbone

    def check(path):
        return check_backbone(get_config("hidream_o1", {"backbone.path": str(path)}))

    ok = check(replica)
    assert ok.status == "ok", ok.detail
    assert "14 adapted linear layers" in ok.detail
    broken = tmp_path / "broken"
    shutil.copytree(replica, broken)
    (broken / "model-00003-of-00004.safetensors").unlink()
    (broken / "preprocessor_config.json").unlink()
    detail = check(broken).detail
    assert "model-00003-of-00004.safetensors" in detail and "preprocessor_config.json" in detail
    wrong = tmp_path / "wrong"
    shutil.copytree(replica, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert "mlp.gate_proj" in check(wrong).detail


# ---------- training and inference through i2l ----------
@pytest.fixture(scope="module")
def trained(debug_run, replica, tmp_path_factory):
    """3 steps of the predictor through the replica's backbone on the debug world (its toy encoder)."""
    from i2l.train.loop import train_predictor

    cfg = get_config("debug", {"train.steps": 3, "train.ckpt_every": 3, "train.batch_size": 4,
                               "train.timesteps": "backbone", "train.loss_weighting": "gaussian"})
    cfg.data_root = str(debug_run.data_root)
    cfg.encoder.path = debug_run.cfg.encoder.path
    cfg.backbone = _bc(replica)
    out = tmp_path_factory.mktemp("hidream_run")
    info = train_predictor(cfg, debug_run.prepared_dir, out, progress=False)
    return out, info


def test_training_steps_through_the_backbone_have_finite_loss(trained):
    from i2l.train.checkpoint import latest_checkpoint

    out, info = trained
    assert info["steps"] == 3
    curve = json.loads((latest_checkpoint(out) / "curve.json").read_text())
    assert len(curve) == 3 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in curve)


def test_predict_and_generate_through_i2l(trained, debug_run, tmp_path):
    from i2l.infer.api import I2L

    out, _ = trained
    model = I2L.load(out)
    assert isinstance(model.backbone, HiDreamO1Backbone)
    ref = tmp_path / "ref.png"
    to_pil(torch.rand(1, 3, 32, 32) * 2 - 1)[0].save(ref)
    lora = model.predict_lora([ref])
    assert set(lora.names) == set(model.backbone.lora_targets())
    images = model.generate(["a red cat", "a small blue house"], [lora, lora], guidance=2.0, steps=2, seed=[0, 1])
    assert [im.size for im in images] == [(SIDE, SIDE)] * 2
    # per-prompt seeds: an image does not depend on its batch (prompt lengths run as their own groups)
    again = model.generate(["a red cat"], [lora], guidance=2.0, steps=2, seed=0)
    assert np.abs(np.asarray(again[0], dtype=np.int16) - np.asarray(images[0], dtype=np.int16)).max() <= 1


def test_cond_cat_pads_ids_with_a_mask(bb):
    c = Cond.cat([bb.encode_prompts([PROMPTS[0]]), bb.encode_prompts([PROMPTS[1]])])
    assert c.mask is not None and c.embeds.dtype == torch.long and c.mask.sum(1).tolist()[0] < c.embeds.shape[1]
