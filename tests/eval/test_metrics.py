"""Scorer API: long score rows, skipped scorers with reasons, leakage, and the plugins on tiny random weights."""

import json
import string
from pathlib import Path

import pytest
import torch
from PIL import Image

from i2l.config import ScorerConfig, get_config
from i2l.eval.metrics import METRICS, ScoreBatch, Scorer, build_scorers, score_samples
from i2l.eval.metrics.leakage import leakage_scores, semantic_leakage
from i2l.eval.metrics.plugins import AestheticMLP, AestheticScorer, PickScoreScorer


def _images(n, size=32):
    return [Image.new("RGB", (size, size), ((60 * i) % 256, (90 * i) % 256, 200)) for i in range(n)]


def _batch(n=3, refs=True):
    return ScoreBatch(images=_images(n), prompts=[f"one small circle {i}" for i in range(n)],
                      styles=["In the style of a calm poster."] * n,
                      references=[_images(2) for _ in range(n)] if refs else [],
                      reference_prompts=[["two large squares at the top", "one small cross"]] * n if refs else [])


class FakeScorer:
    """A stand-in scorer with fixed outputs, to test the row format (not a mock of any library)."""

    name, version, metrics = "fake", "7", ("a", "b")

    def __init__(self, ok=True):
        self.ok = ok

    def available(self):
        return (True, "") if self.ok else (False, "weights missing")

    def score(self, batch):
        return {"a": [1.0] * len(batch), "b": [None] + [2.5] * (len(batch) - 1)}


def test_score_samples_long_rows_and_gaps():
    rows = score_samples([FakeScorer()], _batch(3))
    assert len(rows) == 3 * 2
    assert {tuple(sorted(r)) for r in rows} == {
        ("index", "metric", "reason", "scorer", "scorer_version", "status", "value")}
    b0 = next(r for r in rows if r["metric"] == "b" and r["index"] == 0)
    assert b0["value"] is None and b0["status"] == "skipped" and b0["reason"]
    a2 = next(r for r in rows if r["metric"] == "a" and r["index"] == 2)
    assert a2 == {"index": 2, "metric": "a", "value": 1.0, "scorer": "fake", "scorer_version": "7",
                  "status": "ok", "reason": ""}


def test_unavailable_scorer_is_recorded_skipped_never_scored():
    class Exploding(FakeScorer):
        def score(self, batch):
            raise AssertionError("an unavailable scorer must not be run")

    rows = score_samples([Exploding(ok=False)], _batch(2))
    assert len(rows) == 4
    assert all(r["status"] == "skipped" and r["value"] is None and r["reason"] == "weights missing" for r in rows)


def test_score_batch_checks_lengths():
    with pytest.raises(ValueError, match="prompts"):
        ScoreBatch(images=_images(2), prompts=["a"], styles=["s", "s"])
    with pytest.raises(ValueError, match="references"):
        ScoreBatch(images=_images(2), prompts=["a", "b"], styles=["s", "s"], references=[[]])


def test_unconfigured_scorers_are_skipped_with_reasons(tmp_path):
    cfg = get_config("debug", ["scorer.hpsv2_path=" + str(tmp_path)])
    cfg.data_root = str(tmp_path)  # no toy scorer trained here
    scorers = build_scorers(cfg)
    assert all(isinstance(s, Scorer) for s in scorers)
    assert sorted(m for s in scorers for m in s.metrics) == sorted(METRICS)
    rows = score_samples(scorers, _batch(2))
    assert len(rows) == 2 * len(METRICS)
    assert all(r["status"] == "skipped" and r["value"] is None for r in rows)
    reason = {r["metric"]: r["reason"] for r in rows}
    assert "pretrain-scorer" in reason["clip_text"]
    assert "scorer.aesthetic_path" in reason["aesthetic"] and "scorer.pickscore_path" in reason["pickscore"]
    for metric, package in (("imagereward", "image-reward"), ("hpsv3", "hpsv3")):
        if _installed(package):
            continue  # then the reason is about its weights, checked above for the others
        assert reason[metric] == f"package {package} not installed"
    # hpsv2 is configured, but with a directory: it needs its checkpoint file
    assert "scorer.hpsv2_path" in reason["hpsv2"] and "not a checkpoint file" in reason["hpsv2"]


def test_hpsv2_needs_open_clip_not_the_hpsv2_package(tmp_path, monkeypatch):
    """HPSv2 scores through our open_clip code: a configured checkpoint is usable without the `hpsv2` package,
    and when open_clip is missing the reason names open_clip."""
    import importlib.util

    from i2l.eval.metrics.plugins import HPSv2Scorer

    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    ckpt.write_bytes(b"")
    sc = ScorerConfig(hpsv2_path=str(ckpt))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hpsv2" else real_find_spec(name, *a))
    assert HPSv2Scorer(sc.hpsv2_path, sc).available() == (True, "")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    assert HPSv2Scorer(sc.hpsv2_path, sc).available() == (False, "package open_clip_torch not installed")


def _installed(pip_name):
    import importlib.util

    return importlib.util.find_spec({"image-reward": "ImageReward"}.get(pip_name, pip_name)) is not None


def test_semantic_leakage_sign_and_exclusions():
    e = torch.eye(4)  # unit "embeddings": image == own prompt, or == a reference's prompt
    assert semantic_leakage(e[0], e[0], e[1:3]) == pytest.approx(-100.0)  # depicts its own prompt: no leakage
    assert semantic_leakage(e[1], e[0], e[1:2]) == pytest.approx(100.0)  # depicts the reference's content
    emb = {"own": e[0], "ref": e[1], "other": e[2]}
    out = leakage_scores(torch.stack([e[1], e[1], e[0]]), ["own", "own", "own"],
                         [["ref", "own"], ["own"], ["ref", "other"]], emb)
    assert out[0] == pytest.approx(100.0)  # the reference sharing the own prompt is left out
    assert out[1] is None  # no reference with another prompt: undefined
    assert out[2] == pytest.approx(-100.0)


# ---- plugins on tiny random weights -------------------------------------------------------------------------

def _tiny_open_clip(tmp_path, embed_dim):
    """A registered tiny open_clip architecture with random weights saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    from i2l.eval.metrics.clip import register_model_config

    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-l14.json").write_text(json.dumps(cfg))
    name = register_model_config(tmp_path / "tiny-l14.json")
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    return name, model


def test_aesthetic_mlp_scores_like_laion_on_normalised_embedding(tmp_path):
    from safetensors.torch import save_file

    name, clip = _tiny_open_clip(tmp_path, 768)
    torch.manual_seed(0)
    mlp = AestheticMLP(768)
    save_file(mlp.state_dict(), str(tmp_path / "aesthetic.safetensors"))
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")  # the released format: a plain state dict
    sc = ScorerConfig(aesthetic_path=str(tmp_path / "aesthetic.safetensors"), aesthetic_clip_model=name,
                      aesthetic_clip_checkpoint=str(tmp_path / "clip.safetensors"), device="cpu")
    scorer = AestheticScorer(sc.aesthetic_path, sc)
    assert scorer.available() == (True, "")
    batch = _batch(3, refs=False)
    got = scorer.score(batch)["aesthetic"]

    import open_clip

    pre = open_clip.create_model_and_transforms(name)[2]
    x = torch.stack([pre(im) for im in batch.images])
    with torch.no_grad():
        emb = clip.eval().encode_image(x)
        want = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True))
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert len({round(v, 5) for v in got}) == 3  # different images, different scores

    sc.aesthetic_path = str(tmp_path / "aesthetic.pth")
    assert AestheticScorer(sc.aesthetic_path, sc).score(batch)["aesthetic"] == pytest.approx(got, abs=1e-5)


def test_aesthetic_needs_its_clip_checkpoint(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    ok, reason = AestheticScorer(str(tmp_path / "a.safetensors"), ScorerConfig()).available()
    assert not ok and "aesthetic_clip_checkpoint" in reason


def _tiny_pickscore(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,:-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)})
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                         "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path / "model")
    proc.save_pretrained(path / "processor")
    return model, proc


def test_pickscore_is_logit_scale_times_cosine(tmp_path):
    model, proc = _tiny_pickscore(tmp_path / "ps")
    sc = ScorerConfig(pickscore_path=str(tmp_path / "ps" / "model"), device="cpu", batch_size=2)
    assert not PickScoreScorer(sc.pickscore_path, sc).available()[0]  # no processor in the model dir
    sc.pickscore_processor_path = str(tmp_path / "ps" / "processor")
    scorer = PickScoreScorer(sc.pickscore_path, sc)
    assert scorer.available() == (True, "")
    batch = _batch(3, refs=False)
    got = scorer.score(batch)["pickscore"]
    with torch.no_grad():
        want = []
        for im, p in zip(batch.images, batch.prompts):
            ie = model.get_image_features(**proc(images=[im], return_tensors="pt"))
            te = model.get_text_features(**proc(text=[p], return_tensors="pt"))
            ie, te = [t if torch.is_tensor(t) else t.pooler_output for t in (ie, te)]
            want.append(float(model.logit_scale.exp() * torch.cosine_similarity(ie, te)))
    assert got == pytest.approx(want, abs=1e-4)
    swapped = ScoreBatch(images=batch.images, prompts=batch.prompts[::-1], styles=batch.styles)
    assert scorer.score(swapped)["pickscore"] != pytest.approx(got, abs=1e-4)  # the prompt matters


def test_clip_scorer_reads_the_toy_scorer_where_pretrain_scorer_writes_it(tmp_path):
    from i2l.eval.metrics import default_scorer_dir

    cfg = get_config("debug")
    cfg.data_root = str(tmp_path)
    clip = build_scorers(cfg)[0]
    assert clip.path == tmp_path / "toy" / "debug" / "scorer" == Path(default_scorer_dir(cfg))
    ok, reason = clip.available()
    assert not ok and str(clip.path) in reason and "pretrain-scorer" in reason


@pytest.mark.parametrize("prepared", [True, False])
def test_pretrain_scorer_reads_the_presets_prepared_data_else_its_toy_world(tmp_path, monkeypatch, prepared):
    """Without --data: <root>/prepared/<preset> when it has a train split, else <root>/toyworld/<preset>
    (i2l.layout), the places `i2l prepare` and `i2l toyworld` write to."""
    from i2l.cli import main
    from i2l.toy import scorer as toy_clip

    (tmp_path / "toyworld" / "debug").mkdir(parents=True)
    if prepared:
        (tmp_path / "prepared" / "debug" / "train").mkdir(parents=True)
    seen = []

    def pretrain(cfg, data, out):  # records what it was given instead of training
        seen.append((Path(data), Path(out)))
        return {"steps": 0, "rows": 0, "styles": 0, "seconds": 0.0, "first_loss": 0.0, "final_loss": 0.0}

    monkeypatch.setattr(toy_clip, "pretrain_toy_clip", pretrain)
    assert main(["pretrain-scorer", "--preset", "debug", "--data-root", str(tmp_path)]) == 0
    data = tmp_path / ("prepared" if prepared else "toyworld") / "debug"
    assert seen == [(data, tmp_path / "toy" / "debug" / "scorer")]
