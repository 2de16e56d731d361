"""The backbone's checks: a diffusers pipeline directory read through its model_index.json (`_class_name`,
`is_distilled`, the components it lists), each component's config.json against its safetensors headers, the
preset's LoRA target layers among the transformer's weights, the text encoder's width; a HiDream-O1-Image folder
(config.json, shards, processor files); or the toy backbone's directory. Nothing but configs and headers is read."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from i2l.config import BackboneConfig, Config
from i2l.config.presets import HIDREAM_O1_TARGETS
from i2l.doctor import Component
from i2l.doctor.weights import Weights, compare_shapes, expected_shapes, read_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _builder(library: str, class_name: str, d: Path):
    """A zero-argument function that builds the component's class from its config.json (on the caller's device)."""
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ValueError(f"{library} has no class {class_name}")
    if library == "diffusers":
        config = cls.load_config(d)
        return lambda: cls.from_config(config)
    config = cls.config_class.from_pretrained(d, local_files_only=True)
    return lambda: cls(config)


def check_model_dir(comp: Component, root: Path, sub: str, library: str, class_name: str) -> Weights | None:
    """One model component (`root/sub`): its config.json, its weights' files, and their shapes against what the
    config implies for `class_name`. Returns its weights (None if the directory or config is missing)."""
    d = root / sub
    if not (d / "config.json").is_file():
        what = f"{sub}/ is missing" if not d.is_dir() else f"{sub}/config.json is missing"
        comp.problem(f"{what} ({root.name}/model_index.json lists {class_name})" if sub != "." else what,
                     f"copy the published checkpoint's {sub}/ directory whole")
        return None
    w = read_weights(d, root)
    comp.extend(w.problems)
    try:
        expected, tied = expected_shapes(_builder(library, class_name, d))
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RuntimeError) as e:  # say so, never guess
        comp.problem(f"cannot build {class_name} from {sub}/config.json ({type(e).__name__}: {e})",
                     f"use a checkpoint of the layout {library} reads, or update {library}")
        return w
    comp.extend(compare_shapes(expected, tied, w, f"{sub}/config.json", _stored_prefix(library, class_name,
                                                                                        expected, w)))
    return w


def _stored_prefix(library: str, class_name: str, expected: dict, w: Weights) -> str:
    """A base model saved under its head model's names (Z-Image's text_encoder: a Qwen3Model whose weights carry
    Qwen3ForCausalLM's `model.` prefix), which transformers loads by stripping `base_model_prefix`."""
    base = getattr(getattr(importlib.import_module(library), class_name, None), "base_model_prefix", "")
    if library != "transformers" or not base or any(k in w.tensors for k in expected):
        return ""
    return f"{base}." if any(k.startswith(f"{base}.") for k in w.tensors) else ""


def check_targets(comp: Component, targets: tuple[str, ...], w: Weights, where: str) -> None:
    """The preset's LoRA targets (module-name suffixes) among the transformer's linear weights."""
    layers = {k.removesuffix(".weight") for k, t in w.tensors.items() if k.endswith(".weight") and len(t.shape) == 2}
    hits = {s: [n for n in layers if n == s or n.endswith("." + s)] for s in targets}
    absent = [s for s, found in hits.items() if not found]
    if absent:
        comp.problem(f"LoRA target(s) {', '.join(absent)} match no linear weight of {where}",
                     "set backbone.targets to module names of this transformer (diffusers' spelling)")
    comp.facts.append(f"{len({n for found in hits.values() for n in found})} adapted linear layers")


def _text_width(comp: Component, bc: BackboneConfig, root: Path, index: dict) -> None:
    """The text encoder's hidden states must fit the transformer's text input width."""
    try:
        tr = json.loads((root / "transformer" / "config.json").read_text())
        te = json.loads((root / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return  # a missing config is reported by its component check
    te = te.get("text_config", te)
    if bc.kind == "flux2":
        from i2l.backbones.flux2 import QWEN3_LAYERS

        layers = tuple(bc.text_encoder_layers) or QWEN3_LAYERS
        width, need = len(layers) * te.get("hidden_size", 0), tr.get("joint_attention_dim")
        if max(layers) > te.get("num_hidden_layers", 0):
            comp.problem(f"backbone.text_encoder_layers {layers} exceed text_encoder/config.json's "
                         f"{te.get('num_hidden_layers')} layers", "set backbone.text_encoder_layers to layers it has")
        elif width != need:
            comp.problem(f"{len(layers)} stacked text_encoder layers x hidden {te.get('hidden_size')} = {width}, but "
                         f"transformer/config.json's joint_attention_dim is {need}",
                         "set backbone.text_encoder_layers so that they stack to that width")
    elif bc.kind == "zimage" and te.get("hidden_size") != tr.get("cap_feat_dim"):
        comp.problem(f"text_encoder/config.json hidden_size {te.get('hidden_size')} != transformer/config.json "
                     f"cap_feat_dim {tr.get('cap_feat_dim')}", "use the text encoder published with this transformer")


def _check_part(comp: Component, root: Path, name: str, spec) -> Weights | None:
    if not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
        comp.facts.append(f"no {name}")
        return None
    library, class_name = spec
    if name == "scheduler" or "scheduler" in class_name.lower():
        if not (root / name / "scheduler_config.json").is_file():
            comp.problem(f"{name}/scheduler_config.json is missing", f"copy the published checkpoint's {name}/")
        return None
    if name.startswith("tokenizer"):
        if not any((root / name / f).is_file() for f in TOKENIZER_FILES):
            comp.problem(f"{name}/ holds no tokenizer files", f"copy the published checkpoint's {name}/")
        return None
    if library not in ("diffusers", "transformers"):
        comp.problem(f"model_index.json: {name} is a {library}.{class_name}", "only diffusers and transformers "
                     "components are read (never remote code): use the published pipeline directory")
        return None
    w = check_model_dir(comp, root, name, library, class_name)
    if w is not None:
        comp.facts.append(f"{name}: {class_name}, {human(w.params)} params, {w.dtypes}")
    return w


def check_pipeline(comp: Component, bc: BackboneConfig, root: Path, distilled_is_problem: bool) -> None:
    from i2l.backbones.diffusers_base import read_model_index
    from i2l.backbones.registry import backbone_class

    cls = backbone_class(bc.kind)
    try:
        index = read_model_index(root)
        cls.check_index(root, index)
    except (FileNotFoundError, ValueError) as e:
        comp.problem(str(e))
        return
    why = cls.distillation(root, index)
    comp.kind = f"{bc.kind} {'distilled' if why else 'base'}" if "is_distilled" in index else bc.kind
    comp.facts.append(f"{index['_class_name']}" + (" (step-distilled: samples without CFG)" if why else ""))
    if why and distilled_is_problem:
        comp.problem(f"not for training: {why[0]}", why[1], fatal=False)
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    if "transformer" not in parts:
        comp.problem("model_index.json lists no transformer", "use the published pipeline directory")
    weights = {name: _check_part(comp, root, name, spec) for name, spec in parts.items()}
    if weights.get("transformer") is not None:
        check_targets(comp, tuple(bc.targets) or cls.default_targets, weights["transformer"], "transformer/")
        tr = json.loads((root / "transformer" / "config.json").read_text())
        if tr.get("guidance_embeds"):
            comp.problem("transformer/config.json has guidance_embeds: true (FLUX.2-dev)",
                         "the flux2 backbone reads FLUX.2-klein: point backbone.path at FLUX.2-klein-base-4B")
    if weights.get("text_encoder") is not None:
        _text_width(comp, bc, root, index)


def check_hidream_o1(comp: Component, bc: BackboneConfig, root: Path) -> None:
    """A HiDream-O1-Image directory as published (no model_index.json: one transformers-style folder that
    DiffSynth reads): config.json, the model-*.safetensors shards against the shapes DiffSynth's HiDreamO1ImageModel
    has at the config's sizes, the LoRA targets, and the processor files its pipeline loads."""
    from i2l.backbones.hidream_o1 import PROCESSOR_FILES, build_transformer, model_files

    if not (root / "config.json").is_file():
        comp.problem(f"config.json is missing in {root}", "copy the published HiDream-O1-Image directory whole")
        return
    try:
        model_files(root)
    except FileNotFoundError as e:
        comp.problem(str(e), "copy the published model-0000k-of-0000N.safetensors files")
        return
    w = read_weights(root, root)
    comp.extend(w.problems)
    try:
        arch = json.loads((root / "config.json").read_text())
        expected, tied = expected_shapes(lambda: build_transformer(arch))
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RuntimeError) as e:  # say so, never guess
        comp.problem(f"cannot build DiffSynth's HiDreamO1ImageModel from config.json ({type(e).__name__}: {e})",
                     "use the published HiDream-O1-Image directory, or update diffsynth")
        return
    comp.extend(compare_shapes(expected, tied, w, "config.json", ""))
    comp.facts.append(f"HiDreamO1ImageModel (DiffSynth), {human(w.params)} params, {w.dtypes}")
    check_targets(comp, tuple(bc.targets) or HIDREAM_O1_TARGETS, w, "the model")
    for f in PROCESSOR_FILES:
        if not (root / f).is_file():
            comp.problem(f"{f} is missing in {root} (the pipeline's AutoProcessor reads it)",
                         "copy the published processor and tokenizer files")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        comp.problem(f"{root} holds no tokenizer files", "copy the published tokenizer files")


def check_toy(comp: Component, bc: BackboneConfig, root: Path) -> None:
    if not (root / "backbone.json").is_file():
        comp.problem(f"no toy backbone at {root} (backbone.json missing)",
                     "run `i2l pretrain-backbone` for this preset (or `make run`)")
        return
    comp.facts.append("toy Flux2 in pixel space")
    w = check_model_dir(comp, root, "transformer", "diffusers", "Flux2Transformer2DModel")
    if w is not None:
        comp.facts.append(f"transformer: {human(w.params)} params, {w.dtypes}")
        check_targets(comp, tuple(bc.targets), w, "transformer/")
    te = root / "text_encoder"
    if te.is_dir():
        comp.extend(read_weights(te, root).problems)
    else:
        comp.problem("text_encoder/ is missing", "rerun `i2l pretrain-backbone` for this preset")


def check_backbone(cfg: Config, distilled_is_problem: bool = True) -> Component:
    from i2l.backbones.registry import backbone_class

    bc = cfg.backbone
    comp = Component("backbone", bc.path, kind=bc.kind)
    env = getattr(backbone_class(bc.kind), "path_env", "") if bc.kind != "toy" else ""
    if not bc.path:
        comp.problem("backbone.path is empty", f"set backbone.path{f' (or {env})' if env else ''} to a local "
                     "diffusers pipeline directory")
        return comp
    root = Path(bc.path)
    if not root.is_dir():
        fix = "run `i2l pretrain-backbone` for this preset" if bc.kind == "toy" else \
            f"set backbone.path{f' (or {env})' if env else ''} to a local diffusers pipeline directory"
        comp.problem(f"{root} is not a directory", fix)
        return comp
    if bc.kind == "toy":
        check_toy(comp, bc, root)
    elif bc.kind == "hidream_o1":
        check_hidream_o1(comp, bc, root)
    else:
        check_pipeline(comp, bc, root, distilled_is_problem)
    return comp
