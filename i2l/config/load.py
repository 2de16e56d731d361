"""Building a Config: a preset plus `section.field=value` overrides (`get_config`), or a dict saved with
`Config.to_dict` (`config_from_dict`). Both refuse a field that Config does not have."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from i2l.config.presets import PRESETS
from i2l.config.sections import Config


def _coerce(value: str, current: Any, hint: str = "") -> Any:
    """Parse an override string into the type of the field it replaces (`hint`: the field's annotation, which
    types the items of a tuple whose default is empty)."""
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(current, tuple):
        items = [v.strip() for v in value.split(",") if v.strip()]
        inner = hint.partition("[")[2]  # "tuple[int, ...]" -> "int, ...]"
        example = current[0] if current else 0 if inner.startswith("int") else 0.0 if inner.startswith("float") \
            else ""
        return tuple(_coerce(v, example) for v in items)
    return value


def get_config(preset: str = "toy", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a preset and apply `section.field=value` overrides, e.g. ["train.steps=100"]."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides or []]
    touched = []
    for key, value in items:
        target, name = cfg, key
        if "." in key:
            section, name = key.split(".", 1)
            if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
                raise ValueError(f"unknown config section {section!r} in override {key!r}")
            target = getattr(cfg, section)
        if not hasattr(target, name):
            fields = ", ".join(f.name for f in dataclasses.fields(target))
            raise ValueError(f"unknown config field {key!r}; fields here: {fields}")
        current = getattr(target, name)
        if isinstance(value, str):
            hint = str({f.name: f.type for f in dataclasses.fields(target)}[name])
            try:
                value = _coerce(value, current, hint)
            except ValueError as e:
                raise ValueError(f"override {key}={value}: {e}") from None
        setattr(target, name, value)
        touched.append(target)
    for target in {id(t): t for t in touched}.values():  # validate once all overrides are in: order-free
        if hasattr(target, "__post_init__"):
            target.__post_init__()
    keys = {k for k, _ in items}
    if "eval.lora_lr" in keys and "eval.lora_lr_by_budget" not in keys and cfg.eval.lora_lr_by_budget:
        # the table sets every budget's rate: the override would change nothing that the user meant it to
        raise ValueError(f"eval.lora_lr is overridden, but preset {preset!r} gives the per-style LoRAs a rate per "
                         f"budget (eval.lora_lr_by_budget={','.join(cfg.eval.lora_lr_by_budget)}), which wins: also "
                         "set eval.lora_lr_by_budget= (empty) for one rate at every budget, or set that table instead")
    return cfg


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.field=value")
    key, value = override.split("=", 1)
    return key.strip(), value.strip()


def config_from_dict(d: dict[str, Any], source: str = "the saved config") -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. a checkpoint's state.json; `source` names it in errors).

    A field the saved config lacks (added since) takes its default. A key that Config has no field for (renamed
    or removed since) is refused: dropping it would run with the default in its place, unnoticed."""
    top = {f.name: f for f in dataclasses.fields(Config)}
    unknown = _unknown(d, top, "")
    kwargs = {}
    for name, f in top.items():
        v = d.get(name)
        if v is None:
            continue
        if f.default_factory is dataclasses.MISSING:  # a plain field: name, data_root
            kwargs[name] = v
            continue
        section = f.default_factory  # the section's dataclass
        if not isinstance(v, dict):
            raise TypeError(f"{source}: config section {name!r} must be a mapping of its fields, not {v!r}")
        unknown += _unknown(v, {sf.name for sf in dataclasses.fields(section)}, f"{name}.")
        kwargs[name] = {k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()}
    if unknown:
        raise ValueError(f"{source} has config key(s) that this version of i2l does not know: {', '.join(unknown)}. "
                         "They were renamed or removed since it was saved: rename each to its current name in "
                         f"{source}, or delete it to take the current default")
    for name, v in kwargs.items():
        if isinstance(v, dict):
            kwargs[name] = top[name].default_factory(**v)
    return Config(**kwargs)


def _unknown(saved: dict[str, Any], fields, prefix: str) -> list[str]:
    """The keys of `saved` that are not `fields`, as `section.key`, each with the closest field when one is near."""
    named = []
    for key in (k for k in saved if k not in fields):
        near = difflib.get_close_matches(key, list(fields), n=1)
        named.append(f"{prefix}{key}" + (f" (renamed to {prefix}{near[0]}?)" if near else ""))
    return named
