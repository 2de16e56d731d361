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


def test_a_bad_override_value_names_its_field_and_empty_tuples_take_their_annotated_type():
    with pytest.raises(ValueError, match=r"override train\.steps=1e3: expected an integer"):
        get_config("debug", ["train.steps=1e3"])
    with pytest.raises(ValueError, match=r"override train\.use_gpu=maybe: expected a boolean"):
        get_config("debug", ["train.use_gpu=maybe"])
    with pytest.raises(ValueError, match=r"override eval\.optimize_budgets=5,x: expected an integer"):
        get_config("debug", ["eval.optimize_budgets=5,x"])
    # the default is () so there is no item to copy the type from: the annotation tuple[int, ...] says int
    assert get_config("klein4b", ["backbone.text_encoder_layers=9, 18"]).backbone.text_encoder_layers == (9, 18)
    assert get_config("debug", ["backbone.targets=to_q,to_k"]).backbone.targets == ("to_q", "to_k")
