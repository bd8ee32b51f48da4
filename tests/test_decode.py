"""The loader's image decode gives, bit for bit, the tensors of the straightforward implementation.

`reference_decode` below is written out independently of t2i.data.loader (it is the loader's
decode before it was optimised): decode with PIL, convert to RGB, bicubic resize of the short side
to the resolution (reducing_gap 3 when shrinking), centre crop, float32 x / 127.5 - 1 as (3, H, W).
"""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.decode import decode_sample, image_to_tensor


def reference_decode(data: bytes, resolution: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        image = im.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _smooth(rng, h, w, c):
    """Smooth content with full-range values (random corners, bilinear), so resampling matters."""
    corners = rng.integers(0, 256, (2, 2, c)).astype(np.float64)
    y, x = np.linspace(0, 1, h)[:, None, None], np.linspace(0, 1, w)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    img = top * (1 - y) + bottom * y + rng.integers(-20, 21, (h, w, c))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images():
    rng = np.random.default_rng(0)
    palette_src = Image.fromarray(_smooth(rng, 37, 53, 3))
    yield "rgb-jpeg", _encode(Image.fromarray(_smooth(rng, 61, 83, 3)), "JPEG", quality=90)
    yield "rgba-png", _encode(Image.fromarray(_smooth(rng, 45, 29, 4), "RGBA"), "PNG")
    yield "l-png", _encode(Image.fromarray(_smooth(rng, 33, 70, 1)[..., 0], "L"), "PNG")
    yield "l-jpeg", _encode(Image.fromarray(_smooth(rng, 40, 40, 1)[..., 0], "L"), "JPEG")
    yield "p-png", _encode(palette_src.quantize(colors=16), "PNG")
    yield "p-png-transparent", _encode(palette_src.quantize(colors=8), "PNG", transparency=3)
    yield "cmyk-jpeg", _encode(Image.fromarray(_smooth(rng, 50, 36, 4), "CMYK"), "JPEG", quality=85)
    yield "1x1", _encode(Image.new("RGB", (1, 1), (12, 200, 255)), "PNG")
    yield "very-wide", _encode(Image.fromarray(_smooth(rng, 9, 400, 3)), "PNG")
    yield "very-tall-jpeg", _encode(Image.fromarray(_smooth(rng, 300, 11, 3)), "JPEG")
    yield "exact-size", _encode(Image.fromarray(_smooth(rng, 16, 16, 3)), "PNG")
    yield "odd-upscale", _encode(Image.fromarray(_smooth(rng, 7, 5, 3)), "PNG")
    yield "webp", _encode(Image.fromarray(_smooth(rng, 48, 64, 3)), "WEBP", quality=80)


@pytest.mark.parametrize("resolution", [8, 16, 23])
@pytest.mark.parametrize("name,data", list(_images()), ids=[n for n, _ in _images()])
def test_decode_is_bit_identical_to_the_reference(name, data, resolution):
    ext = "jpg" if "jpeg" in name else "webp" if name == "webp" else "png"
    raw = {"__key__": name, ext: data, "txt": b"a caption"}
    sample, reason = decode_sample(raw, resolution, random.Random(0))
    assert reason is None
    got, want = sample["image"], reference_decode(data, resolution)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (3, resolution, resolution)
    assert torch.equal(got, want), f"{name} @ {resolution}: max |diff| {(got - want).abs().max().item()}"
    assert got.is_contiguous()
    assert sample["key"] == name and sample["caption"] == "a caption"


def test_image_to_tensor_covers_every_byte_value():
    values = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3))
    want = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(image_to_tensor(image), want)
    assert image_to_tensor(image).min() == -1.0 and image_to_tensor(image).max() == 1.0
