"""`i2l doctor` on checkpoints in their published layouts (saved by transformers / diffusers, not by i2l): what it
reports from configs and safetensors headers, what `--load` runs, the problems it names with their file and fix,
and `train` refusing, before any Ray work, what the doctor finds wrong (a step-distilled backbone)."""

import json
import shutil

import pytest
from doctor.layouts import flux2_klein, siglip2_naflex, siglip_fixres, tiny_open_clip

from i2l.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    clip_name, clip_file = tiny_open_clip(root / "clip")
    return {"root": root, "fixres": siglip_fixres(root / "siglip2-so400m-patch16-512"),
            "naflex": siglip2_naflex(root / "siglip2-so400m-patch16-naflex"),
            "base": flux2_klein(root / "FLUX.2-klein-base-4B", distilled=False),
            "distilled": flux2_klein(root / "FLUX.2-klein-4B", distilled=True),
            "clip": (clip_name, clip_file)}


def _args(world, backbone, encoder, *more):
    name, clip = world["clip"]
    sets = {"backbone.path": backbone, "encoder.path": encoder, "encoder.image_size": 32,
            "backbone.dtype": "float32", "backbone.text_encoder_layers": "1,2,3", "backbone.max_sequence_length": 16,
            "scorer.clip_model": name, "scorer.clip_checkpoint": clip, "scorer.device": "cpu"}
    return ["--preset", "klein4b", "--data-root", str(world["root"] / "data"),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *more]


def _doctor(world, capsys, backbone, encoder, *more):
    rc = main(["doctor", "--json", *_args(world, backbone, encoder, *more)])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ok", "components"} and out["ok"] == (rc == 0)
    assert all(set(c) == {"name", "path", "status", "kind", "detail"} for c in out["components"])
    return rc, {c["name"]: c for c in out["components"]}


def test_published_layouts_are_reported_for_what_they_are(world, capsys):
    rc, got = _doctor(world, capsys, world["base"], world["fixres"])
    assert rc == 0, got
    assert [n for n in got][:3] == ["backbone", "encoder", "scorer.clip"]
    assert {got[n]["status"] for n in got if n.startswith("scorer.") and n != "scorer.clip"} == {"unset"}
    bb, enc = got["backbone"], got["encoder"]
    assert (bb["status"], bb["kind"], enc["status"], enc["kind"]) == ("ok", "flux2 base", "ok", "siglip-fixres")
    assert "Flux2KleinPipeline" in bb["detail"] and "16 adapted linear layers" in bb["detail"]  # 1·12 + 2·2
    assert "model_type siglip" in enc["detail"] and "32 px / patch 8 = 16 tokens of width 32" in enc["detail"]
    assert got["scorer.clip"]["status"] == "ok"

    rc, got = _doctor(world, capsys, world["distilled"], world["naflex"])
    assert rc == 1
    enc, bb = got["encoder"], got["backbone"]
    assert (enc["status"], enc["kind"]) == ("ok", "siglip2-naflex") and "patch budget 16" in enc["detail"]
    assert (bb["status"], bb["kind"]) == ("problem", "flux2 distilled")
    assert "is_distilled: true" in bb["detail"] and "for training" in bb["detail"]
    assert "FLUX.2-klein-base-4B" in bb["detail"]  # what to use instead


def test_load_runs_one_forward_of_each(world, capsys):
    rc, got = _doctor(world, capsys, world["base"], world["naflex"], "--load")
    assert rc == 0, got
    for name in ("backbone", "encoder", "scorer.clip"):
        assert "forward ok" in got[name]["detail"], got[name]
    assert "tokens (1, 16, 32)" in got["encoder"]["detail"]
    rc, got = _doctor(world, capsys, world["distilled"], world["fixres"], "--load")
    assert rc == 1 and "forward ok" in got["backbone"]["detail"]  # it runs; it is only not for training
    assert "forward ok" in got["encoder"]["detail"] and got["encoder"]["status"] == "ok"


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_a_weight_of_the_wrong_shape_is_named_with_its_file(world, capsys, tmp_path):
    bad = shutil.copytree(world["base"], tmp_path / "klein")
    key = "single_transformer_blocks.0.attn.to_out.weight"
    _rewrite(bad / "transformer" / "diffusion_pytorch_model.safetensors",
             lambda sd: sd.update({key: sd[key][:, :8].contiguous()}))
    rc, got = _doctor(world, capsys, bad, world["fixres"])
    detail = got["backbone"]["detail"]
    assert rc == 1 and got["backbone"]["status"] == "problem" and got["encoder"]["status"] == "ok"
    assert f"transformer/diffusion_pytorch_model.safetensors: {key} has shape [64, 8]" in detail
    assert "transformer/config.json implies [64, 256]" in detail and "re-copy" in detail


def test_a_missing_shard_is_named_with_its_index(world, capsys, tmp_path):
    bad = flux2_klein(tmp_path / "klein", distilled=False, shard="200KB")
    shards = sorted((bad / "transformer").glob("*-of-*.safetensors"))
    assert len(shards) > 2
    rc, got = _doctor(world, capsys, bad, world["fixres"])
    assert rc == 0, got  # whole and sharded: fine
    shards[1].unlink()
    rc, got = _doctor(world, capsys, bad, world["fixres"])
    detail = got["backbone"]["detail"]
    assert rc == 1 and got["backbone"]["status"] == "problem"
    assert f"shard transformer/{shards[1].name} is missing" in detail
    assert "diffusion_pytorch_model.safetensors.index.json" in detail and "copy every file the index names" in detail
    # a truncated weight file is named too
    part = shards[2]
    part.write_bytes(part.read_bytes()[:-100])
    rc, got = _doctor(world, capsys, bad, world["fixres"])
    assert rc == 1 and f"transformer/{part.name} is truncated" in got["backbone"]["detail"]


def test_an_encoder_the_preset_does_not_match_says_what_to_set(world, capsys):
    rc, got = _doctor(world, capsys, world["base"], world["fixres"], "--set", "encoder.image_size=512")
    enc = got["encoder"]
    assert rc == 1 and enc["status"] == "problem" and got["backbone"]["status"] == "ok"
    assert f"{world['fixres']}/config.json says the encoder sees 32 px (16 tokens)" in enc["detail"]
    assert "encoder.image_size=512 (4096 tokens)" in enc["detail"] and "set encoder.image_size=32" in enc["detail"]


def test_the_table_gives_a_fix_per_problem(world, capsys):
    rc = main(["doctor", *_args(world, world["distilled"], world["fixres"], "--set", "encoder.image_size=64")])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].split() == ["component", "status", "kind", "path"]
    problems = [i for i, line in enumerate(lines) if line.strip().startswith("PROBLEM:")]
    assert len(problems) == 2 and "2 problem(s)" in lines[-1]
    assert all(lines[i + 1].strip().startswith("fix:") for i in problems)
    assert "is_distilled: true" in lines[problems[0]] and "FLUX.2-klein-base-4B" in lines[problems[0] + 1]


def test_train_refuses_a_distilled_backbone_before_any_work(world, capsys, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", *_args(world, world["distilled"], world["fixres"]), "--data", str(tmp_path / "data"),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("i2l train: error: cannot train")
    assert "is_distilled: true" in err and "FLUX.2-klein-base-4B" in err
    assert not out.exists()  # nothing started: no run directory, no Ray


def test_generate_samples_a_distilled_backbone_as_its_pipeline_does(world, caplog):
    from i2l.backbones.flux2 import load_flux2_backbone
    from i2l.config import get_config

    for name, distilled in (("base", False), ("distilled", True)):
        bc = get_config("klein4b", [f"backbone.path={world[name]}", "backbone.dtype=float32",
                                    "backbone.text_encoder_layers=1,2,3"]).backbone
        bb = load_flux2_backbone(bc)
        assert bb.distilled is distilled and bb.pipe.config.is_distilled is distilled
        caplog.clear()
        assert bb.sampling_guidance(4.0) == (1.0 if distilled else 4.0)  # Flux2KleinPipeline: no CFG when distilled
        assert bool(caplog.records) is distilled
    assert "asymmetric LoRA guidance needs the base model, FLUX.2-klein-base-4B" in caplog.records[0].getMessage()
    # a directory of another pipeline is refused by its model_index.json, naming the kind to use
    zdir = shutil.copytree(world["base"], world["root"] / "not-klein")
    index = json.loads((zdir / "model_index.json").read_text())
    (zdir / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImagePipeline"}))
    with pytest.raises(ValueError, match="names a ZImagePipeline pipeline.*set backbone.kind=zimage"):
        load_flux2_backbone(get_config("klein4b", [f"backbone.path={zdir}"]).backbone)


def test_the_cluster_jobs_name_the_base_model():
    """infra/k8s: the train and produce jobs point I2L_KLEIN4B_DIR at the undistilled FLUX.2-klein-base-4B."""
    from pathlib import Path

    import yaml

    for name in ("rayjob-train.yaml", "rayjob-produce.yaml"):
        job = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra" / "k8s" / name).read_text())
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
        assert Path(env["I2L_KLEIN4B_DIR"]).name == "FLUX.2-klein-base-4B", name


def test_doctor_knows_the_diffsynth_image_metrics_folders(tmp_path):
    """The preference scorers' DiffSynth-Studio/ImageMetrics folders: a replica passes (and `--load` scores it);
    a swapped, damaged or incomplete folder is a problem naming the file."""
    from i2l.config import get_config
    from i2l.doctor.forward import run_forwards
    from i2l.doctor.scorers import check_scorers
    from i2l.replicas.scorers import diffsynth_image_metrics

    root = diffsynth_image_metrics(tmp_path / "ImageMetrics")
    folders = {"aesthetic": "Aesthetic", "pickscore": "PickScore", "imagereward": "ImageReward", "hpsv2": "HPSv2",
               "hpsv3": "HPSv3"}

    def check(**paths):
        cfg = get_config("debug", ["scorer.device=cpu", *(f"scorer.{k}_path={v}" for k, v in paths.items())])
        cfg.data_root = str(tmp_path / "data")
        return {c.name.removeprefix("scorer."): c for c in check_scorers(cfg)}, cfg

    got, cfg = check(**{k: root / v for k, v in folders.items()})
    assert {k: got[k].status for k in folders} == dict.fromkeys(folders, "ok"), {k: got[k].detail for k in folders}
    assert "config.json" in got["hpsv3"].detail and got["hpsv3"].kind == "diffsynth-hpsv3"
    run_forwards(cfg, [got[k] for k in folders])
    assert all("forward ok" in got[k].detail for k in folders), {k: got[k].detail for k in folders}

    swapped = tmp_path / "HPSv2"
    shutil.copytree(root / "HPSv2", swapped)
    shutil.copy(root / "PickScore" / "model.safetensors", swapped / "model.safetensors")
    damaged = tmp_path / "Aesthetic"
    shutil.copytree(root / "Aesthetic", damaged)
    (damaged / "model.safetensors").write_bytes(b"\x00" * 16)
    incomplete = tmp_path / "ImageReward"
    shutil.copytree(root / "ImageReward", incomplete)
    (incomplete / "vocab.txt").unlink()
    got, _ = check(hpsv2=swapped, aesthetic=damaged, imagereward=incomplete)
    assert got["hpsv2"].status == "problem" and f"{swapped}/model.safetensors is not the hpsv2 file" in \
        got["hpsv2"].detail
    assert got["aesthetic"].status == "problem" and "Aesthetic/model.safetensors" in got["aesthetic"].detail
    assert got["imagereward"].status == "problem" and "lacks vocab.txt" in got["imagereward"].detail
    assert got["hpsv3"].status == "unset" and "scorer.hpsv3_path" in got["hpsv3"].detail
