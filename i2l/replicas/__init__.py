"""Replicas of every published checkpoint the project names, in their published layout with tiny sizes: a
development tool for tests and for rehearsing `i2l doctor` / a whole run before downloading real weights.
`python -m i2l.replicas OUT_DIR [names...]` writes them; nothing in the library imports this package."""

from __future__ import annotations

from pathlib import Path

from i2l.replicas.backbones import (
    flux2_klein_4b,
    flux2_klein_base_4b,
    hidream_o1_image,
    z_image,
    z_image_turbo,
)
from i2l.replicas.encoders import siglip2_so400m_patch16_512, siglip2_so400m_patch16_naflex
from i2l.replicas.scorers import (
    clip_vit_h_14_laion2b,
    diffsynth_image_metrics,
    hpsv2_1,
    laion_aesthetic,
    pickscore_v1,
    register_open_clip_archs,
)
from i2l.replicas.sources import PUBLISHED, SIZE_KEYS, SOURCES

# published name (= directory name) -> writer(out_dir) -> out_dir
REPLICAS = {
    "FLUX.2-klein-base-4B": flux2_klein_base_4b,
    "FLUX.2-klein-4B": flux2_klein_4b,
    "Z-Image": z_image,
    "Z-Image-Turbo": z_image_turbo,
    "HiDream-O1-Image": hidream_o1_image,
    "siglip2-so400m-patch16-512": siglip2_so400m_patch16_512,
    "siglip2-so400m-patch16-naflex": siglip2_so400m_patch16_naflex,
    "CLIP-ViT-H-14-laion2B-s32B-b79K": clip_vit_h_14_laion2b,
    "PickScore_v1": pickscore_v1,
    "laion-aesthetic": laion_aesthetic,
    "HPSv2.1": hpsv2_1,
    "DiffSynth-Studio-ImageMetrics": diffsynth_image_metrics,
}


# Config overrides that run a real preset's code paths on its replicas in seconds: 32 px images of a 6-style toy
# world, a 1-block predictor, 2 training steps (tests/replicas/test_whole_path.py, infra/gpu_replica_path.py).
DEBUG_SIZES = {"toyworld.styles": 6, "toyworld.rows_per_shard": 64, "data.resolution": 32, "data.val_fraction": 0.34,
               "data.val_samples": 2, "data.rows_per_shard": 64, "data.row_group_rows": 16, "data.batch_size": 16,
               "data.concurrency": 1, "data.min_side": 16, "backbone.image_size": 32, "predictor.hidden": 32,
               "predictor.depth": 1, "predictor.heads": 2, "predictor.compress": 8, "train.steps": 2,
               "train.batch_size": 2, "train.ckpt_every": 2, "train.warmup": 1, "train.num_workers": 1}


def write_replica(name: str, root: str | Path) -> Path:
    """Write replica `name` to <root>/<name>; refuses an existing directory (no silent mixing of files)."""
    if name not in REPLICAS:
        raise KeyError(f"unknown replica {name!r}; known: {', '.join(REPLICAS)}")
    out = Path(root) / name
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or write the replicas elsewhere")
    out.mkdir(parents=True)
    return REPLICAS[name](out)


def write_replicas(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    return {name: write_replica(name, root) for name in (names or list(REPLICAS))}


__all__ = ["DEBUG_SIZES", "PUBLISHED", "REPLICAS", "SIZE_KEYS", "SOURCES", "register_open_clip_archs", "write_replica",
           "write_replicas"]
