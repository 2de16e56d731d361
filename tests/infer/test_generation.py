"""Generation: batched asymmetric LoRA CFG against a straightforward two-pass implementation, plain CFG as the
special case of identical LoRAs, and the `i2l generate` command (PNGs + table, batching, bad input)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from PIL import Image
from tiny_models import WORDS, partial, random_lora, tiny_flux2, tiny_toy, tiny_zimage

from i2l.backbones.schedule import timestep_schedule
from i2l.cli import main as cli
from i2l.infer.generation import plan_samples, read_table, style_from_file
from i2l.infer.guidance import sample
from i2l.model.lora import LoRA

PROMPTS = ["a red cat", "a blue dog in the garden", "the green house"]


def two_pass_cfg(bb, cond, neg_cond, pos: list[LoRA], neg: list[LoRA], s: float, steps: int, noise):
    """The straightforward way: every sample alone, per step one forward with its positive LoRA and prompt and
    one with its negative LoRA and prompt, v = v_neg + s·(v_pos − v_neg)."""
    out = []
    ts = timestep_schedule(steps)
    for i in range(len(cond)):
        x = noise[i:i + 1]
        for k in range(steps):
            t = ts[k].expand(1)
            v_pos = bb.velocity(x, t, cond.index(slice(i, i + 1)), pos[i])
            v_neg = bb.velocity(x, t, neg_cond.index(slice(i, i + 1)), neg[i])
            x = x + (ts[k + 1] - ts[k]) * (v_neg + s * (v_pos - v_neg))
        out.append(x)
    return torch.cat(out)


@pytest.fixture(scope="module")
def toy():
    bb = tiny_toy()
    n = len(PROMPTS)
    noise = torch.randn(n, *bb.latent_shape(32), generator=torch.Generator().manual_seed(0))
    return bb, bb.encode_prompts(PROMPTS), bb.encode_prompts([""] * n), noise


@torch.no_grad()
def test_batched_asymmetric_cfg_equals_two_passes(toy):
    bb, cond, neg_cond, noise = toy
    styles = random_lora(bb, len(PROMPTS), scale=0.1, seed=1)  # a different LoRA per sample
    gray = random_lora(bb, None, scale=0.1, seed=2)
    batched = sample(bb, cond, neg_cond, styles, gray, guidance=3.0, steps=3, noise=noise)
    reference = two_pass_cfg(bb, cond, neg_cond, styles.unbind(), [gray] * len(PROMPTS), 3.0, 3, noise)
    assert (batched - reference).abs().max() < 1e-5
    plain = sample(bb, cond, neg_cond, styles, styles, guidance=3.0, steps=3, noise=noise)
    assert (batched - plain).abs().max() > 1e-3, "the gray LoRA on the negative branch must matter"


@torch.no_grad()
def test_identical_loras_on_both_branches_are_plain_cfg(toy):
    bb, cond, neg_cond, noise = toy
    lora = random_lora(bb, None, scale=0.1, seed=3)
    n = len(PROMPTS)
    asym_same = sample(bb, cond, neg_cond, lora.expand(n), lora.expand(n), guidance=2.5, steps=3, noise=noise)
    # plain CFG as a pipeline with one loaded LoRA runs it: the same LoRA on every row of both branches
    x, ts = noise.clone(), timestep_schedule(3)
    for k in range(3):
        v = bb.velocity(torch.cat([x, x]), ts[k].expand(2 * n), type(cond).cat([cond, neg_cond]), lora)
        x = x + (ts[k + 1] - ts[k]) * (v[n:] + 2.5 * (v[:n] - v[n:]))
    assert (asym_same - x).abs().max() < 1e-5


@torch.no_grad()
def test_a_lora_over_fewer_layers_runs_in_asymmetric_cfg(toy):
    """A file may adapt fewer layers than the gray LoRA on the negative branch: where it has no layer it is a
    zero LoRA, in the one batched forward as in two passes."""
    bb, cond, neg_cond, noise = toy
    full = random_lora(bb, None, scale=0.1, seed=1)
    part = partial(full, 3)
    gray = random_lora(bb, None, scale=0.1, seed=2)
    n = len(PROMPTS)
    batched = sample(bb, cond, neg_cond, part, gray, guidance=3.0, steps=3, noise=noise)
    reference = two_pass_cfg(bb, cond, neg_cond, [part] * n, [gray] * n, 3.0, 3, noise)
    assert (batched - reference).abs().max() < 1e-5
    with_full = sample(bb, cond, neg_cond, full, gray, guidance=3.0, steps=3, noise=noise)
    assert (batched - with_full).abs().max() > 1e-3, "the layers it lacks must add nothing, not the full LoRA"


# ---------- styles, ids, checks ----------
def test_files_of_one_name_are_styles_of_their_own(tmp_path):
    """a/style and b/style (or names that slug alike) must not share sample ids: their images would overwrite
    each other and their table rows merge."""
    bb = tiny_toy()
    paths = [random_lora(bb, None, seed=i).save(tmp_path / rel)
             for i, rel in enumerate(("a/style.safetensors", "b/style.safetensors", "my style.safetensors",
                                      "my_style.safetensors"))]
    styles = [style_from_file(p, bb) for p in paths]
    assert len({st.lora_id for st in styles}) == 4
    assert styles[0].lora_id.startswith("style-") and style_from_file(paths[0], bb).lora_id == styles[0].lora_id
    assert len({p["sample_id"] for p in plan_samples(styles, ["a red cat"], [0, 1])}) == 8
    with pytest.raises(ValueError, match="given twice"):
        plan_samples([styles[0], style_from_file(paths[0], bb)], ["a red cat"], [0])


class RecordingTokenizer:
    """A tokenizer that remembers the texts it tokenizes: what a pipeline really feeds its text encoder."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []

    def __call__(self, text, *args, **kwargs):
        self.texts += [text] if isinstance(text, str) else list(text)
        return self.tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


# the end of Qwen3's chat template: thinking off adds an empty think block to the generation prompt
QWEN3_CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
              "{% if add_generation_prompt %}<|im_start|> assistant "
              "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}"
              "{% endif %}")


@pytest.mark.parametrize("builder", [tiny_flux2, tiny_zimage])
def test_prompt_length_is_counted_on_the_text_the_pipeline_tokenizes(builder):
    """FLUX.2-klein templates prompts with thinking off (two more tokens), Z-Image with thinking on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from i2l.infer.generation import check_prompt_lengths

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = RecordingTokenizer(PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                                     chat_template=QWEN3_CHAT))
    bb = builder()
    bb.tokenizer = bb.pipe.tokenizer = tok
    prompt = "a red cat in the garden"
    bb.encode_prompts([prompt])
    n = len(tok.tok(tok.texts[-1])["input_ids"])  # tokens the pipeline gave its text encoder
    bb.max_sequence_length = n
    check_prompt_lengths(bb, [prompt])
    bb.max_sequence_length = n - 1
    with pytest.raises(ValueError, match=f"prompt is {n} tokens but the {bb.kind} text encoder takes at most"):
        check_prompt_lengths(bb, [prompt])


def test_an_existing_file_is_taken_as_named_even_with_glob_characters(tmp_path):
    from i2l.infer.generation import expand_images

    for name in ("style[1].png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    literal = str(tmp_path / "style[1].png")
    assert expand_images([literal]) == [literal]
    assert expand_images([str(tmp_path / "*.png")]) == [str(tmp_path / "b.png"), literal]
    with pytest.raises(FileNotFoundError, match="no image matches"):
        expand_images([str(tmp_path / "style[2].png")])


# ---------- the command ----------
@pytest.fixture(scope="module")
def setup(debug_run, tmp_path_factory):
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.infer.api import I2L

    model = I2L.load(debug_run.run_dir)
    s = load_val_samples(debug_run.prepared_dir)
    d = tmp_path_factory.mktemp("gen")
    for i, im in enumerate(s[1].refs):  # user reference files: odd sizes and modes on purpose
        im.convert(["RGB", "RGBA", "L", "P"][i]).resize((24 + 8 * i, 24 + 8 * i)).save(d / f"ref{i}.png")
    lora_path = model.predict_lora(s[0].refs).save(d / "style-a.safetensors", prefix=model.lora_prefix)
    return model, s, d, lora_path


def run_cli(debug_run, out, *extra) -> int:
    return cli(["generate", "--checkpoint", str(debug_run.run_dir), "--out", str(out), "--steps", "2",
                "--no-progress", *extra])


def test_generate_writes_every_sample_and_its_table(debug_run, setup, tmp_path):
    _, s, d, lora_path = setup
    out = tmp_path / "out"
    rc = run_cli(debug_run, out, "--lora", str(lora_path), "--images", str(d / "ref*.png"),
                 "--prompt", s[0].prompt, "--prompt", s[1].prompt, "--samples", "2", "--batch-size", "3",
                 "--guidance", "3")
    assert rc == 0
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # styles x prompts x seeds
    assert len({r["sample_id"] for r in rows}) == 8 and {r["seed"] for r in rows} == {"0", "1"}
    ids = {r["lora_id"] for r in rows}
    assert len(ids) == 2 and any(i.startswith("style-a-") for i in ids)  # file name + digest of its path
    for r in rows:
        st = json.loads(r["settings"])
        assert st["cfg"] == "asymmetric" and st["guidance"] == 3.0 and st["steps"] == 2
        assert Image.open(out / r["image"]).size == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["image"] for r in rows), "samples.csv"])
    # the same samples one per batch: batching must not change an image
    one = tmp_path / "one"
    assert run_cli(debug_run, one, "--lora", str(lora_path), "--prompt", s[1].prompt, "--samples", "2",
                   "--batch-size", "1", "--guidance", "3") == 0
    style_a = next(i for i in ids if i.startswith("style-a-"))
    a = torch.tensor(list(Image.open(one / f"{style_a}_p00_s1.png").getdata()))
    b = torch.tensor(list(Image.open(out / f"{style_a}_p01_s1.png").getdata()))
    assert (a - b).abs().max() <= 1


def test_same_named_and_partial_lora_files_generate_apart(debug_run, setup, tmp_path):
    """Two files named style.safetensors, one adapting only some layers, with the default asymmetric CFG."""
    model, s, _, lora_path = setup
    full = LoRA.load(lora_path)
    part = partial(full, 4)
    a = full.save(tmp_path / "a" / "style.safetensors", prefix=model.lora_prefix)
    b = part.save(tmp_path / "b" / "style.safetensors", prefix=model.lora_prefix)
    out = tmp_path / "out"
    assert run_cli(debug_run, out, "--lora", str(a), "--lora", str(b), "--prompt", s[0].prompt) == 0
    rows = read_table(out / "samples.csv")
    assert len(rows) == 2 and len({r["lora_id"] for r in rows}) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["image"] for r in rows), "samples.csv"])
    images = [list(Image.open(out / r["image"]).getdata()) for r in rows]
    assert images[0] != images[1]


def test_plain_cfg_mixing_and_strength_options(debug_run, setup, tmp_path):
    _, s, d, lora_path = setup
    out = tmp_path / "out"
    assert run_cli(debug_run, out, "--lora", str(lora_path), "--images", str(d / "ref0.png"), "--mix", "1,0",
                   "--prompt", s[0].prompt, "--plain-cfg", "--strength", "0.5") == 0
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["lora_id"].startswith("mix-")
    st = json.loads(rows[0]["settings"])
    assert st["cfg"] == "plain" and st["strength"] == 0.5
    # weights (1, 0) keep only the first style: the same image as that style alone
    assert run_cli(debug_run, tmp_path / "alone", "--lora", str(lora_path), "--prompt", s[0].prompt,
                   "--plain-cfg", "--strength", "0.5") == 0
    a = list(Image.open(out / rows[0]["image"]).getdata())
    (alone,) = read_table(tmp_path / "alone" / "samples.csv")
    assert a == list(Image.open(tmp_path / "alone" / alone["image"]).getdata())


def test_bad_input_names_the_problem_and_writes_nothing(debug_run, setup, tmp_path, capsys):
    _, s, _, lora_path = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    other = random_lora(tiny_flux2(parts=False), None).save(tmp_path / "flux.safetensors")
    cases = [
        (["--images", str(tmp_path / "nothing-*.png")], "no image matches"),
        (["--images", str(broken)], "cannot read image .*broken.png"),
        (["--lora", str(other)], "does not fit backbone"),
        (["--lora", str(lora_path), "--mix", "1,2"], "1 styles but 2 mixing weights"),
        ([], "no style given"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert run_cli(debug_run, out, *args, "--prompt", s[0].prompt) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
        assert not out.exists() or not any(out.iterdir()), f"{args} left files behind"
    long = " ".join(["circle"] * 40)  # the debug text encoder takes 12 words
    out = tmp_path / "long"
    assert run_cli(debug_run, out, "--lora", str(lora_path), "--prompt", long) == 2
    assert "at most 12" in capsys.readouterr().err and not out.exists()


def test_prompts_longer_than_a_real_text_encoder_takes_are_refused():
    from i2l.infer.generation import check_prompt_lengths

    bb = tiny_flux2()  # Qwen3 text encoder + tokenizer, max_sequence_length 16 (the pipeline would truncate)
    check_prompt_lengths(bb, ["a red cat"])
    with pytest.raises(ValueError, match=r"tokens but the flux2 text encoder takes at most 16"):
        check_prompt_lengths(bb, [" ".join(["red cat"] * 10)])
