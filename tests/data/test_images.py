"""User reference images are normalised exactly like training rows: `load_image_file`, `decode` and the API's image
path give the data path's pixels for 16-bit, transparent and EXIF-rotated files, refuse formats it refuses, and
leave the toy pipeline's plain 8-bit RGB PNGs bit-identical."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from i2l.config import get_config
from i2l.data.images import MAX_PIXELS, decode, load_image_file, to_tensor
from i2l.data.validate import decode_image
from i2l.infer.api import I2L

CFG = get_config("debug")  # encoder.image_size 32


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 64 wide x 32 high, left half red; EXIF orientation 6 says: shown rotated to 32 x 64 (portrait)."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (220, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(a, "RGB"), "JPEG", quality=95, exif=exif.tobytes())


# Files a user might pass whose bare convert("RGB") differs from the data path, with what the data path shows.
CASES = {
    "gray16": (lambda: encode(Image.fromarray(np.full((32, 32), 128 * 257, np.uint16))),  # mid-gray, not white
               lambda a: (a == 128).all()),
    "transparent": (lambda: encode(Image.new("RGBA", (32, 32), (255, 0, 0, 0))),  # hidden red under alpha 0
                    lambda a: (a == 255).all()),
    "exif_rotated": (exif_rotated_jpeg, lambda a: a.shape == (64, 32, 3) and a[:28, :, 0].min() > 180),
}


def data_path(data: bytes, size: int | None = None) -> torch.Tensor:
    """What `prepare` makes of the same bytes, as a tensor."""
    return to_tensor([decode_image(data, MAX_PIXELS)], size)


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_files_decode_like_training_rows(name, tmp_path):
    make, looks_right = CASES[name]
    data = make()
    path = tmp_path / f"{name}.{'jpg' if 'exif' in name else 'png'}"
    path.write_bytes(data)
    im = load_image_file(path)
    assert im.mode == "RGB" and looks_right(np.asarray(im)), f"{name}: {im.size} {np.asarray(im)[0, 0]}"
    assert torch.equal(to_tensor([im]), data_path(data))
    assert torch.equal(to_tensor([decode(data)]), data_path(data))


@pytest.mark.parametrize("name", sorted(CASES))
def test_api_image_path_matches_the_data_path(name, tmp_path):
    """`I2L.predict_lora`'s references (a path, or a PIL image opened by the user) become the training tensor."""
    data = CASES[name][0]()
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    model = SimpleNamespace(cfg=CFG)  # `_images` reads only the encoder's image size
    want = data_path(data, CFG.encoder.image_size)
    assert torch.equal(I2L._images(model, [path]), want)
    assert torch.equal(I2L._images(model, [Image.open(io.BytesIO(data))]), want)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "EPS"])
def test_formats_the_data_path_refuses_are_refused_naming_the_file(fmt, tmp_path):
    path = tmp_path / f"ref.{fmt.lower()}"
    path.write_bytes(encode(Image.new("RGB", (32, 32), (10, 20, 30)), fmt))
    with pytest.raises(ValueError, match=rf"cannot read image .*ref\.{fmt.lower()}: bytes are not an image of an "
                                         "allowed format"):
        load_image_file(path)
    with pytest.raises(ValueError, match=r"ref\.\w+: bytes are not an image"):
        I2L._images(SimpleNamespace(cfg=CFG), [path])
    with pytest.raises(ValueError, match="cannot read image s0_c1: bytes are not an image"):
        decode(path.read_bytes(), name="s0_c1")  # `produce` names the reference


def test_unknown_and_truncated_files_are_clear_errors(tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"just some text, not an image")
    with pytest.raises(ValueError, match="cannot read image .*notes.png: bytes are not an image"):
        load_image_file(junk)
    cut = tmp_path / "cut.png"
    cut.write_bytes(encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(ValueError, match="cannot read image .*cut.png: image data corrupt"):
        load_image_file(cut)


def test_plain_rgb_png_pixels_are_unchanged(tmp_path):
    """The toy world's images (8-bit RGB PNG, no EXIF) decode to the same pixels as a bare open + convert."""
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(a, "RGB"))
    (tmp_path / "toy.png").write_bytes(data)
    for im in (decode(data), load_image_file(tmp_path / "toy.png")):
        assert np.array_equal(np.asarray(im), a)
    raw = Image.open(io.BytesIO(data))
    assert torch.equal(to_tensor([raw], 16), to_tensor([raw.convert("RGB")], 16))
