import pytest

from i2l.config import PRESETS, config_from_dict, get_config


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_and_round_trip(preset):
    cfg = get_config(preset)
    assert cfg.name == preset
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_overrides_are_typed_and_validated():
    cfg = get_config("debug", ["train.steps=7", "train.lr=0.5", "train.use_gpu=true", "eval.optimize_budgets=1,2"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.train.use_gpu is True
    assert cfg.eval.optimize_budgets == (1, 2)
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("debug", ["train.stepz=1"])
    with pytest.raises(ValueError, match="unknown config section"):
        get_config("debug", ["nope.steps=1"])
    with pytest.raises(ValueError, match="val_fraction"):
        get_config("debug", ["data.val_fraction=2"])
    with pytest.raises(ValueError, match="global batch"):
        get_config("debug", ["train.num_workers=16"])  # 8 targets cannot feed 16 data-parallel workers
    assert get_config("debug", ["train.num_workers=16", "train.batch_size=64"]).train.num_workers == 16  # any order
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
