"""Table 1's preference metrics through diffsynth.metrics, each on a replica of its DiffSynth-Studio/ImageMetrics
folder (tiny sizes, published file names and keys), checked against an independent computation of its formula
from the same weights; plus the skip reasons and the errors a missing or wrong file gives."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from i2l.config import ScorerConfig
from i2l.eval.metrics import ScoreBatch, score_samples
from i2l.eval.metrics.plugins import (
    AestheticScorer,
    HPSv2Scorer,
    HPSv3Scorer,
    ImageRewardScorer,
    PickScoreScorer,
    build_plugins,
)

FOLDERS = {"aesthetic": "Aesthetic", "pickscore": "PickScore", "imagereward": "ImageReward", "hpsv2": "HPSv2",
           "hpsv3": "HPSv3"}


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory):
    from i2l.replicas.scorers import diffsynth_image_metrics

    return diffsynth_image_metrics(tmp_path_factory.mktemp("ImageMetrics"))


@pytest.fixture(scope="module")
def sc(metrics_dir):
    return ScorerConfig(device="cpu", batch_size=2, **{f"{k}_path": str(metrics_dir / v) for k, v in FOLDERS.items()})


@pytest.fixture(scope="module")
def scorers(sc):
    return {s.name: s for s in build_plugins(sc)}


def _batch(square=False):
    sizes = [(56, 56)] * 3 if square else [(64, 48), (40, 40), (30, 50)]
    images = [Image.effect_noise(s, 40 + 30 * i).convert("RGB") for i, s in enumerate(sizes)]
    images[1] = Image.new("RGB", sizes[1], (20, 90, 200))
    return ScoreBatch(images, ["a red cat on a mat", "blue sea", "an old tree at night"], ["flat"] * 3)


def _close(got, want, rel=1e-4):
    assert got == pytest.approx([float(w) for w in want], rel=rel, abs=1e-6)


def test_every_replica_folder_is_available(scorers):
    assert {n: s.available() for n, s in scorers.items()} == {n: (True, "") for n in FOLDERS}


def test_aesthetic_is_the_mlp_on_the_normalised_clip_embedding(scorers, metrics_dir):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = metrics_dir / "Aesthetic"
    state = load_file(str(folder / "model.safetensors"))
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(folder)).eval()
    vision.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()
                            if k.startswith("vision_model.")})
    batch = _batch()
    x = CLIPImageProcessor.from_pretrained(folder)(images=batch.images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = vision(pixel_values=x).pooler_output @ state["visual_projection.weight"].T  # (B, 768)
        h = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # the released MLP: linear layers, no activations (dropouts idle in eval)
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    got = scorers["aesthetic"].score(batch)["aesthetic"]
    _close(got, h[:, 0])
    assert len({round(v, 6) for v in got}) == 3


def test_pickscore_is_logit_scale_times_cosine_of_each_pair(scorers, metrics_dir):
    from transformers import CLIPModel, CLIPProcessor

    folder = metrics_dir / "PickScore"
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    batch = _batch()
    with torch.no_grad():
        want = []
        for im, p in zip(batch.images, batch.prompts, strict=True):
            ie = model.get_image_features(**proc(images=[im], return_tensors="pt")).pooler_output
            te = model.get_text_features(**proc(text=[p], return_tensors="pt")).pooler_output
            want.append(model.logit_scale.exp() * torch.cosine_similarity(ie, te)[0])
    got = scorers["pickscore"].score(batch)["pickscore"]  # batch_size 2: a chunk of 2, then 1
    _close(got, want)
    swapped = ScoreBatch(batch.images, batch.prompts[::-1], batch.styles)
    assert scorers["pickscore"].score(swapped)["pickscore"] != pytest.approx(got, abs=1e-4)  # the prompt counts


def test_hpsv2_is_logit_scale_times_cosine_of_the_open_clip_model(scorers, metrics_dir):
    """The open_clip checkpoint read by open_clip itself (not DiffSynth's key converter), fed the same tokens and
    pixels: DiffSynth's converted CLIP must give the same scores."""
    import open_clip
    from transformers import CLIPProcessor

    from i2l.replicas.scorers import register_open_clip_archs

    folder = metrics_dir / "HPSv2"
    arch = register_open_clip_archs()["ViT-H-14"]
    model = open_clip.create_model(arch, pretrained=None).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    proc = CLIPProcessor.from_pretrained(folder)
    batch = _batch()
    inputs = proc(text=batch.prompts, images=batch.images, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.encode_image(inputs["pixel_values"], normalize=True)
        ids = inputs["input_ids"]  # open_clip reads 77 tokens, zero-padded (after the end token: causal, unseen)
        txt = model.encode_text(torch.nn.functional.pad(ids, (0, 77 - ids.shape[1])), normalize=True)
        want = model.logit_scale.exp() * (img * txt).sum(-1)
    _close(scorers["hpsv2"].score(batch)["hpsv2"], want, rel=1e-3)


def _bert_pixels(images):
    """BLIP's eval transform written out: bicubic resize of the short side to 224, centre crop, CLIP mean/std."""
    from torchvision.transforms import functional as F

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    out = []
    for im in images:
        x = F.center_crop(F.resize(im.convert("RGB"), 224, interpolation=F.InterpolationMode.BICUBIC), 224)
        out.append(F.normalize(F.to_tensor(x), mean, std))
    return torch.stack(out)


def test_imagereward_is_the_standardised_mlp_of_blips_text_image_feature(scorers, metrics_dir):
    from transformers import BertTokenizer

    folder = metrics_dir / "ImageReward"
    state = load_file(str(folder / "model.safetensors"))
    scorer = scorers["imagereward"]
    batch = _batch()
    got = scorer.score(batch)["imagereward"]
    blip = scorer.metric().model.blip
    # the loaded tower is the file's (timm names -> transformers' BLIP names)
    assert torch.equal(blip.vision_model.encoder.layers[0].self_attn.qkv.weight,
                       state["blip.visual_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(blip.vision_model.embeddings.class_embedding, state["blip.visual_encoder.cls_token"])
    tok = BertTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    text = tok(batch.prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = blip.vision_model(pixel_values=_bert_pixels(batch.images)).last_hidden_state  # (B, N, D)
        feature = blip.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                    encoder_hidden_states=image_tokens).last_hidden_state[:, 0]  # [CLS]: (B, H)
        r = feature
        for i in (0, 2, 4, 6, 7):
            r = r @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"]
        want = (r[:, 0] - 0.16717362830052426) / 1.0333394966054072  # ImageReward's published mean / std
    # tiny random BLIP towers vary the feature little: a tolerance far below the spread between samples
    assert got == pytest.approx(want.tolist(), rel=0, abs=2e-6)
    assert min(abs(a - b) for a, b in itertools.pairwise(got)) > 2e-5  # images and prompts show in the score
    swapped = ScoreBatch(batch.images, batch.prompts[::-1], batch.styles)
    assert abs(scorer.score(swapped)["imagereward"][0] - got[0]) > 2e-5


def test_hpsv3_is_mu_of_the_reward_head_at_the_reward_token(scorers, metrics_dir):
    from diffsynth.models.hpsv3 import HPSV3_INSTRUCTION, HPSV3_PROMPT_WITH_SPECIAL_TOKEN

    folder = metrics_dir / "HPSv3"
    state = load_file(str(folder / "model.safetensors"))
    scorer = scorers["hpsv3"]
    batch = _batch(square=True)  # square: HPSv3's fixed 256*28*28 pixels make them 448 x 448
    got = scorer.score(batch)["hpsv3"]
    hps = scorer.metric().model
    proc = hps.processor  # the folder's Qwen2-VL processor with <|Reward|> added
    images = [im.resize((448, 448), Image.BICUBIC) for im in batch.images]
    texts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=p)
                            + HPSV3_PROMPT_WITH_SPECIAL_TOKEN}]}], tokenize=False, add_generation_prompt=True)
             for p in batch.prompts]
    with torch.no_grad():
        mus = []
        for text, image in zip(texts, images, strict=True):  # one at a time: no padding involved
            inputs = proc(text=[text], images=[image], return_tensors="pt")
            hidden = hps.model.model(**inputs).last_hidden_state[0]  # (L, H): the Qwen2-VL trunk
            at = (inputs["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids("<|Reward|>")).nonzero()[0, 0]
            h = torch.relu(hidden[at] @ state["rm_head.0.weight"].T + state["rm_head.0.bias"])
            h = torch.relu(h @ state["rm_head.3.weight"].T + state["rm_head.3.bias"])
            mus.append((h @ state["rm_head.5.weight"].T + state["rm_head.5.bias"])[0])  # (mu, sigma) -> mu
    _close(got, mus, rel=1e-3)


def test_unconfigured_scorers_are_skipped_with_their_reason():
    rows = score_samples(build_plugins(ScorerConfig(device="cpu")), _batch())
    assert {r["status"] for r in rows} == {"skipped"} and all(r["value"] is None for r in rows)
    for r in rows:
        assert f"scorer.{r['metric']}_path" in r["reason"] and "model.safetensors" in r["reason"]


def test_missing_and_wrong_files_are_named(metrics_dir, tmp_path):
    bad = tmp_path / "ImageReward"
    shutil.copytree(metrics_dir / "ImageReward", bad)
    (bad / "med_config.json").unlink()
    sc = ScorerConfig(device="cpu", imagereward_path=str(bad))
    ok, reason = ImageRewardScorer(sc.imagereward_path, sc).available()
    assert not ok and "lacks med_config.json" in reason

    corrupt = tmp_path / "Aesthetic"
    shutil.copytree(metrics_dir / "Aesthetic", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    scorer = AestheticScorer(str(corrupt), ScorerConfig(device="cpu"))
    with pytest.raises(ValueError, match="Aesthetic/model.safetensors is not a readable safetensors file"):
        scorer.score(_batch())

    # HPSv2 pointed at the PickScore folder: transformers keys, not open_clip's
    with pytest.raises(ValueError, match="not an open_clip state dict"):
        HPSv2Scorer(str(metrics_dir / "PickScore"), ScorerConfig(device="cpu")).score(_batch())

    # weights that do not fit the folder's config: the file is named with the mismatch
    other = tmp_path / "PickScore"
    shutil.copytree(metrics_dir / "PickScore", other)
    shutil.copy(metrics_dir / "HPSv2" / "config.json", other / "config.json")  # 49,408-token text tower
    with pytest.raises(ValueError, match="PickScore/model.safetensors does not hold CLIP"):
        PickScoreScorer(str(other), ScorerConfig(device="cpu")).score(_batch())

    assert not HPSv3Scorer(str(metrics_dir / "HPSv3" / "model.safetensors"), ScorerConfig()).available()[0]
