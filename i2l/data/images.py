"""Image <-> tensor conversions shared by every stage: decoding (the data path's own decoder, so user references
are normalised exactly like training images), [-1, 1] tensors, the gray reference image of asymmetric guidance,
and safe reading of user image files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from i2l.data.validate import ALLOWED_FORMATS, REASONS, Rejected, decode_image, to_rgb
from i2l.io import require_regular_file

if TYPE_CHECKING:  # torch only where tensors are made: decoding and checking images need none (flows/__init__)
    import torch

MAX_PIXELS = 64_000_000  # decompression-bomb guard for user images


def to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]; resized (Lanczos) to size x size when given."""
    import torch

    arrs = []
    for im in images:
        # the data path's conversion: a bare convert("RGB") shows hidden RGB under alpha and clips 16-bit to white
        try:
            im = to_rgb(im)
        except Rejected as e:
            raise ValueError(f"cannot use image: {REASONS[e.reason]} ({e.detail})") from None
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.LANCZOS)
        arrs.append(np.asarray(im, dtype=np.float32))
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"images have different sizes {sorted({a.shape[:2] for a in arrs})}: pass size= to resize")
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return x / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images; non-finite pixels are a ValueError (clamp would write NaN as black)."""
    import torch

    x = x.detach().float()
    ok = torch.isfinite(x).flatten(1).all(1)  # (B,)
    if not bool(ok.all()):
        rows = (~ok).nonzero().flatten().tolist()
        raise ValueError(f"image(s) {rows} of a batch of {len(ok)} hold NaN/Inf pixels (a diverged sample or "
                         "decoder): refusing to write them as black images")
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


REFERENCE = "reference image"  # what a user image file is called in errors unless the caller says otherwise


def decode(data: bytes, name: str = "image") -> Image.Image:
    """Encoded bytes -> 8-bit RGB exactly as `prepare` decodes training rows (format allowlist, pixel limit before
    any pixel is read, EXIF rotation, alpha over white, 16-bit scaled); a refusal is a ValueError naming `name`."""
    try:
        return decode_image(data, MAX_PIXELS)
    except Rejected as e:
        raise ValueError(f"cannot read image {name}: {REASONS[e.reason]} ({e.detail})") from None


def _require_file(path: Path, what: str) -> None:
    glob = f" (or a glob like '{path}/*.png')" if what == REFERENCE else ""  # several references, one flag
    require_regular_file(path, what, give=f"an image file{glob}")


def check_image_file(path: str | Path, what: str = REFERENCE) -> None:
    """Refuse, before any model loads, what `load_image_file` would refuse later and can be told from the header:
    missing, a directory, not an image of an allowed format, too many pixels. No pixel is decoded. `what` names the
    image in the messages (a reference, the --mask image, ...)."""
    path = Path(path)
    _require_file(path, what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
        try:
            with Image.open(path, formats=ALLOWED_FORMATS) as im:  # reads the header only
                w, h = im.size
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            why = REASONS["not_an_image"] if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"cannot read image {path}: {why}") from None
    if w * h > MAX_PIXELS:
        raise ValueError(f"cannot read image {path}: {REASONS['decompression_bomb']} ({w}x{h} = {w * h} pixels > "
                         f"limit {MAX_PIXELS})")


def load_image_file(path: str | Path, what: str = REFERENCE) -> Image.Image:
    """Read a user image file with a clear error for missing/unreadable files (naming it as `what`)."""
    path = Path(path)
    _require_file(path, what)
    return decode(path.read_bytes(), name=str(path))


def gray_image(size: int) -> Image.Image:
    """The pure gray (128) reference whose predicted LoRA is the style-neutral negative branch (paper §3.4)."""
    return Image.new("RGB", (size, size), (128, 128, 128))
