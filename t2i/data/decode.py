"""One raw sample -> (image tensor, caption): decode, resize the short side, centre-crop, [-1, 1].

No horizontal flips: captions state left/right, and a flip would make them wrong.

Captions go through `clean_caption`, the one rule for training, caching (t2i.data.cache) and sampling
prompts (t2i.eval.prompts): invalid UTF-8 (and lone surrogates from JSON escapes) becomes U+FFFD
(counted as "caption_invalid_utf8"), then the text is cut to `data.max_caption_bytes` UTF-8 bytes at a
character boundary (counted as "caption_truncated"), before any tokenizer sees it. Neither makes a
sample bad. Images with more than `data.max_image_pixels` pixels (read from the header; PIL opens
lazily) are bad ("image") without being decoded; so are images PIL itself refuses as decompression
bombs (its DecompressionBombError, or its warning when warnings are errors).
"""

from __future__ import annotations

import io
import json
import random
import re
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from t2i.buckets import BucketSet, Size
from t2i.config import DataConfig

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_NOTES = ("caption_truncated", "caption_invalid_utf8")  # counted, but not bad samples
MAX_CAPTION_BYTES = DataConfig.max_caption_bytes  # the config defaults
MAX_IMAGE_PIXELS = DataConfig.max_image_pixels
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_sample(raw: dict, resolution: int, rng: random.Random, *, max_caption_bytes: int = MAX_CAPTION_BYTES,
                  max_pixels: int = MAX_IMAGE_PIXELS, min_size: int = 0, counts: Optional[dict] = None,
                  buckets: Optional[BucketSet] = None, as_tensor: bool = True) -> tuple[Optional[dict], Optional[str]]:
    """(sample, None) or (None, bad reason). Image: short side -> resolution, centre crop, [-1, 1]; with
    `buckets` (t2i.buckets) cover-crop to the bucket its size falls in (sample["bucket"] = its index;
    0 without buckets), and the bad reason "aspect" when the size is out of the set's range: the size comes
    from the json (`width`, `height`) or, without it, the image header; no pixel is decoded to choose.
    `as_tensor=False` leaves the image a PIL RGB image (uint8: a quarter of the float tensor's bytes, for
    the loader's bucket buffers; t2i.data.decode.image_to_tensor converts it). Caption notes
    (CAPTION_NOTES) are added to `counts` when given."""
    caption = read_caption(raw, rng, max_bytes=max_caption_bytes, counts=counts)
    if not caption:
        return None, "caption"
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        return None, "image"
    bucket = 0
    if buckets is not None:
        size = metadata_size(raw)
        if size is not None:
            bucket = buckets.assign(*size)
            if bucket is None:
                return None, "aspect"
    try:
        with Image.open(io.BytesIO(raw[key])) as im:  # header only: PIL decodes in load()
            if too_large(im.size, max_pixels):
                return None, "image"
            if buckets is not None and size is None:
                bucket = buckets.assign(*im.size)
                if bucket is None:
                    return None, "aspect"
            if min(im.size) < min_size:  # would be upscaled to the training resolution
                return None, "small"
            im.load()
            # convert() of an RGB image is a plain copy: skip it (the same pixels, one copy less)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            image = (resize_center_crop(rgb, resolution) if buckets is None
                     else resize_cover_crop(rgb, buckets.sizes[bucket]))
    except Exception:  # any decoder failure is a bad sample, not a crash
        return None, "image"
    return {"key": raw["__key__"], "caption": caption, "bucket": bucket,
            "image": image_to_tensor(image) if as_tensor else image}, None


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


def too_large(size: tuple[int, int], max_pixels: int) -> bool:
    """More pixels than `max_pixels` (data.max_image_pixels), or than PIL's own decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS; PIL warns on open and would decode it)."""
    pixels = size[0] * size[1]
    return pixels > max_pixels or bool(Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS)


def clean_caption(text: Union[bytes, str], max_bytes: Optional[int] = MAX_CAPTION_BYTES,
                  counts: Optional[dict] = None) -> str:
    """The one caption rule (training, cache, sampling prompts): UTF-8 bytes or str -> stripped str with
    invalid UTF-8 / lone surrogates replaced by U+FFFD ("caption_invalid_utf8" += 1), then cut to at
    most `max_bytes` UTF-8 bytes at a character boundary ("caption_truncated" += 1; None: no cut)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text = text.decode("utf-8", errors="replace")
            _note(counts, "caption_invalid_utf8")
    elif _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
        _note(counts, "caption_invalid_utf8")
    text = text.strip()
    if max_bytes is not None and len(text) > max_bytes // 4:  # (a str of n chars has at most 4n bytes)
        encoded = text.encode("utf-8")
        if len(encoded) > max_bytes:
            text = encoded[:max_bytes].decode("utf-8", errors="ignore").rstrip()  # drops a cut character
            _note(counts, "caption_truncated")
    return text


def _note(counts: Optional[dict], key: str) -> None:
    if counts is not None:
        counts[key] = counts.get(key, 0) + 1


def caption_candidates(raw: dict, max_bytes: Optional[int] = MAX_CAPTION_BYTES) -> tuple[bool, list[tuple[str, dict]]]:
    """(picked at random?, [(caption, its notes)]): the `txt` caption if it is not empty, else the json's
    "caption" string or "captions" list (one is picked at random), every one through `clean_caption`."""
    if "txt" in raw:
        notes: dict = {}
        text = clean_caption(raw["txt"], max_bytes, notes)
        if text:
            return False, [(text, notes)]
    if "json" not in raw:
        return False, []
    blob: dict = {}
    try:
        meta = json.loads(clean_caption(raw["json"], None, blob).lstrip("\ufeff"))  # (json.loads(bytes) skips a BOM)
    except ValueError:
        return False, []
    field = meta.get("caption") or meta.get("captions") if isinstance(meta, dict) else None
    out = []
    for c in field if isinstance(field, list) else [field]:
        if isinstance(c, str):
            notes = dict(blob)
            text = clean_caption(c, max_bytes, notes)
            if text:
                out.append((text, notes))
    return isinstance(field, list), out


def read_caption(raw: dict, rng: random.Random, *, max_bytes: Optional[int] = MAX_CAPTION_BYTES,
                 counts: Optional[dict] = None) -> Optional[str]:
    """The caption of a raw sample (see caption_candidates; a list draws one choice from `rng`), or None.
    The notes of the caption returned are added to `counts` when given."""
    at_random, candidates = caption_candidates(raw, max_bytes)
    if not candidates:
        return None
    text, notes = rng.choice(candidates) if at_random else candidates[0]
    if counts is not None:
        for k, n in notes.items():
            counts[k] = counts.get(k, 0) + n
    return text


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Short side -> `size` (bicubic), centre crop to the square: resize_cover_crop at (size, size)."""
    return resize_cover_crop(image, (size, size))


def metadata_size(raw: dict) -> Optional[Size]:
    """(width, height) from the sample's json (`width` / `height`, as t2i make-shards and img2dataset
    write them), or None when absent or not positive integers."""
    blob = raw.get("json")
    if blob is None:
        return None
    try:
        meta = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    w, h = meta.get("width"), meta.get("height")
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool) and w > 0 and h > 0:
        return w, h
    return None


def header_size(data: bytes) -> Optional[Size]:
    """(width, height) from an image's header (PIL opens lazily: no pixel decode), or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 -- an unreadable image is counted bad where it is decoded
        return None


def resize_cover_crop(image: Image.Image, size: Size) -> Image.Image:
    """Scale (bicubic) so the image covers `size` = (width, height), then centre-crop to it (for a square
    size: short side -> side, the square crop every run without buckets trains on)."""
    W, H = size
    w, h = image.size
    scale = max(W / w, H / h)
    if scale != 1.0:
        image = image.resize((max(W, round(w * scale)), max(H, round(h * scale))), Image.BICUBIC,
                             reducing_gap=None if scale > 1 else 3.0)
    w, h = image.size
    left, top = (w - W) // 2, (h - H) // 2
    return image.crop((left, top, left + W, top + H))
