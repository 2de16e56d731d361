"""Dataclass configs and named presets: `debug` (tests, seconds), `toy` (embedded default, minutes),
`klein4b` and `zimage` (real checkpoints from local directories). A preset plus a few overrides."""

from i2l.config.load import _split, config_from_dict, get_config  # noqa: F401  (_split: bench parses as we do)
from i2l.config.presets import FLUX2_TARGETS, PRESETS, ZIMAGE_TARGETS
from i2l.config.sections import (
    BackboneConfig,
    Config,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    PredictorConfig,
    ProduceConfig,
    ScorerConfig,
    ToyWorldConfig,
    TrainConfig,
)

__all__ = [
    "FLUX2_TARGETS", "PRESETS", "ZIMAGE_TARGETS", "BackboneConfig", "Config", "DataConfig", "EncoderConfig",
    "EvalConfig", "PredictorConfig", "ProduceConfig", "ScorerConfig", "ToyWorldConfig", "TrainConfig",
    "config_from_dict", "get_config",
]
