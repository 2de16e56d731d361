"""Where each stage reads and writes under the data root: the one place for the directory layout that the
flows and commands share (see data/README.md), and `resolve_paths`, which the entry points (CLI, flows,
checkpoint_config) call once to put the toy models' empty paths there. Only path arithmetic: nothing is created
or read."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

from i2l.config import Config

SCORER_FILE = "scorer.json"  # a scorer directory's record, written last: a finished toy scorer has one
REPORTS_ENV = "I2L_REPORTS_DIR"  # overrides the reports root (default: reports/ in the working directory)


@dataclass(frozen=True)
class Paths:
    """The layout for one data root and one preset."""

    root: Path  # the data root (cfg.data_root)
    preset: str  # cfg.name
    reports_root: Path = Path("reports")

    @property
    def toyworld_dir(self) -> Path:
        # Per preset: presets write toy worlds of different sizes, and a smaller one written over a larger
        # would leave the larger one's extra shards behind.
        return self.root / "toyworld" / self.preset

    @property
    def prepared_dir(self) -> Path:
        return self.root / "prepared" / self.preset

    @property
    def toy_dir(self) -> Path:
        """The toy world's own models (resolve_paths points empty config paths here)."""
        return self.root / "toy" / self.preset

    @property
    def backbone_dir(self) -> Path:
        return self.toy_dir / "backbone"

    @property
    def encoder_dir(self) -> Path:
        return self.toy_dir / "encoder"

    @property
    def scorer_dir(self) -> Path:
        return self.toy_dir / "scorer"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs" / self.preset

    @property
    def train_dir(self) -> Path:
        """The predictor's training run: checkpoints/step_XXXXXXX/."""
        return self.runs_dir / "train"

    @property
    def loras_dir(self) -> Path:
        """Mass-produced LoRAs (one safetensors file per style) and their catalog."""
        return self.runs_dir / "loras"

    @property
    def eval_dir(self) -> Path:
        """Evaluation: baselines, generated samples."""
        return self.runs_dir / "eval"

    @property
    def store_path(self) -> Path:
        return self.root / "results.duckdb"

    @property
    def val_manifest_path(self) -> Path:
        return self.prepared_dir / "val_manifest.jsonl"

    def report_dir(self, run_id: str) -> Path:
        return report_dir(run_id, self.reports_root)


def reports_root_dir(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $I2L_REPORTS_DIR, else reports/ in the working directory."""
    return Path(root or os.environ.get(REPORTS_ENV) or "reports")


def report_dir(run_id: str, root: str | os.PathLike | None = None) -> Path:
    """<reports root>/<run_id>/, the run id made safe as a directory name."""
    return reports_root_dir(root) / re.sub(r"[^A-Za-z0-9._@-]", "_", run_id)


def paths_for(cfg: Config, reports_root: str | os.PathLike | None = None) -> Paths:
    """The layout of `cfg` (its data root and preset); reports under `reports_root`, else $I2L_REPORTS_DIR,
    else reports/."""
    return Paths(Path(cfg.data_root), cfg.name, reports_root_dir(reports_root))


def default_places(cfg: Config) -> dict[str, Path]:
    """The config paths that default to a place under the data root, by `section.field`: the toy backbone and
    encoder (real ones must be named) and the scorer (empty = the toy scorer)."""
    p = Paths(Path(cfg.data_root), cfg.name)
    places = {"scorer.clip_checkpoint": p.scorer_dir}
    if cfg.backbone.kind == "toy":
        places["backbone.path"] = p.backbone_dir
    if cfg.encoder.kind == "toy":
        places["encoder.path"] = p.encoder_dir
    return places


def resolve_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose empty default places (see default_places) point under its data root. Called once
    where a config is made from a preset and a data root; library code only reads the paths."""
    out = copy.deepcopy(cfg)
    for key, place in default_places(out).items():
        section, name = key.split(".")
        if not getattr(getattr(out, section), name):
            setattr(getattr(out, section), name, str(place))
    return out


def require_paths(cfg: Config, *keys: str) -> None:
    """Refuse a config whose `keys` (default: all its default places) were never resolved."""
    places = default_places(cfg)
    for key in keys or tuple(places):
        section, name = key.split(".")
        if key in places and not getattr(getattr(cfg, section), name):
            raise ValueError(f"{key} is empty: this config's paths were never resolved. Build it with "
                             f"i2l.layout.resolve_paths(cfg) (the CLI, the flows and checkpoint_config do; the "
                             f"default is {places[key]}), or set {key} to a local path")
