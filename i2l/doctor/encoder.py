"""The encoder's checks: what its config.json says (FixRes SigLIP or NaFlex SigLIP2, whole or vision-only), the
resolution and patch count it sees against the preset's, and its vision tower's weights against the shapes the
config implies (from safetensors headers only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from i2l.config import Config
from i2l.doctor import Component
from i2l.doctor.backbone import human
from i2l.doctor.weights import compare_shapes, expected_shapes, read_weights


def check_encoder(cfg: Config) -> Component:
    from i2l.model.encoder import read_encoder_checkpoint

    ec = cfg.encoder
    comp = Component("encoder", ec.path, kind=ec.kind)
    toy = ec.kind == "toy"
    where = "run `i2l pretrain-encoder` for this preset" if toy else \
        "set encoder.path (or I2L_SIGLIP2_DIR) to a local SigLIP / SigLIP2 checkpoint directory"
    if not ec.path or not Path(ec.path).is_dir():
        comp.problem("encoder.path is empty" if not ec.path else f"{ec.path} is not a directory", where)
        return comp
    root = Path(ec.path)
    try:
        ck = read_encoder_checkpoint(root)
    except (OSError, ValueError) as e:  # FileNotFoundError and JSON errors included
        comp.problem(str(e))
        return comp
    comp.kind = "toy-siglip" if toy else "siglip2-naflex" if ck.naflex else "siglip-fixres"
    comp.facts.append(f"{ck.class_name} (config.json model_type {ck.model_type}"
                      f"{', image+text checkpoint: vision tower only' if ck.whole else ''})")
    side = ck.image_size
    meta = root / "encoder.json"  # the toy encoder records the side it was trained at; the loader uses it
    if meta.is_file():
        side = json.loads(meta.read_text()).get("image_size", side)
    p = ck.patch_size
    budget = f", patch budget {ck.budget}" if ck.naflex else ""
    comp.facts.append(f"{side} px / patch {p} = {(side // p) ** 2} tokens of width {ck.vision.hidden_size}{budget}")
    if ec.image_size != side:
        src = "encoder.json" if meta.is_file() else "preprocessor_config.json" if ck.naflex and \
            (root / "preprocessor_config.json").is_file() else "config.json"
        comp.problem(f"{root / src} says the encoder sees {side} px ({(side // p) ** 2} tokens), but the preset "
                     f"expects encoder.image_size={ec.image_size} ({(ec.image_size // p) ** 2} tokens)",
                     f"set encoder.image_size={side} (the checkpoint decides what the loader uses), or point "
                     f"encoder.path at a checkpoint made for {ec.image_size} px")
    w = read_weights(root, root)
    comp.extend(w.problems)
    try:
        expected, tied = expected_shapes(lambda: ck.model_class()(ck.vision))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        comp.problem(f"cannot build {ck.class_name} from {root / 'config.json'} ({type(e).__name__}: {e})",
                     "use a checkpoint of a layout transformers reads")
        return comp
    # transformers saves a vision model's keys under its base_model_prefix, as the whole model holds them
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in w.tensors) else ""
    comp.extend(compare_shapes(expected, tied, w, "config.json", prefix))
    vision = sum(math.prod(t.shape) for k, t in w.tensors.items() if k.removeprefix(prefix) in expected)
    comp.facts.append(f"vision tower {human(vision)} params, {w.dtypes}")
    return comp

