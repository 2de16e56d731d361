"""Decode and validate one MegaStyle row: pixel-limit-guarded decoding, any image mode to 8-bit RGB, size,
aspect and text checks. A rejected row raises `Rejected(reason, detail)` with a short reason code."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from i2l.config import DataConfig

# Reason codes written to quarantine.parquet, with what each means.
REASONS = {
    "bad_id": "id missing or not of the form s{style}_c{content}",
    "duplicate_id": "id already seen earlier in the input (first occurrence kept)",
    "missing_image": "image bytes null or empty",
    "not_an_image": "bytes are not an image of an allowed format",
    "decode_error": "image data corrupt or truncated",
    "decompression_bomb": "declared pixel count over data.max_pixels",
    "unsupported_mode": "image mode that cannot be converted to RGB",
    "too_small": "shorter side under data.min_side",
    "bad_aspect": "long/short side ratio over data.max_aspect",
    "missing_content": "content prompt null or blank",
    "missing_style": "style description null or blank",
    "bad_content": "content prompt too short, too long or with control characters",
    "bad_style": "style description too short, too long or with control characters",
}
# Decoders we let near untrusted bytes; MegaStyle ships PNG. Others (PSD, EPS, ...) are refused unread.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class Rejected(Exception):
    """A row that cannot be used: `reason` is a code from REASONS, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class ValidRow:
    image: Image.Image  # RGB, 8-bit
    content: str
    style: str


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit RGB: alpha composited over white, 16-bit scaled (not clipped), CMYK converted."""
    try:
        im = ImageOps.exif_transpose(im)  # camera-rotated JPEGs
    except Exception:  # noqa: BLE001, S110 - malformed EXIF: keep the pixels as stored, not a reason to reject
        pass
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        # PIL's convert("RGB") clips 16-bit values at 255 (a white image): rescale 0..65535 -> 0..255 instead.
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, ...
    except Exception as e:  # noqa: BLE001 - PIL says "conversion not supported" in several ways
        raise Rejected("unsupported_mode", f"mode {im.mode}: {e}") from None


def decode_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Encoded bytes -> 8-bit RGB image; the declared size is checked before any pixel is decoded."""
    if not data:
        raise Rejected("missing_image", "null" if data is None else "0 bytes")
    with warnings.catch_warnings():
        # Our own limit below decides; PIL's global warning must not leak out as noise or as an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as e:
            raise Rejected("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from None
        except Exception as e:  # noqa: BLE001 - broken headers raise all sorts (SyntaxError, struct.error...)
            raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
        w, h = im.size
        if w * h > max_pixels:
            raise Rejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        try:
            im.load()  # first frame only for animated formats
        except Image.DecompressionBombError as e:
            raise Rejected("decompression_bomb", str(e)) from None
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data: OSError, ValueError, zlib.error...
            raise Rejected("decode_error", f"{im.format} {w}x{h}: {type(e).__name__}: {e}") from None
    return to_rgb(im)


def check_text(value: object, field: str, cfg: DataConfig) -> str:
    """A stripped prompt/description of sane length, or Rejected(missing_<field> | bad_<field>)."""
    if not isinstance(value, str) or not value.strip():
        raise Rejected(f"missing_{field}", "null" if value is None else repr(value)[:40])
    text = value.strip()
    if len(text) < cfg.min_text_chars:
        raise Rejected(f"bad_{field}", f"{len(text)} chars < {cfg.min_text_chars}")
    if len(text) > cfg.max_text_chars:
        raise Rejected(f"bad_{field}", f"{len(text)} chars > {cfg.max_text_chars}")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise Rejected(f"bad_{field}", "contains control characters")
    return text


def check_geometry(im: Image.Image, cfg: DataConfig) -> None:
    w, h = im.size
    if min(w, h) < cfg.min_side:
        raise Rejected("too_small", f"{w}x{h} < {cfg.min_side} px")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Rejected("bad_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect}")


def validate_row(data: bytes | None, content: object, style: object, cfg: DataConfig) -> ValidRow:
    """One row's image bytes and texts -> ValidRow, or Rejected. Text first: it is cheaper than decoding."""
    content = check_text(content, "content", cfg)
    style = check_text(style, "style", cfg)
    im = decode_image(data, cfg.max_pixels)
    check_geometry(im, cfg)
    return ValidRow(im, content, style)
