"""The scorers' checks: each scorer of the eval config (CLIP, then the optional plugins) as its own `available()`
judges it, plus its files' headers: safetensors framing, and a transformers model directory (PickScore) against the
shapes its config.json implies. Pickled checkpoints (open_clip .pt) are only found here; `--load` opens them."""

from __future__ import annotations

import json
from pathlib import Path

from i2l.config import Config
from i2l.doctor import Component
from i2l.doctor.backbone import check_model_dir, human
from i2l.doctor.weights import HeaderError, read_header, read_weights

KINDS = {"clip": "open_clip", "aesthetic": "laion-aesthetic-mlp", "pickscore": "transformers-clip",
         "imagereward": "imagereward", "hpsv2": "open_clip-hpsv2", "hpsv3": "hpsv3"}


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


def check_scorers(cfg: Config) -> list[Component]:
    from i2l.eval.metrics import build_scorers

    comps = []
    for sc in build_scorers(cfg):
        path = str(sc.path) if sc.path else ""
        comp = Component(f"scorer.{sc.name}", path, kind=KINDS.get(sc.name, sc.name))
        comps.append(comp)
        if not path:
            comp.unset = True
            comp.facts.append(f"not configured (set scorer.{sc.name}_path to a local checkpoint to score "
                              f"{', '.join(sc.metrics)}); its metrics are recorded as skipped")
            continue
        ok, reason = sc.available()
        if not ok:
            comp.problem(reason)
            continue
        _check_files(comp, Path(path))
    return comps
