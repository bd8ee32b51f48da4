"""The images FID is computed from: a folder (generated samples) or shards (the reference set), and the
sizes they are brought to: a resolution is an int side (a square) or a (width, height) pair in pixels
(`size_of`, `as_resolution`, `resolution_record`; t2i.eval.sampling uses the same forms)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from t2i.errors import EvalError

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 40_000_000  # larger images (by their header) are skipped and counted as bad, never decoded

Resolution = Union[int, tuple[int, int]]  # a square's side, or (width, height), in pixels


# ----------------------------------------------------------------------------------------------
# Resolutions: an int side (square) or (width, height)
# ----------------------------------------------------------------------------------------------


def size_of(resolution) -> tuple[int, int]:
    """(width, height) of a resolution: an int side (a square), a (width, height) pair (tuple or JSON
    list), or text ("1216x832", "512"; t2i.buckets.parse_size)."""
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise EvalError(f"a size is (width, height), got {resolution!r}")
        return int(resolution[0]), int(resolution[1])
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        return int(resolution), int(resolution)
    from t2i.buckets import parse_size
    return parse_size(resolution)


def as_resolution(resolution) -> Resolution | None:
    """The one in-memory form: an int for a square (64, (64, 64) and "64x64" are all 64), a (width, height)
    tuple otherwise; None stays None (native size)."""
    if resolution is None:
        return None
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        return int(resolution)
    w, h = size_of(resolution)
    return w if w == h else (w, h)


def resolution_record(resolution) -> int | str | None:
    """How a resolution is written to JSON (manifests, reports, reference metas): an int for a square, as
    always; "WxH" (e.g. "1216x832") otherwise; None (native size) stays None."""
    r = as_resolution(resolution)
    return r if r is None or isinstance(r, int) else f"{r[0]}x{r[1]}"


def size_record(resolution) -> dict:
    """{"resolution", "width", "height"} for a manifest or report (width/height None for native size)."""
    if resolution is None:
        return {"resolution": None, "width": None, "height": None}
    w, h = size_of(resolution)
    return {"resolution": resolution_record(resolution), "width": w, "height": h}


def describe_resolution(resolution) -> str:
    """'64 px', '1216x832 px', or 'native size (not cropped)'."""
    r = resolution_record(resolution)
    return "native size (not cropped)" if r is None else f"{r} px"


@dataclass
class ImageSource:
    """RGB uint8 HWC images from a folder (recursive, sorted paths) or shards (shard order, tar order).

    Shard images are short-side resized and centre-cropped to `resolution` as training sees them
    (`resize_center_crop`); folder images only when `resolution` is given. A (width, height) resolution
    (not square) scales the image to cover it and centre-crops (t2i.data.decode.resize_cover_crop, as a
    bucketed run trains); an int, a (w, w) pair or "WxW" text is the square, exactly as before. `max_images` keeps the first N
    *entries* (files / tar samples); bad ones among them are skipped and counted in `counts`, so a rank of a
    distributed run can take its strided share without decoding the others.
    """

    folder: str | None = None
    shards: str | list | None = None
    resolution: Resolution | None = None
    max_images: int | None = None
    counts: dict = field(default_factory=lambda: {"good": 0, "image": 0, "read": 0})
    key: str = "--shards"           # the flag (or key) that gave `shards`, named in its errors

    def __post_init__(self):
        self.resolution = as_resolution(self.resolution)
        if (self.folder is None) == (self.shards is None):
            raise ValueError("ImageSource needs exactly one of folder= or shards=")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.folder is not None and not Path(self.folder).is_dir():
            raise EvalError(f"image folder not found: {self.folder}")
        if self.shards is not None and self.resolution is None:
            raise ValueError("a shard source needs resolution= (images are centre-cropped to it)")
        if self.shards is not None:  # a wrong spec fails here, naming its flag, before any extractor is built
            from t2i.data.shards import expand_shards
            expand_shards(self.shards, key=self.key)

    def describe(self) -> str:
        if self.folder is not None:
            return f"folder:{os.path.abspath(self.folder)}"
        return f"shards:{self.shards if isinstance(self.shards, str) else '::'.join(map(str, self.shards))}"

    def identity(self) -> str:
        """What the source resolves to, independent of how it was spelled: the folder's absolute path,
        or a digest of the expanded shard list (absolute paths) and its length."""
        if self.folder is not None:
            return f"folder:{os.path.abspath(self.folder)}"
        from t2i.data.shards import expand_shards

        urls = [u if (u.startswith("pipe:") or "://" in u) else os.path.abspath(u)
                for u in expand_shards(self.shards, key=self.key)]
        return f"shards:{len(urls)}:{hashlib.sha256(chr(10).join(urls).encode()).hexdigest()[:16]}"

    def files(self) -> list[Path]:
        files = sorted(p for p in Path(self.folder).rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
        return files[: self.max_images]

    def _entries(self) -> Iterator[Path | dict]:
        if self.folder is not None:
            yield from self.files()
            return
        from t2i.data.shards import expand_shards, manifest_counts, raw_samples

        urls = expand_shards(self.shards, key=self.key)
        samples = raw_samples(urls, self.counts, manifest_counts(urls))  # a damaged shard counts once
        for i, sample in enumerate(samples):
            if self.max_images is not None and i >= self.max_images:
                break
            yield sample

    def _decode(self, entry: Path | dict) -> np.ndarray | None:
        # t2i.data.loader imports t2i.config and with it open_clip/transformers (~3 s): only when needed
        from t2i.data.decode import IMAGE_KEYS, resize_center_crop

        try:
            if isinstance(entry, dict):
                key = next((k for k in IMAGE_KEYS if k in entry), None)
                if key is None:
                    return None
                opened = Image.open(io.BytesIO(entry[key]))
            else:
                opened = Image.open(entry)
            with opened as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:  # from the header: never decoded
                    return None
                im.load()
                image = im.convert("RGB")
            if isinstance(self.resolution, tuple):
                from t2i.data.decode import resize_cover_crop
                image = resize_cover_crop(image, self.resolution)
            elif self.resolution is not None:
                image = resize_center_crop(image, self.resolution)
            return np.asarray(image, dtype=np.uint8)
        except Exception:  # noqa: BLE001 - any decoder failure is a bad sample, counted, not a crash
            return None

    def iter_indexed(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(entry index, image) for the entries with index % world == rank; only those are decoded."""
        self.counts = {"good": 0, "image": 0, "read": 0}
        for i, entry in enumerate(self._entries()):
            if i % world != rank:
                continue
            image = self._decode(entry)
            if image is None:
                self.counts["image"] += 1
                continue
            self.counts["good"] += 1
            yield i, image

    def __iter__(self) -> Iterator[np.ndarray]:
        return (image for _, image in self.iter_indexed())

    def size_hint(self) -> int | None:
        return len(self.files()) if self.folder is not None else self.max_images

