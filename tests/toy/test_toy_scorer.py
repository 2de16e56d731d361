"""The toy CLIP scorer: reader, loss, `i2l pretrain-scorer`, loading, and that its scores mean something on
held-out toy images (own prompt / style / references beat wrong ones; leakage flags borrowed content)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from i2l.config import ToyWorldConfig, get_config
from i2l.eval.metrics import ScoreBatch, build_scorers, score_samples
from i2l.eval.metrics.clip import ClipScorer, load_clip_scorer
from i2l.toy.scorer import (
    TOY_CLIP_NAME,
    data_hash,
    multi_positive_clip_loss,
    pair_accuracy,
    read_caption_rows,
    toy_clip_config,
)
from i2l.toy.world import generate_rows, write_toyworld


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toyworld")
    write_toyworld(ToyWorldConfig(styles=12, seed=0, rows_per_shard=40), d, progress=False)
    return d


def _write_prepared(root, rows_by_split):
    for split, rows in rows_by_split.items():
        (root / split).mkdir(parents=True)
        table = pa.table({
            "id": [r["id"] for r in rows], "style_id": [r["id"].split("_")[0] for r in rows],
            "content": [r["content"] for r in rows], "style": [r["style"] for r in rows],
            "image": pa.array([r["image"]["bytes"] for r in rows], pa.binary()), "split": [split] * len(rows)})
        pq.write_table(table, root / split / "part-00000.parquet")


def test_reader_accepts_raw_and_prepared_dirs_and_reads_only_train(toy_dir, tmp_path):
    raw = read_caption_rows(toy_dir)
    assert len(raw) == 12 * 8
    assert Image.open(io.BytesIO(raw[0]["image"])).size == (32, 32)
    assert read_caption_rows(toy_dir, "val") == []  # a raw dir has no held-out split
    assert len(read_caption_rows(toy_dir, max_rows=10)) == 10

    rows = [r for r, _ in generate_rows(ToyWorldConfig(styles=4, seed=3))]
    _write_prepared(tmp_path / "prep", {"train": rows[:24], "val": rows[24:]})
    train = read_caption_rows(tmp_path / "prep")
    assert [r["id"] for r in train] == [r["id"] for r in rows[:24]]  # the val styles are never trained on
    assert train[0]["image"] == rows[0]["image"]["bytes"]
    assert [r["id"] for r in read_caption_rows(tmp_path / "prep", "val")] == [r["id"] for r in rows[24:]]
    with pytest.raises(FileNotFoundError, match="i2l toyworld"):
        read_caption_rows(tmp_path / "empty")


def test_multi_positive_loss_is_clip_loss_without_duplicates_and_spares_them():
    import open_clip

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    ours = multi_positive_clip_loss(img, txt, torch.arange(6), scale)
    assert ours == pytest.approx(float(open_clip.ClipLoss()(img, txt, scale)), abs=1e-5)
    # two images share caption 0: a perfect fit reaches the floor (entropy of the targets), not a penalty
    e = torch.eye(2)
    loss = multi_positive_clip_loss(torch.stack([e[0], e[0], e[1]]), e, torch.tensor([0, 0, 1]), torch.tensor(100.0))
    assert float(loss) == pytest.approx(np.log(2) / 4, abs=1e-4)


def test_pretrain_scorer_cli_writes_a_loadable_open_clip_scorer(toy_dir, tmp_path, caplog):
    from i2l.cli import main

    out = tmp_path / "toy" / "debug" / "scorer"  # the default place under data root tmp_path (see below)
    assert main(["pretrain-scorer", "--preset", "debug", "--data", str(toy_dir), "--out", str(out)]) == 0
    assert "initialized randomly" not in caplog.text  # open_clip's warning: a random start is the point here
    assert {p.name for p in out.iterdir()} == {"model.safetensors", f"{TOY_CLIP_NAME}.json", "scorer.json"}
    info = json.loads((out / "scorer.json").read_text())
    assert info["name"] == TOY_CLIP_NAME and info["version"] and info["steps"] == 10
    assert info["data_hash"] == data_hash(read_caption_rows(toy_dir))
    assert json.loads((out / f"{TOY_CLIP_NAME}.json").read_text()) == toy_clip_config(32)
    assert info["final_loss"] < info["first_loss"]

    images = [Image.open(io.BytesIO(r["image"])) for r in read_caption_rows(toy_dir, max_rows=4)]
    clip = load_clip_scorer(out)
    emb = clip.encode_images(images)
    assert emb.shape == (4, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    # the same weights as a checkpoint *file* (how ViT-H-14 is given), safetensors or a weights_only pickle
    from safetensors.torch import load_file

    torch.save(load_file(str(out / "model.safetensors")), tmp_path / "ckpt.pt")
    for path in (out / "model.safetensors", tmp_path / "ckpt.pt"):
        assert torch.allclose(load_clip_scorer(path, TOY_CLIP_NAME).encode_images(images), emb, atol=1e-6)
    with pytest.raises(ValueError, match="clip_model"):
        load_clip_scorer(out / "model.safetensors")
    (tmp_path / "ckpt.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        load_clip_scorer(tmp_path / "ckpt.pkl", TOY_CLIP_NAME)

    # build_scorers finds the toy scorer where `i2l pretrain-scorer` writes it: <data_root>/toy/<preset>/scorer
    cfg = get_config("debug")
    cfg.data_root = str(tmp_path)
    clip_scorer = build_scorers(cfg)[0]
    assert isinstance(clip_scorer, ClipScorer) and clip_scorer.available() == (True, "")
    assert info["data_hash"][:10] in clip_scorer.version
    cfg.scorer.clip_model = "ViT-H-14"  # a real-checkpoint preset must not silently score with the toy model
    ok, reason = build_scorers(cfg)[0].available()
    assert not ok and "scorer.clip_checkpoint" in reason


def _heldout_batch(n_styles=60, seed=11):
    """Toy images from styles the scorer never saw, with the refs (other images of the same style)."""
    rows = [r for r, _ in generate_rows(ToyWorldConfig(styles=n_styles, seed=seed))]
    by_style = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    images, prompts, styles, refs, ref_prompts = [], [], [], [], []
    for group in by_style:
        for k in range(2):  # two targets per style, three references each
            target, others = group[k], [g for j, g in enumerate(group) if j != k][:3]
            images.append(Image.open(io.BytesIO(target["image"]["bytes"])))
            prompts.append(target["content"])
            styles.append(target["style"])
            refs.append([Image.open(io.BytesIO(o["image"]["bytes"])) for o in others])
            ref_prompts.append([o["content"] for o in others])
    return ScoreBatch(images, prompts, styles, refs, ref_prompts)


def _values(rows, metric):
    return np.array([r["value"] for r in sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["index"])],
                    dtype=float)


@pytest.mark.slow
def test_trained_toy_scorer_prefers_own_prompt_style_and_references(tmp_path, toy_preset_world):
    """~1.5 min on 2 cores: the toy preset's scorer (400 styles, 300 steps), scored on 60 unseen styles."""
    from i2l.toy.scorer import pretrain_toy_clip

    cfg = get_config("toy")
    cfg.data_root = str(tmp_path)
    pretrain_toy_clip(cfg, toy_preset_world, tmp_path / "toy" / "toy" / "scorer", progress=False)
    scorer = build_scorers(cfg)[:1]

    b = _heldout_batch()
    n = len(b)

    def shift(xs, k):  # pairs each image with another sample's text
        return xs[k:] + xs[:k]

    own = score_samples(scorer, b)
    assert all(r["status"] == "ok" for r in own)
    wrong_acc = {}
    for k in (1, 5, 17):  # other styles' samples: different prompt and style description
        wrong = score_samples(scorer, ScoreBatch(b.images, shift(b.prompts, 2 * k), shift(b.styles, 2 * k),
                                                 shift(b.references, 2 * k), b.reference_prompts))
        for metric in ("clip_text", "clip_style", "ref_style_sim"):
            valid = np.array([p != q for p, q in zip(b.prompts, shift(b.prompts, 2 * k))]) | (metric != "clip_text")
            better = (_values(own, metric) > _values(wrong, metric))[valid]
            wrong_acc.setdefault(metric, []).append(better.mean())
    acc = {m: float(np.mean(v)) for m, v in wrong_acc.items()}
    print("held-out pair accuracy", acc, "over", n, "images")
    assert acc["clip_text"] > 0.7, acc
    assert acc["clip_style"] > 0.85, acc
    # image<->image: all toy styles share one figure/ground polarity (light grounds, dark shapes), so images of
    # different styles look more alike than their texts read; measured 0.82 (chance 0.5)
    assert acc["ref_style_sim"] > 0.75, acc

    # leakage: an image scored against a wrong prompt whose references show *its* content leaks; its own does not
    honest = _values(own, "leakage")
    leaked = _values(score_samples(scorer, ScoreBatch(
        b.images, shift(b.prompts, 2), b.styles, b.references,
        [[p] for p in b.prompts])), "leakage")
    valid = np.array([p != q for p, q in zip(b.prompts, shift(b.prompts, 2))])
    assert (leaked[valid] > honest[valid]).mean() > 0.7
    assert np.nanmean(honest) < 0 < np.mean(leaked[valid])


@pytest.mark.slow
def test_pretrain_reads_the_prepared_train_split_and_checks_val(debug_run, tmp_path):
    """On `i2l prepare` output: trains on train/ only and records pair accuracy on the held-out val/ styles."""
    from i2l.toy.scorer import pretrain_toy_clip

    cfg = get_config("debug")
    info = pretrain_toy_clip(cfg, debug_run.prepared_dir, tmp_path / "scorer", progress=False)
    train_ids = {r["id"] for r in read_caption_rows(debug_run.prepared_dir, "train")}
    val_ids = {r["id"] for r in read_caption_rows(debug_run.prepared_dir, "val")}
    assert info["rows"] == len(train_ids) > 0 and val_ids and not train_ids & val_ids
    assert info["heldout"]["rows"] == len(val_ids)
    # the recorded accuracy is the saved scorer's on the val/ rows: measured again from the files, it is the same
    again = pair_accuracy(load_clip_scorer(tmp_path / "scorer"), read_caption_rows(debug_run.prepared_dir, "val"))
    assert info["heldout"] == pytest.approx({"rows": len(val_ids), **again}, abs=1e-6)
