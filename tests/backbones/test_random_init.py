"""Same-size random models of the real presets (speed and sizing without a checkpoint), the cost benchmarks that
time them on any preset, and the predictor's grouped heads that keep the real-size forward from being
launch-bound."""

import json
import math

import pytest
import torch
from tiny_models import tiny_flux2

from i2l.backbones.random_init import random_backbone, random_cond, random_encoder
from i2l.backbones.sizes import param_count
from i2l.bench._steps import setup_tag
from i2l.config import get_config
from i2l.model.predictor import I2LPredictor, predict_lora
from i2l.store import Store
from i2l.toy.encoder import new_toy_encoder


@pytest.mark.parametrize("preset,params,layers,ident", [
    ("klein4b", 3.876e9, 100, "flux2:c128-d3072-l5-s20-j7680"),
    ("zimage", 6.155e9, 238, "zimage:c16-d3840-l30-r2-cap2560"),
])
def test_real_presets_build_at_their_published_size_without_weights(preset, params, layers, ident):
    cfg = get_config(preset)
    assert not cfg.backbone.path  # nothing to read: the published architecture decides
    bb = random_backbone(cfg, "meta")
    assert abs(param_count(bb.transformer) / params - 1) < 1e-3
    assert len(bb.lora_targets()) == layers and bb.backbone_id == ident
    assert bb.dtype == torch.bfloat16 and not any(p.requires_grad for p in bb.transformer.parameters())
    enc = random_encoder(cfg.encoder, "meta")  # SigLIP2 so400m at 512 px: 32 x 32 patches of width 1152
    assert enc.dim == 1152 and enc.tokens_per_image == 1024 and abs(param_count(enc) / 428.8e6 - 1) < 1e-3


def _tiny_flux2_dir(tmp_path):
    d = tmp_path / "klein" / "transformer"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(tiny_flux2(parts=False).transformer.config)))
    return d.parent


def test_a_local_checkpoint_config_decides_the_architecture(tmp_path):
    from i2l.backbones.sizes import describe

    path = _tiny_flux2_dir(tmp_path)
    cfg = get_config("klein4b", [f"backbone.path={path}", "backbone.dtype=float32"])
    bb = random_backbone(cfg, "cpu")
    assert param_count(bb.transformer) == param_count(tiny_flux2(parts=False).transformer)
    cond = random_cond(bb, ["a", "b"])  # no text encoder: embeddings of the pipeline's length and width
    assert cond.embeds.shape == (2, 512, bb.transformer.config.joint_attention_dim)
    text = "\n".join(describe(get_config("klein4b", [f"backbone.path={path}"])))
    assert f"{param_count(bb.transformer) / 1e6:.2f} M params" in text
    # and without a directory, info sizes the published model instead of giving up
    assert "3875.54 M params" in "\n".join(describe(get_config("klein4b")))
    # a directory that is named but holds no pipeline is an error, never a silent fall-back to the published size
    with pytest.raises(FileNotFoundError, match="backbone.path must be a diffusers pipeline directory"):
        random_backbone(get_config("klein4b", [f"backbone.path={tmp_path / 'missing'}"]), "meta")


def test_cost_benchmarks_time_a_real_preset_and_record_what_the_goal_asks(tmp_path, capsys):
    from i2l.cli import main
    from i2l.store import Store

    store = tmp_path / "results.duckdb"
    sets = ["--set", f"backbone.path={_tiny_flux2_dir(tmp_path)}", "--set", "backbone.dtype=float32",
            "--set", "backbone.image_size=64", "--set", "encoder.kind=toy", "--set", "encoder.image_size=32",
            "--set", "predictor.hidden=32", "--set", "predictor.depth=1", "--set", "predictor.heads=2"]
    assert main(["bench", "amortization", "--random-init", "--preset", "klein4b", "--styles", "2", "--refs", "2",
                 "--per-style-batches", "1,2", "--rounds", "2", "--device", "cpu", "--store", str(store), *sets]) == 0
    assert main(["bench", "train-step", "--preset", "klein4b", "--batch", "2", "--rounds", "2", "--warmup", "1",
                 "--device", "cpu", "--store", str(store), *sets]) == 0
    assert "goal_needs_steps" in capsys.readouterr().out
    rows = Store(store).query("SELECT bench, case_name, metric, value FROM benchmarks")
    tag = setup_tag("klein4b", sets[1::2])  # cases carry the set-up: tiny overrides never pass for klein4b
    assert tag.startswith("klein4b+") and all(c.startswith(f"{tag}/") for c in rows.case_name)
    fig = {(r.bench, r.case_name.removeprefix(f"{tag}/"), r.metric): r.value for r in rows.itertuples()}
    fwd = fig[("amortization", "i2l", "forward_alone_s")]
    assert fig[("amortization", "i2l", "forward_batched_on_device_s")] > 0  # the host copy's share is visible
    for b in (1, 2):
        step = fig[("amortization", f"rows{b}", "per_style_step_s")]
        assert fwd > 0 and step > 0
        assert fig[("amortization", f"rows{b}/alone", "goal_needs_steps")] == math.ceil(1000 * fwd / step)
    ratio = fig[("train_step", "i2l_step_G1/per_style_lora_step", "ratio")]  # klein4b: one target per LoRA
    assert ratio > 0 and fig[("train_step", "setup", "rows_per_step")] == 2
    assert not any(m == "peak_gpu_memory" for _, _, m in fig)  # a CPU run has no GPU memory to report


def test_setup_tags_name_the_preset_and_its_overrides_in_any_order():
    assert setup_tag("klein4b", []) == "klein4b"
    a = setup_tag("klein4b", ["predictor.hidden=2048", "predictor.depth=28"])
    assert a == setup_tag("klein4b", ["predictor.depth=28", " predictor.hidden = 2048"]) != "klein4b"
    assert a == setup_tag("klein4b", ["predictor.depth=4", "predictor.hidden=2048", "predictor.depth=28"])  # last wins
    assert a != setup_tag("zimage", ["predictor.hidden=2048", "predictor.depth=28"])
    assert a != setup_tag("klein4b", ["predictor.hidden=2048", "predictor.depth=29"])


def _train_step(store, *options):
    from i2l.cli import main

    assert main(["bench", "train-step", "--preset", "debug", "--batch", "2", "--rounds", "2", "--warmup", "1",
                 "--device", "cpu", "--store", str(store), *options]) == 0
    rows = Store(store).query("SELECT case_name, metric, value, unit, extra FROM benchmarks WHERE bench = 'train_step'")
    return {(r.case_name, r.metric): r for r in rows.itertuples()}


def test_train_step_figures_of_other_set_ups_do_not_replace_one_another(tmp_path):
    store = tmp_path / "results.duckdb"
    _train_step(store)
    _train_step(store, "--set", "predictor.rank=4")  # as infra/gpu-benchmarks.sh runs SETS= after the defaults
    latest = Store(store).query("SELECT case_name, metric FROM v_benchmarks WHERE bench = 'train_step'")
    tag = setup_tag("debug", ["predictor.rank=4"])
    assert {c for c, m in latest.itertuples(index=False) if m == "ratio"} == {
        f"{t}/i2l_step_G{g}/per_style_lora_step" for t in ("debug", tag) for g in (1, 2)}  # debug: G = 2
    params = {c: v for c, m, v in Store(store).query(
        "SELECT case_name, metric, value FROM v_benchmarks WHERE metric = 'predictor_params'").itertuples(index=False)}
    assert params["debug/setup"] < params[f"{tag}/setup"]  # each set-up's own sizes (debug's rank is 2)


def _predictor():
    bb = tiny_flux2(parts=False)  # layers of several widths: several groups per head
    enc = new_toy_encoder(get_config("debug").encoder)
    torch.manual_seed(1)
    pred = I2LPredictor(get_config("debug").predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.1)  # a non-trivial predictor
        pred.log_alpha.uniform_(-0.5, 0.5)
    return pred, enc, torch.rand(2, 2, 3, 32, 32) * 2 - 1


def test_grouped_heads_equal_one_matrix_per_layer():
    pred, enc, refs = _predictor()
    assert 1 < len(pred.head_A.D) < pred.head_A.num_layers  # grouped: fewer matmuls than layers
    lora = predict_lora(pred, enc, refs)
    with torch.no_grad():  # the paper's Eq. 4, one layer at a time
        tokens, keep, ref_index = enc.encode_refs(refs, torch.tensor([2, 2]))
        seen = {}
        pred.norm.register_forward_hook(lambda m, i, o: seen.update(h=o))
        pred(tokens, keep, ref_index)
        L, _, k, H = pred.query.shape
        h = seen["h"].reshape(2, L, 2, k, H)
        for head, t in ((pred.head_A, 0), (pred.head_B, 1)):
            for g, idx in enumerate(head.groups):
                for j, i in enumerate(idx):
                    name = pred.names[i]
                    y = h[:, i, t] @ head.C[i] @ head.D[g][j]  # (B, k, d)
                    want = y * pred.a_scale[i] if t == 0 else (y * pred.log_alpha[i].exp()).transpose(1, 2)
                    got = lora.A[name] if t == 0 else lora.B[name]
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_checkpoints_with_one_matrix_per_layer_still_load():
    pred, enc, refs = _predictor()
    old = {}
    for key, v in pred.state_dict().items():  # write the layout of checkpoints made before the grouping
        head = key.split(".D.")[0] if ".D." in key else None
        if head is None:
            old[key] = v
            continue
        g = int(key.rsplit(".", 1)[1])
        for j, i in enumerate(getattr(pred, head).groups[g]):
            old[f"{head}.D.{i}"] = v[j].clone()
    fresh = I2LPredictor(pred.cfg, pred.targets, enc.dim, pred.backbone_id)
    fresh.load_state_dict(old)
    a, b = predict_lora(pred, enc, refs), predict_lora(fresh, enc, refs)
    for n in a.names:
        assert torch.equal(a.A[n], b.A[n]) and torch.equal(a.B[n], b.B[n])


def test_predictor_precision_follows_the_backbone_on_a_gpu_only():
    from contextlib import nullcontext

    from i2l.model.flow_matching import mixed_precision

    assert isinstance(mixed_precision("cpu", "bfloat16"), nullcontext)  # CPU: exact fp32, as the toy world runs
    assert isinstance(mixed_precision("cuda", "float32"), nullcontext)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        ctx = mixed_precision("cuda", "bfloat16")  # a bf16 backbone on a GPU: bf16 autocast, as in training
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_train_step_bench_records_a_comparison_case_that_does_not_fit(tmp_path, monkeypatch):
    from i2l.bench._steps import Steps

    real = Steps.i2l_step

    def one_lora_per_target_does_not_fit(self, data, opt, group):
        if group == 1:  # as a 1.5 B predictor at batch 4 on an 80 GB GPU
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, data, opt, group)

    monkeypatch.setattr(Steps, "i2l_step", one_lora_per_target_does_not_fit)
    sets = ["--set", "train.targets_per_lora=2"]
    tag = setup_tag("debug", sets[1::2])
    fig = {(c.removeprefix(f"{tag}/"), m): r.value for (c, m), r in _train_step(tmp_path / "r.duckdb", *sets).items()}
    assert fig[("i2l_step_G1", "out_of_memory")] == 1 and ("i2l_step_G1", "median_ms") not in fig
    assert fig[("i2l_step_G2/per_style_lora_step", "ratio")] > 0  # the goal's case is still timed
    assert not any("no_ckpt" in c for c, _ in fig)  # a CPU run never checkpoints: nothing to time twice


class FakeAllocator:
    """torch.cuda's peak-memory counters on a CPU: each step declares what it would allocate."""

    def __init__(self, monkeypatch):
        self.peak = 0.0
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: setattr(self, "peak", 0.0))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: self.peak * 2**30)

    def use(self, gib: float) -> None:
        self.peak = max(self.peak, gib)


def test_train_step_peak_memory_is_each_case_own_not_the_runs(tmp_path, monkeypatch):
    import dataclasses

    from i2l.bench._steps import Steps

    mem, build, i2l_step, lora_step = FakeAllocator(monkeypatch), Steps.build, Steps.i2l_step, Steps.lora_step

    def as_on_a_gpu(cls, *a, **k):  # the peaks a GPU run keeps
        return dataclasses.replace(build(*a, **k), peaks={})

    def i2l(self, data, opt, group):
        mem.use({1: 80.0, 2: 12.0}[group])
        if group == 1:  # fills the GPU, then fails: no later case may be charged for it
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return i2l_step(self, data, opt, group)

    def per_style(self, *a):
        mem.use(10.0)
        return lora_step(self, *a)

    monkeypatch.setattr(Steps, "build", classmethod(as_on_a_gpu))
    monkeypatch.setattr(Steps, "i2l_step", i2l)
    monkeypatch.setattr(Steps, "lora_step", per_style)
    sets = ["--set", "train.targets_per_lora=2"]
    tag = setup_tag("debug", sets[1::2])
    fig = _train_step(tmp_path / "r.duckdb", *sets)
    peaks = {c.removeprefix(f"{tag}/"): r.value for (c, m), r in fig.items() if m == "peak_gpu_memory"}
    assert peaks == {"i2l_step_G2": 12.0, "per_style_lora_step": 10.0}


@pytest.mark.parametrize("per_style_fits", [True, False])
def test_train_step_compares_like_for_like_with_and_without_checkpointing(tmp_path, monkeypatch, per_style_fits):
    from i2l.bench._steps import Steps

    build, i2l_step, lora_step, ran = Steps.build, Steps.i2l_step, Steps.lora_step, set()

    def checkpointed(cls, *a, **k):  # as Steps.build sets a GPU run up
        st = build(*a, **k)
        st.set_checkpointing(True)
        return st

    def i2l(self, *a):
        ran.add(("i2l", self.checkpointing))
        return i2l_step(self, *a)

    def per_style(self, *a):
        ran.add(("per_style", self.checkpointing))
        if not (per_style_fits or self.checkpointing):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return lora_step(self, *a)

    monkeypatch.setattr(Steps, "build", classmethod(checkpointed))
    monkeypatch.setattr(Steps, "i2l_step", i2l)
    monkeypatch.setattr(Steps, "lora_step", per_style)
    fig = {(c.removeprefix("debug/"), m): r for (c, m), r in _train_step(tmp_path / "r.duckdb").items()}
    assert ran == {("i2l", True), ("i2l", False), ("per_style", True), ("per_style", False)}
    ckpt = fig[("i2l_step_G2/per_style_lora_step", "ratio")]  # debug: G = 2 targets per predicted LoRA
    assert "both with gradient checkpointing" in ckpt.unit and json.loads(ckpt.extra)["goal"] == "<= 1.3"
    assert fig[("i2l_step_G2_no_ckpt", "median_ms")].value > 0
    if per_style_fits:
        plain = fig[("i2l_step_G2_no_ckpt/per_style_lora_step_no_ckpt", "ratio")]
        assert "neither with gradient checkpointing" in plain.unit and json.loads(plain.extra)["goal"] == "<= 1.3"
    else:
        assert fig[("per_style_lora_step_no_ckpt", "out_of_memory")].value == 1
        assert not any(c.endswith("per_style_lora_step_no_ckpt") and m != "out_of_memory" for c, m in fig)


def test_moving_a_backbone_casts_only_when_the_dtype_differs(caplog):
    """diffusers warns on every dtype given to `to()`: make run printed a float32 warning for a float32 model."""
    import logging

    import torch

    from i2l.backbones.random_init import random_backbone
    from i2l.config import get_config

    cfg = get_config("debug")
    with caplog.at_level(logging.WARNING):
        bb = random_backbone(cfg).to("cpu", torch.float32)
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
    bb.to("cpu", torch.bfloat16)  # a real change of dtype still casts
    assert {p.dtype for p in bb.transformer.parameters()} == {torch.bfloat16}
