"""Generation for the command line and batch use: styles × prompts × seeds sampled in batches, where one forward per
step carries both CFG branches of every style in the batch (asymmetric LoRA guidance: style LoRA + prompt against
gray LoRA + negative prompt; or the base model, or no CFG), from noise or (img2img) from noised init images, written
as PNGs plus a table of (sample id, prompt, lora id, seed, settings).

Everything is checked before the first image is written (LoRA files against the backbone, reference images, prompt
lengths, masks), and every file is written under a temporary name and renamed, so a failure leaves nothing half done.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from i2l.infer.guidance import NEGATIVES, NonFiniteSample, check_passes, denoise_steps
from i2l.io import atomic_path, write_bytes_atomic
from i2l.model.finite import require_finite
from i2l.model.lora import LoRA, check_compatible

TABLE_FILE = "samples.csv"
TABLE_COLUMNS = ("sample_id", "prompt", "lora_id", "seed", "image", "settings")


@dataclass
class StyleLoRA:
    """A style to generate with: its LoRA, and the id its samples are filed under."""

    lora_id: str
    lora: LoRA
    source: str  # a LoRA file, the reference images it was predicted from, or a mix of styles


@dataclass
class GenerateSettings:
    guidance: float = 2.0  # CFG scale s: v = v_neg + s·(v_pos − v_neg)
    steps: int = 20  # Euler steps
    strength: float = 1.0  # LoRA strength (ΔW -> strength·ΔW on both branches; 0 = the base model)
    asymmetric: bool = True  # True: gray-image LoRA on the negative branch (paper §3.4); False: plain CFG
    negative_prompt: str = ""
    batch_size: int = 16  # samples per batched sampling call (2× rows per forward)
    negative: str = "gray"  # CFG negative branch: "gray" LoRA (paper), "base" model (no LoRA), "none" (no CFG)
    denoise: float = 1.0  # img2img: fraction of the steps sampled from the noised init image (1 = from noise)
    passes: str = "auto"  # CFG branches per step: "joint" (one forward), "split" (two), "auto" (faster here)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        self.guidance = require_finite(self.guidance, "guidance")
        self.strength = require_finite(self.strength, "strength")
        denoise_steps(self.steps, self.denoise)  # denoise in [0, 1]
        if self.negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {', '.join(NEGATIVES)}, got {self.negative!r}")
        check_passes(self.passes)
        if not self.asymmetric and self.negative != "gray":
            raise ValueError(f"plain CFG (the style LoRA on both branches) and negative={self.negative!r} both choose "
                             "the negative branch: give one")

    def cfg_kind(self, backbone) -> str:
        """What the negative branch is, as recorded with each sample: asymmetric (a gray-image LoRA), base (the base
        model), plain (the style LoRA on both), or none (no CFG: asked, or a step-distilled backbone)."""
        if self.negative == "none" or getattr(backbone, "distilled", False):
            return "none"
        if self.negative == "base":
            return "base"
        return "asymmetric" if self.asymmetric else "plain"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:64] or "style"


def _digest(paths: list) -> str:
    """8 hex digits naming files by where they are: two files of one name (a/style, b/style) get different ids,
    and a file keeps its id whatever it is generated alongside."""
    return hashlib.sha256("\n".join(str(Path(p).resolve()) for p in paths).encode()).hexdigest()[:8]


# ---------- styles ----------
def expand_images(patterns: list[str]) -> list[str]:
    """Paths as given, globs expanded; a file that exists is taken as named even if its name has * ? [ in it."""
    out = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") and not os.path.exists(p) else [p]
        if not hits:
            raise FileNotFoundError(f"no image matches {p!r}")
        out.extend(hits)
    return out


def style_from_file(path: str | os.PathLike, backbone) -> StyleLoRA:
    """A LoRA file, checked against the backbone (another backbone's file fails naming its layers); id
    `<name>-<digest of its resolved path>`."""
    lora = LoRA.load(path, backbone=backbone)
    return StyleLoRA(f"{_slug(Path(path).stem)}-{_digest([path])}", lora, str(path))


def style_from_images(model, images: list) -> StyleLoRA:
    """One LoRA from 1..N references fused by token concatenation (paper §4.5); id from the images' digest."""
    paths = expand_images([str(p) for p in images])
    if not paths:
        raise ValueError("no reference images given: i2L needs at least one")
    lora = model.predict_lora(paths)
    return StyleLoRA(f"refs-{_slug(Path(paths[0]).stem)}-{len(paths)}-{_digest(paths)}", lora, json.dumps(paths))


def mix_styles(styles: list[StyleLoRA], weights: list[float]) -> StyleLoRA:
    """LoRA-space mixing: ΔW = Σ w_i·ΔW_i (exact, ranks concatenated); weights (1, 0) return the first LoRA."""
    if len(weights) != len(styles):
        raise ValueError(f"{len(styles)} styles but {len(weights)} mixing weights: give one weight per style")
    lora = LoRA.mix([s.lora for s in styles], weights)
    label = "+".join(f"{w:g}x{s.lora_id}" for s, w in zip(styles, weights) if w)
    return StyleLoRA(_slug(f"mix-{label}") if len(label) < 60 else f"mix-{hashlib.sha256(label.encode()).hexdigest()[:8]}",
                 lora, label)


# ---------- checks ----------
def check_image_paths(patterns: list[str]) -> list[str]:
    """The images `patterns` name (globs expanded), each checked from its header before any model loads."""
    from i2l.data.images import check_image_file

    paths = expand_images(patterns)
    for p in paths:
        check_image_file(p)
    return paths


def check_lora_file(path: str | os.PathLike) -> None:
    """Refuse, before any model loads, a --lora that is missing, a directory or not a whole safetensors file (its
    keys and shapes are checked against the backbone once that is loaded)."""
    from i2l.io import require_regular_file
    from i2l.train.checkpoint import safetensors_problem

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--lora {path} is a directory, give a .safetensors LoRA file")
    require_regular_file(path, "LoRA file")
    why = safetensors_problem(path)
    if why:
        raise ValueError(f"--lora {path}: {why}; pass a LoRA file written by i2l or diffusers")


def check_output(path: str | os.PathLike, directory: bool, flag: str = "--out") -> None:
    """Refuse, before any model loads, an output that cannot be written: a directory where a file goes (or a file
    where a directory goes), or a place under a file or a folder this user may not write to."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file: name a directory for the images")
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory: name the .safetensors file to write")
    parent = path if directory and path.is_dir() else path.absolute().parent
    while not parent.exists():  # what is missing is created when written
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: no permission to write in {parent}; choose another place")


def check_prompt_lengths(backbone, prompts: list[str]) -> None:
    """Refuse prompts longer than the text encoder takes (the diffusers pipelines would truncate them silently)."""
    tok, limit = getattr(backbone, "tokenizer", None), getattr(backbone, "max_sequence_length", None)
    if tok is None or limit is None:
        backbone.encode_prompts(list(prompts))  # the toy text encoder raises on its own
        return
    for p in prompts:
        n = len(tok(backbone.prompt_text(p))["input_ids"])  # tokenized as the pipelines tokenize it
        if n > limit:
            raise ValueError(f"prompt is {n} tokens but the {backbone.kind} text encoder takes at most {limit} "
                             f"(backbone.max_sequence_length): shorten {p[:60]!r}...")


def load_inpaint(backbone, image_path, mask_path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Known latents (1, *latent) of an image and its mask (1, 1, h, w) on the latent grid, 1 = regenerate (white in
    the mask file). A latent cell is regenerated if any of its pixels is."""
    from i2l.data.images import load_image_file, to_tensor

    known = backbone.encode_images(to_tensor([load_image_file(image_path, "--inpaint image")],
                                             image_size).to(backbone.device))
    m = load_image_file(mask_path, "--mask image").convert("L").resize((image_size, image_size), Image.NEAREST)
    mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]  # (1, 1, S, S)
    h, w = known.shape[-2:]
    mask = (torch.nn.functional.adaptive_max_pool2d(mask, (h, w)) > 0.5).to(known.dtype)  # (1, 1, h, w)
    if mask.sum() == 0:
        raise ValueError(f"mask {mask_path} marks nothing to regenerate: white (> 50%) = regenerate, black = keep")
    return known, mask.to(known.device)


# ---------- sampling ----------
def plan_samples(styles: list[StyleLoRA], prompts: list[str], seeds: list[int]) -> list[dict]:
    """Every (style, prompt, seed), with a stable sample id."""
    if not styles:
        raise ValueError("no style to generate with: pass --lora FILE or --images IMG ...")
    if not prompts:
        raise ValueError("no prompt given")
    seen = {}
    for s in styles:  # one id per style: a repeated one would overwrite its images and merge its table rows
        if s.lora_id in seen:
            raise ValueError(f"style {s.source} is given twice (as {seen[s.lora_id]} too): give each style once")
        seen[s.lora_id] = s.source
    return [{"sample_id": f"{s.lora_id}_p{pi:02d}_s{seed}", "style": s, "prompt": p, "prompt_index": pi,
             "seed": int(seed)}
            for s in styles for pi, p in enumerate(prompts) for seed in seeds]


def generate_samples(model, styles: list[StyleLoRA], prompts: list[str], out_dir: str | os.PathLike,
                     settings: GenerateSettings | None = None, seeds: list[int] = (0,),
                     inpaint: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
                     init_images: list[str] | None = None) -> list[dict]:
    """Sample every style × prompt × seed in batches of settings.batch_size; write PNGs + the samples table.

    init_images (img2img at settings.denoise): one image for every prompt, or one per prompt.
    Each sample's noise comes from its own seed, so an image does not depend on what it was batched with."""
    from tqdm import tqdm

    settings = settings or GenerateSettings()
    bb = model.backbone
    specs = plan_samples(styles, prompts, list(seeds))
    check_prompt_lengths(bb, [*prompts, settings.negative_prompt])
    for s in styles:
        check_compatible(s.lora, bb, source=f"LoRA {s.source}")
        s.lora.check_finite(f"LoRA {s.source}")  # one made in memory (mixed, predicted) as well as a file
    init = None
    if init_images:
        if len(init_images) not in (1, len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(init_images)} init images: give one init image for "
                             "all prompts or one per prompt")
        if inpaint is not None:
            raise ValueError("img2img (--init-image) and inpainting (--inpaint) together are not supported: inpaint "
                             "regenerates the mask's region from noise; use one of them")
        init = model.init_latents(list(init_images))  # (1 or P, *latent): each image encoded once
    elif settings.denoise != 1.0:
        raise ValueError(f"denoise {settings.denoise:g} needs an init image (--init-image) to start from")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {**asdict(settings), "cfg": settings.cfg_kind(bb), "checkpoint": model.checkpoint_id,
              "inpaint": inpaint is not None}
    common.pop("batch_size")
    rows = []
    bs = settings.batch_size
    for i in tqdm(range(0, len(specs), bs), desc="generate", unit="batch", disable=not progress):
        chunk = specs[i:i + bs]
        paint = None
        if inpaint is not None:
            known, mask = inpaint
            paint = (known.expand(len(chunk), *known.shape[1:]), mask.expand(len(chunk), *mask.shape[1:]))
        start = None if init is None else init[[c["prompt_index"] if len(init) > 1 else 0 for c in chunk]]
        try:
            images = model.generate([c["prompt"] for c in chunk], [c["style"].lora for c in chunk],
                                    negative_lora="gray" if settings.asymmetric else None,
                                    negative=settings.negative, init_images=start, denoise=settings.denoise,
                                    guidance=settings.guidance, steps=settings.steps,
                                    seed=[c["seed"] for c in chunk], strength=settings.strength,
                                    passes=settings.passes,
                                    negative_prompt=settings.negative_prompt, inpaint=paint)
        except NonFiniteSample as e:
            raise _name_styles(e, chunk) from None
        for c, im in zip(chunk, images):
            name = f"{c['sample_id']}.png"
            _write_png(im, out / name)
            rows.append({"sample_id": c["sample_id"], "prompt": c["prompt"], "lora_id": c["style"].lora_id,
                         "seed": c["seed"], "image": name, "settings": {**common, "lora_source": c["style"].source,
                                                                          "init_image": _init_of(init_images, c)}})
        write_table(rows, out / TABLE_FILE)  # after every batch: the table lists exactly the images on disk
    return rows


def _init_of(init_images: list[str] | None, spec: dict) -> str | None:
    """The init image a sample started from (img2img), as given; None for text-to-image."""
    if not init_images:
        return None
    return str(init_images[spec["prompt_index"] if len(init_images) > 1 else 0])


def _name_styles(e: NonFiniteSample, chunk: list[dict]) -> ValueError:
    """The sampler's error with its batch rows named: sample id, lora id and where the LoRA came from."""
    which = "; ".join(f"{chunk[r]['sample_id']} (lora {chunk[r]['style'].lora_id} from {chunk[r]['style'].source}) "
                      f"at sampler step {k} of {e.steps}" for r, k in e.first_bad.items())
    return ValueError(f"sample went non-finite (NaN/Inf): {which}; no image written for this batch "
                      "(lower --strength or --guidance, or check the LoRA)")


def _write_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def read_table(path: str | os.PathLike) -> list[dict]:
    """The samples table (settings parsed back to a dict); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "settings": json.loads(r["settings"])} for r in csv.DictReader(f)]


def write_table(rows: list[dict], path: str | os.PathLike) -> None:
    """Merge rows into the table by sample id (a re-run replaces its samples) and write it atomically."""
    path = Path(path)
    merged = {r["sample_id"]: r for r in read_table(path)}
    merged.update({r["sample_id"]: r for r in rows})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        w.writeheader()
        for r in merged.values():
            w.writerow({**{k: r[k] for k in TABLE_COLUMNS}, "settings": json.dumps(r["settings"], sort_keys=True)})
