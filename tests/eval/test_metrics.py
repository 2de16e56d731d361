"""Scorer API: long score rows, skipped scorers with reasons, leakage, and the scorer actors' resources (the
plugins on their replicas: test_diffsynth_metrics.py)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from i2l.config import get_config
from i2l.eval.metrics import METRICS, ScoreBatch, Scorer, build_scorers, score_samples
from i2l.eval.metrics.leakage import leakage_scores, semantic_leakage


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
    assert "scorer.imagereward_path" in reason["imagereward"] and "scorer.hpsv3_path" in reason["hpsv3"]
    # hpsv2 is configured, but with an empty folder: the reason names the file it lacks
    assert "scorer.hpsv2_path" in reason["hpsv2"] and "lacks model.safetensors" in reason["hpsv2"]


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


def test_scorer_actors_ask_for_gpus_only_on_cuda(tmp_path, ray_session):
    """One model per actor: on cuda each scorer actor asks scorer.gpus_per_actor GPUs (a CPU-only cluster is
    refused with what to set), on the CPU one CPU."""
    from i2l.eval.metrics.actors import ScoreJob, actor_gpus, score_on_actors

    cfg = get_config("debug", ["scorer.workers=1", "scorer.gpus_per_actor=0.5", "scorer.device=cpu"])
    assert actor_gpus(cfg) == 0.0
    cfg.scorer.device = "cuda:0"
    assert actor_gpus(cfg) == 0.5
    cfg.scorer.device = "auto"
    assert actor_gpus(cfg) == (0.5 if ray_session.cluster_resources().get("GPU", 0) else 0.0)
    cfg.scorer.device, cfg.data_root = "cuda", str(tmp_path)
    (tmp_path / "toy" / "debug" / "scorer").mkdir(parents=True)
    (tmp_path / "toy" / "debug" / "scorer" / "scorer.json").write_text(json.dumps({"model": cfg.scorer.clip_model}))
    job = ScoreJob([str(tmp_path / "x.png")], ["a"], ["s"], [], [])
    if not ray_session.cluster_resources().get("GPU", 0):
        with pytest.raises(ValueError, match="GPU.*scorer.device=cpu"):
            score_on_actors(cfg, build_scorers(cfg)[:1], [job], progress=False)
