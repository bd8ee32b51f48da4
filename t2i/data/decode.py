"""One raw sample -> (image tensor, caption): decode, resize the short side, centre-crop, [-1, 1].

No horizontal flips: captions state left/right, and a flip would make them wrong.
"""

from __future__ import annotations

import io
import json
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def decode_sample(raw: dict, resolution: int, rng: random.Random) -> tuple[Optional[dict], Optional[str]]:
    """(sample, None) or (None, bad reason). Image: short side -> resolution, centre crop, [-1, 1]."""
    caption = read_caption(raw, rng)
    if not caption:
        return None, "caption"
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        return None, "image"
    try:
        with Image.open(io.BytesIO(raw[key])) as im:
            im.load()
            # convert() of an RGB image is a plain copy: skip it (the same pixels, one copy less)
            image = resize_center_crop(im if im.mode == "RGB" else im.convert("RGB"), resolution)
    except Exception:  # any decoder failure is a bad sample, not a crash
        return None, "image"
    return {"key": raw["__key__"], "caption": caption, "image": image_to_tensor(image)}, None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> contiguous float32 (3, H, W) tensor, x / 127.5 - 1 in float32 (so in [-1, 1]).

    One channel-first copy, then in-place numpy ops: bit for bit the values of
    `np.asarray(image, np.float32) / 127.5 - 1.0` permuted to CHW, but contiguous, so that collate's
    torch.stack is a plain copy (a permuted view made it a strided gather), and single-threaded
    numpy, so no intra-op thread pool is woken per sample.
    """
    array = np.asarray(image)
    out = np.empty((3,) + array.shape[:2], dtype=np.float32)
    np.copyto(out, array.transpose(2, 0, 1))  # uint8 -> float32 is exact
    out /= 127.5
    out -= 1.0
    return torch.from_numpy(out)


def read_caption(raw: dict, rng: random.Random) -> Optional[str]:
    if "txt" in raw:
        text = raw["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            return None
        caps = meta.get("caption") or meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(caps, list):
            caps = [c for c in caps if isinstance(c, str) and c.strip()]
            return rng.choice(caps).strip() if caps else None
        if isinstance(caps, str) and caps.strip():
            return caps.strip()
    return None


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    if scale != 1.0:
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC,
                             reducing_gap=None if scale > 1 else 3.0)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
