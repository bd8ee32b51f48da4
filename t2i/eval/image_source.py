"""The images FID is computed from: a folder (generated samples) or shards (the reference set)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.errors import EvalError

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 40_000_000  # larger images (by their header) are skipped and counted as bad, never decoded


@dataclass
class ImageSource:
    """RGB uint8 HWC images from a folder (recursive, sorted paths) or shards (shard order, tar order).

    Shard images are short-side resized and centre-cropped to `resolution` as training sees them
    (`resize_center_crop`); folder images only when `resolution` is given. `max_images` keeps the first N
    *entries* (files / tar samples); bad ones among them are skipped and counted in `counts`, so a rank of a
    distributed run can take its strided share without decoding the others.
    """

    folder: str | None = None
    shards: str | list | None = None
    resolution: int | None = None
    max_images: int | None = None
    counts: dict = field(default_factory=lambda: {"good": 0, "image": 0, "read": 0})
    key: str = "--shards"           # the flag (or key) that gave `shards`, named in its errors

    def __post_init__(self):
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
            if self.resolution is not None:
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

