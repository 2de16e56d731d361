"""A small, fully known fixture run in a results store (methods, styles, tiny PNGs, scores incl. a skipped
scorer, held-out losses with wall times, a training curve, benchmarks, a prepared-data summary)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from i2l.store import Store

PIPELINE_RUN = "fixture-pipeline"
PREPARE_RUN = "fixture-prepare"
TRAIN_RUN = "fixture-train"
EVAL_RUN = "fixture-eval"
STYLES = {
    "s000001": ("In the style of a red watercolour wash", (200, 40, 40)),
    "s000002": ("In the style of a green pixel mosaic", (40, 170, 60)),
    "s000003": ("In the style of a blue ink drawing", (40, 60, 200)),
}
PROMPTS = {"s000001": "a circle at the center", "s000002": "a star at the top left",
           "s000003": "a ring at the bottom"}
SEED = 7
# method: (clip_text, clip_style, leakage, held-out fm loss or None, wall seconds per style)
METHODS: dict[str, tuple[float, float, float, float | None, float]] = {
    "base": (30.0, 10.0, 2.0, 0.200, 0.0),
    "mean_lora": (29.0, 12.0, 2.0, 0.190, 0.0),
    "adapter": (27.0, 15.0, 4.0, 0.180, 0.02),
    "per_style@5": (29.0, 13.0, 2.5, 0.185, 0.35),
    "per_style@25": (28.0, 16.0, 3.0, 0.160, 1.75),
    "per_style@100": (26.0, 20.0, 3.5, 0.140, 7.0),
    "i2l_1ref": (29.0, 17.0, 2.5, 0.170, 0.010),
    "i2l_4ref": (29.0, 18.0, 2.5, 0.165, 0.012),
    "i2l_1ref_asym": (28.0, 19.0, 2.5, None, 0.010),
    "i2l_4ref_asym": (28.0, 21.0, 2.5, None, 0.012),
}
STYLE_OFFSETS = {"s000001": -1.0, "s000002": 0.0, "s000003": 1.0}  # per-style spread; means stay exact
SKIPPED_METRIC = "aesthetic"
SKIP_REASON = "scorer.aesthetic_path is not set"
QUARANTINE_BY_REASON = {"decode_error": 2, "too_small": 1}
BENCH_ROWS = [
    {"case": "batch1", "metric": "latency_ms", "value": 9.5, "unit": "ms"},
    {"case": "batch4", "metric": "latency_ms", "value": 21.0, "unit": "ms"},
]


def sample_id(method: str, style_id: str) -> str:
    return f"{EVAL_RUN}/{method}/{style_id}"


def _png(path: Path, color: tuple[int, int, int], pattern: int) -> None:
    # 32x32 image: the style's colour as background, a method-specific square in the middle.
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = color
    lo, hi = 8 + pattern % 6, 24 - pattern % 6
    img[lo:hi, lo:hi] = (255 - np.array(color)) // (1 + pattern % 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def write_prepared_dir(out_dir: Path) -> Path:
    """A prepared-data directory in the data pipeline's layout, with an extra manifest key and column."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = {"name": "train/part-00000.parquet", "split": "train", "rows": 72, "bytes": 60000,
             "sha256": "a" * 64}
    manifest = {
        "inputs": [{"file": "train-00000-of-00001.parquet", "rows": 99, "bytes": 123456, "fingerprint": "x"}],
        "shards": [shard, {**shard, "name": "val/part-00000.parquet", "split": "val", "rows": 24,
                           "bytes": 20000, "sha256": "b" * 64}],
        "counts": {"rows_in": 99, "rows_written": 96, "rows_quarantined": 3,
                   "by_reason": QUARANTINE_BY_REASON, "styles_train": 9, "styles_val": 3},
        "config": {"resolution": 32}, "timings": {"total_s": 1.5}, "future_key": [1, 2],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    pq.write_table(pa.table({
        "id": ["s000010_c01", "s000010_c02", "s000011_c00"],
        "source_file": ["train-00000-of-00001.parquet"] * 3,
        "row_index": [81, 82, 88], "reason": ["decode_error", "decode_error", "too_small"],
        "detail": ["truncated PNG", "not an image", "8x8"], "extra_col": [1, 2, 3],
    }), out_dir / "quarantine.parquet")
    return out_dir


def _score(sid: str, metric: str, value: float | None, scorer: str = "toy-clip") -> dict:
    if value is None:
        return {"sample_id": sid, "metric": metric, "value": None, "scorer": scorer, "scorer_version": "1",
                "status": "skipped", "reason": SKIP_REASON}
    return {"sample_id": sid, "metric": metric, "value": value, "scorer": scorer, "scorer_version": "1",
            "status": "ok", "reason": None}


def fill_fixture_store(store: Store, root: Path) -> dict:
    """Fill `store` with the fixture pipeline run; images go under `root` (use the store's directory so the
    report may open them). Returns the ids and expected values."""
    root = Path(root)
    store.start_run("pipeline", "debug", {"name": "debug"}, run_id=PIPELINE_RUN)
    with store.transaction():
        store.start_run("prepare", "debug", {}, run_id=PREPARE_RUN, parent_id=PIPELINE_RUN)
        dataset_id = store.record_dataset(write_prepared_dir(root / "prepared"), run_id=PREPARE_RUN)
        store.finish_run(PREPARE_RUN, "ok")
    with store.transaction():
        store.start_run("train", "debug", {"train": {"steps": 20}}, run_id=TRAIN_RUN, parent_id=PIPELINE_RUN)
        store.record_curve(TRAIN_RUN, [{"step": s, "loss": 0.3 * 0.95 ** s, "lr": 1e-3, "grad_norm": 1.0}
                                       for s in range(20)])
        ckpt = store.record_checkpoint(TRAIN_RUN, root / "ckpt" / "predictor.safetensors", 20, "toy",
                                       "c" * 64, {"params": 1000})
        store.finish_run(TRAIN_RUN, "ok")
    ref_paths = {}
    for style_id, (_, color) in STYLES.items():
        ref_paths[style_id] = [root / "refs" / style_id / f"ref{i}.png" for i in range(4)]
        for i, p in enumerate(ref_paths[style_id]):
            _png(p, color, 10 + i)
    store.record_styles([{"style_id": s, "split": "val", "description": d, "dataset_id": dataset_id,
                          "ref_paths": [str(p) for p in ref_paths[s]]} for s, (d, _) in STYLES.items()])
    with store.transaction():
        store.start_run("eval", "debug", {"eval": {"styles": 3}}, run_id=EVAL_RUN, parent_id=PIPELINE_RUN)
        loras, samples, scores, losses = [], [], [], []
        for j, (method, (ct, cs, leak, loss, wall)) in enumerate(METHODS.items()):
            store.record_method(EVAL_RUN, method, wall_s=wall)
            n_refs = 1 if "1ref" in method else 4
            for style_id, (_, color) in STYLES.items():
                off = STYLE_OFFSETS[style_id]
                lora_id = None if method == "base" else f"{method}:{style_id}"
                if lora_id:
                    loras.append({"lora_id": lora_id, "style_id": style_id, "method": method,
                                  "checkpoint_id": ckpt, "path": f"loras/{method}/{style_id}.safetensors",
                                  "sha256": "d" * 64, "rank": 2, "n_refs": n_refs,
                                  "norms": {"A": 1.0, "B": 0.1}})
                rel = Path("samples") / method / f"{style_id}.png"  # relative to the store's directory
                _png(root / rel, color, j)
                sid = sample_id(method, style_id)
                samples.append({"sample_id": sid, "run_id": EVAL_RUN, "method": method, "style_id": style_id,
                                "prompt": PROMPTS[style_id], "seed": SEED, "lora_id": lora_id,
                                "image_path": str(rel),
                                "settings": {"guidance": 2.0, "asym": method.endswith("_asym"),
                                             "refs": [str(p) for p in ref_paths[style_id][:n_refs]]}})
                scores += [_score(sid, "clip_text", ct + off), _score(sid, "clip_style", cs + off),
                           _score(sid, "leakage", leak), _score(sid, SKIPPED_METRIC, None, "laion-aesthetic")]
                if loss is not None:
                    steps = int(method.split("@")[1]) if "@" in method else 0
                    losses.append({"method": method, "style_id": style_id, "steps": steps, "wall_s": wall,
                                   "n_refs": n_refs if "i2l" in method else 0, "loss": loss})
        store.record_loras(loras)
        store.record_samples(samples)
        store.record_scores(scores)
        store.record_eval_loss(EVAL_RUN, losses)
        store.mark_stage_done("eval", EVAL_RUN, {"samples": len(samples)})
        store.finish_run(EVAL_RUN, "ok")
    store.record_benchmark("predictor_forward", BENCH_ROWS, device="cpu", run_id=PIPELINE_RUN)
    store.record_benchmark("prepare", [{"case": "2 workers", "rows_per_s": 950.0, "speedup": 1.8}],
                           device="cpu", run_id=PIPELINE_RUN)
    store.finish_run(PIPELINE_RUN, "ok")
    return {"pipeline_run": PIPELINE_RUN, "eval_run": EVAL_RUN, "train_run": TRAIN_RUN,
            "prepare_run": PREPARE_RUN, "dataset_id": dataset_id, "checkpoint_id": ckpt,
            "n_samples": len(samples), "methods": list(METHODS), "styles": list(STYLES)}


def make_fixture_store(tmp_dir: Path) -> tuple[Store, dict]:
    """A fresh store at `<tmp_dir>/results.duckdb` filled with the fixture run."""
    store = Store(Path(tmp_dir) / "results.duckdb")
    return store, fill_fixture_store(store, Path(tmp_dir))
