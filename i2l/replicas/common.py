"""What the replica writers share: a seed, exact shard counts through the libraries' own `save_pretrained`,
tiny offline tokenizers (byte-level BPE for Qwen, CLIP's `</w>` BPE, a Gemma-style one) and JSON writing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

SEED = 0
# Qwen's special tokens as its tokenizer_config.json lists them (the ones the chat template uses).
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# ChatML, the shape of Qwen3's template; the published template is longer (tools, thinking), not copied here.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def seeded() -> torch.Generator:
    """Fix torch's global RNG (model init draws from it) so a replica's weights are the same every time."""
    torch.manual_seed(SEED)
    return torch.Generator().manual_seed(SEED)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _shard_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.safetensors"))


def save_sharded(model, out_dir: Path, shards: int, **kwargs) -> None:
    """`model.save_pretrained(out_dir)` with exactly `shards` weight files (1 = the single unsharded file).

    The libraries shard greedily by `max_shard_size`; the smallest size that gives `shards` files is searched
    in a scratch dir so the names (`-0000k-of-0000N`) and the index.json are the libraries' own."""
    out_dir = Path(out_dir)
    if shards == 1:
        model.save_pretrained(out_dir, **kwargs)
        return
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    size = total // shards + 1
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(200):
            trial = Path(tmp) / f"s{size}"
            model.save_pretrained(trial, max_shard_size=size, **kwargs)
            count = len(_shard_files(trial))
            if count == shards:
                shutil.copytree(trial, out_dir, dirs_exist_ok=True)
                return
            if count < shards:
                break
            size = int(size * 1.05) + 1
    raise RuntimeError(f"could not save {type(model).__name__} in exactly {shards} shards")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def qwen_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer of Qwen2TokenizerFast's kind (no merges: every byte is a token) with Qwen's
    special tokens and a chat template, saved with the files the published `tokenizer/` holds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, errors="replace", model_max_length=131072,
                             chat_template=QWEN_CHAT_TEMPLATE, split_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    tok.save_pretrained(out_dir)
    # transformers 5 writes tokenizer.json + tokenizer_config.json (+ chat_template.jinja); the published folder
    # also has the slow tokenizer's files, written here from the same vocabulary.
    write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    write_json(out_dir / "added_tokens.json", {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS})
    write_json(out_dir / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                     "additional_special_tokens": list(QWEN_SPECIALS)})
    if not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return tok


def clip_tokenizer_files(out_dir: Path) -> int:
    """vocab.json + merges.txt of CLIP's BPE kind (characters and their `</w>` word-final forms, no merges);
    returns the vocabulary size."""
    chars = sorted(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    write_json(out_dir / "vocab.json", {t: i for i, t in enumerate(tokens)})
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def gemma_tokenizer(out_dir: Path):
    """A Gemma-style tokenizer (SigLIP2's text tower uses Gemma's): a character vocabulary with `<pad>`, `<eos>`,
    `<bos>`, `<unk>` at Gemma's ids 0-3, saved as tokenizer.json. The published `tokenizer.model`
    (SentencePiece) is not written: `sentencepiece` is not installed here and transformers 5 reads tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["▁"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    # as the SigLIP2 conversion script sets the Gemma tokenizer up: no BOS, EOS appended, right padding
    tok = GemmaTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                             unk_token="<unk>", add_bos_token=False, add_eos_token=True, padding_side="right",
                             model_input_names=["input_ids"], model_max_length=64)
    tok.save_pretrained(out_dir)
    return tok
