from pathlib import Path

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
    for bad in ("train.ckpt_every=0", "train.steps=0"):
        with pytest.raises(ValueError, match=r"train\.steps \(\d+\) and train\.ckpt_every \(\d+\) must be >= 1"):
            get_config("debug", [bad])
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


# ----- saved configs load strictly ---------------------------------------------------------------------------

def test_a_saved_config_with_an_unknown_key_is_refused_naming_it():
    saved = get_config("debug").to_dict()
    saved["eval"]["old_knob"] = 3
    saved["extras"] = {}
    with pytest.raises(ValueError, match=r"my/state\.json has config key\(s\).*: extras, eval\.old_knob\. .*rename"):
        config_from_dict(saved, "my/state.json")


def test_a_renamed_key_is_refused_with_its_new_name_and_a_missing_one_takes_its_default():
    saved = get_config("debug", ["train.targets_per_lora=2"]).to_dict()
    saved["train"]["targets_per_style"] = saved["train"].pop("targets_per_lora")  # as an older version named it
    with pytest.raises(ValueError, match=r"train\.targets_per_style \(renamed to train\.targets_per_lora\?\)"):
        config_from_dict(saved)
    del saved["train"]["targets_per_style"]  # a field the saved config never had (added since): the default
    assert config_from_dict(saved).train.targets_per_lora == get_config("debug").train.targets_per_lora
    saved["train"] = 7
    with pytest.raises(TypeError, match="config section 'train' must be a mapping"):
        config_from_dict(saved)


# ----- paths resolved once, at the entry points --------------------------------------------------------------

def test_a_resolved_config_has_every_toy_path_under_its_data_root(tmp_path):
    from i2l.layout import default_places, paths_for, resolve_paths

    cfg = get_config("debug")
    cfg.data_root = str(tmp_path)
    got = resolve_paths(cfg)
    p = paths_for(got)
    assert (got.backbone.path, got.encoder.path, got.scorer.clip_checkpoint) == (
        str(p.backbone_dir), str(p.encoder_dir), str(p.scorer_dir))
    assert all(Path(v).is_relative_to(tmp_path / "toy" / "debug") for v in
               (got.backbone.path, got.encoder.path, got.scorer.clip_checkpoint))
    assert set(default_places(got)) == {"backbone.path", "encoder.path", "scorer.clip_checkpoint"}
    assert (cfg.backbone.path, cfg.encoder.path, cfg.scorer.clip_checkpoint) == ("", "", "")  # a copy: cfg as it was
    assert resolve_paths(got).to_dict() == got.to_dict()  # once resolved, resolving again changes nothing
    mine = get_config("debug", [f"encoder.path={tmp_path / 'mine'}"])
    assert resolve_paths(mine).encoder.path == str(tmp_path / "mine")  # a path the user set is kept


def test_real_presets_resolve_only_the_scorer(monkeypatch):
    from i2l.layout import resolve_paths

    monkeypatch.delenv("I2L_KLEIN4B_DIR", raising=False)
    monkeypatch.delenv("I2L_SIGLIP2_DIR", raising=False)
    monkeypatch.delenv("I2L_CLIP_CKPT", raising=False)
    got = resolve_paths(get_config("klein4b"))
    assert (got.backbone.path, got.encoder.path) == ("", "")  # real checkpoints must be named, never guessed
    assert got.scorer.clip_checkpoint == str(Path("data") / "toy" / "klein4b" / "scorer")


def test_load_backbone_reads_a_resolved_config_and_leaves_it_unchanged(tmp_path):
    from i2l.backbones import load_backbone
    from i2l.layout import resolve_paths
    from i2l.toy.backbone import new_toy_backbone

    cfg = get_config("debug")
    cfg.data_root = str(tmp_path)
    with pytest.raises(ValueError, match=r"backbone\.path is empty: .*resolve_paths"):
        load_backbone(cfg)  # never resolved: refused, not filled in
    assert cfg.backbone.path == ""
    cfg = resolve_paths(cfg)
    new_toy_backbone(cfg.backbone, ["<pad>", "<unk>", "one", "circle"]).freeze().save(cfg.backbone.path)
    before = cfg.to_dict()
    bb = load_backbone(cfg)
    assert bb.lora_targets() and cfg.to_dict() == before
