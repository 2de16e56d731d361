"""The scorers' checks: each scorer of the eval config (CLIP, then the Table-1 preference metrics) as its own
`available()` judges it, plus its files: safetensors framing and, for the DiffSynth-Studio/ImageMetrics folders,
the key names that say which metric's file it is (a wrong or swapped model.safetensors is named), and a transformers
model directory (PickScore) against the shapes its config.json implies. Pickled checkpoints (open_clip .pt) are
only found here; `--load` opens them."""

from __future__ import annotations

import json
from pathlib import Path

from i2l.config import Config
from i2l.doctor import Component
from i2l.doctor.backbone import check_model_dir, human
from i2l.doctor.weights import HeaderError, read_header, read_weights

KINDS = {"clip": "open_clip", "aesthetic": "diffsynth-aesthetic", "pickscore": "diffsynth-pickscore",
         "imagereward": "diffsynth-imagereward", "hpsv2": "diffsynth-hpsv2", "hpsv3": "diffsynth-hpsv3"}
# keys each ImageMetrics model.safetensors holds (its published naming: see i2l/replicas/sources.py)
MARKERS = {"aesthetic": ("layers.0.weight", "visual_projection.weight"),
           "pickscore": ("text_model.embeddings.token_embedding.weight", "visual_projection.weight"),
           "imagereward": ("blip.visual_encoder.cls_token", "mlp.layers.0.weight"),
           "hpsv2": ("visual.proj", "text_projection"),
           "hpsv3": ("rm_head.0.weight", "lm_head.weight")}


def _check_files(comp: Component, path: Path) -> None:
    if path.is_file():
        if path.suffix == ".safetensors":
            try:
                comp.facts.append(f"{len(read_header(path))} tensors")
            except HeaderError as e:
                comp.problem(f"{path.parent}/{e}", "re-copy this file from the published checkpoint")
        else:
            comp.facts.append(f"{human(path.stat().st_size)}B pickle (read with weights_only by --load and at use)")
        return
    conf = path / "config.json"
    archs = json.loads(conf.read_text()).get("architectures") if conf.is_file() else None
    if archs:  # a transformers model directory (PickScore_v1: CLIPModel)
        w = check_model_dir(comp, path, ".", "transformers", archs[0])
        if w is not None:
            comp.facts.append(f"{archs[0]}, {human(w.params)} params, {w.dtypes}")
    elif any(path.glob("*.safetensors")):
        comp.extend(read_weights(path, path).problems)


def _check_metric_folder(comp: Component, name: str, folder: Path) -> None:
    """model.safetensors of a DiffSynth-Studio/ImageMetrics folder: whole, and holding this metric's keys."""
    from i2l.eval.metrics.plugins import WEIGHTS

    path = folder / WEIGHTS
    try:
        header = read_header(path)
    except HeaderError as e:
        comp.problem(f"{folder}/{e}", "re-copy this file from the published DiffSynth-Studio/ImageMetrics folder")
        return
    # DiffSynth's converters strip wrapper prefixes (module., model., ...): a marker may sit under one
    missing = [k for k in MARKERS[name] if not any(h == k or h.endswith("." + k) for h in header)]
    if missing:
        comp.problem(f"{path} is not the {name} file of DiffSynth-Studio/ImageMetrics (no {', '.join(missing)})",
                     f"set scorer.{name}_path to the ImageMetrics {name} folder")
        return
    params = sum(_numel(shape) for _, shape, _ in header.values())
    comp.facts.append(f"{len(header)} tensors, {human(params)} params"
                      + (", config.json" if (folder / "config.json").is_file() else ", DiffSynth's full-size config"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_scorers(cfg: Config) -> list[Component]:
    from i2l.eval.metrics import build_scorers

    comps = []
    for sc in build_scorers(cfg):
        path = str(sc.path) if sc.path else ""
        comp = Component(f"scorer.{sc.name}", path, kind=KINDS.get(sc.name, sc.name))
        comps.append(comp)
        if not path:
            comp.unset = True
            comp.facts.append(f"not configured (set scorer.{sc.name}_path to a local "
                              f"{getattr(sc, 'layout', 'checkpoint')} to score {', '.join(sc.metrics)}); its "
                              f"metrics are recorded as skipped")
            continue
        ok, reason = sc.available()
        if not ok:
            comp.problem(reason)
            continue
        if sc.name in MARKERS:
            _check_metric_folder(comp, sc.name, Path(path))
        else:
            _check_files(comp, Path(path))
    return comps
