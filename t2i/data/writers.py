"""Write WebDataset tar shards: the synthetic shapes set, or a folder of images with .txt captions.

Shards are `<out_dir>/<prefix>-000000.tar, ...` with `samples_per_shard` samples each (the last
may be shorter), written by webdataset's `ShardWriter` as PAX tars with mtime 0, mode 0o444 and
fixed user/group, so the same inputs give byte-identical shards. A `manifest.json` next to them lists
shard names, per-shard sample counts, counts of skipped inputs and the arguments.

An existing `<prefix>-*.tar` in `out_dir` is refused unless `overwrite=True`, which deletes them
first: a stale shard from a larger earlier run would otherwise be read with the new ones.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from t2i.data.shapes import iter_samples

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Reproducible tar headers; PAX so keys longer than 100 characters (deep folder paths) still fit.
TAR_OPTIONS = dict(mtime=0, mode=0o444, user="t2i", group="t2i", format="PAX_FORMAT")


class _Shards:
    """A ShardWriter opened on the first sample (so zero samples write zero shards) that counts per shard."""

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int, overwrite: bool):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix or "%" in prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if stale and not overwrite:
            raise FileExistsError(f"{self.out_dir} already has {len(stale)} '{prefix}-*.tar' shards; "
                                  f"pass overwrite=True (--overwrite) or another out dir / prefix")
        for path in stale:
            path.unlink()
        self.pattern = str(self.out_dir / f"{prefix}-%06d.tar")
        self.samples_per_shard = samples_per_shard
        self.writer = None
        self.counts: dict[str, int] = {}

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self.writer = wds.ShardWriter(self.pattern, maxcount=self.samples_per_shard, maxsize=float("inf"),
                                          verbose=0, **TAR_OPTIONS)
        self.writer.write(sample)
        self.counts[self.writer.fname] = self.counts.get(self.writer.fname, 0) + 1

    def close(self) -> list[str]:
        if self.writer is not None:
            self.writer.close()
        return list(self.counts)

    def write_manifest(self, kind: str, args: dict, counts: dict) -> None:
        manifest = {
            "kind": kind,
            "args": args,
            "num_samples": sum(self.counts.values()),
            "num_shards": len(self.counts),
            "shards": [{"name": os.path.basename(f), "samples": n} for f, n in self.counts.items()],
            "counts": counts,
        }
        (self.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless; PIL writes no timestamp chunk
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def write_shapes_shards(out_dir, n: int, samples_per_shard: int = 1000, seed: int = 0, size: int = 64,
                        prefix: str = "shapes", overwrite: bool = False, progress: bool = True) -> list[str]:
    """Shards of `t2i.data.shapes` samples 0..n-1: `png`, `txt` (caption), `json` (ground truth). Returns paths."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shards = _Shards(out_dir, prefix, samples_per_shard, overwrite)
    try:
        for key, image, caption, meta in tqdm(iter_samples(n, seed, size), total=n, desc="shapes -> shards",
                                              unit="img", disable=not progress):
            shards.write({"__key__": key, "png": _png_bytes(image), "txt": caption, "json": _json_bytes(meta)})
    finally:
        paths = shards.close()
    args = {"n": n, "samples_per_shard": samples_per_shard, "seed": seed, "size": size, "prefix": prefix}
    shards.write_manifest("shapes", args, {"written": n})
    return paths


def sanitize_key(relative_path: str) -> str:
    """Relative path without its extension, every character outside [A-Za-z0-9_-] (dots, slashes) -> '_'."""
    stem = os.path.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _image_size(path: Path) -> tuple[int | None, int | None]:
    """(width, height) from the image header (no pixel decode), or (None, None) if PIL cannot open it."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable file is only counted; the loader skips it
        return None, None


def write_folder_shards(src_dir, out_dir, samples_per_shard: int = 1000, prefix: str = "images",
                        overwrite: bool = False, progress: bool = True) -> list[str]:
    """Shards from a folder tree of images (jpg/jpeg/png/webp) with same-name `.txt` captions.

    Image bytes are copied as they are under `jpg` / `png` / `webp`; `txt` is the stripped caption;
    `json` is `{"width", "height", "source"}` (size from the header; null when PIL cannot open the
    file, which is still copied so the loader skips and counts it). Images without a caption file,
    or with an empty one, are skipped and counted. Keys come from `sanitize_key`; a key that
    collides with an earlier one gets `_2`, `_3`, ... (counted as `renamed_keys`). Returns paths.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise NotADirectoryError(f"source folder {src} does not exist")
    images = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    counts = {"images_found": len(images), "written": 0, "skipped_no_caption": 0,
              "unreadable_image": 0, "renamed_keys": 0}
    shards = _Shards(out_dir, prefix, samples_per_shard, overwrite)
    used: set[str] = set()
    try:
        for rel in tqdm(images, desc="folder -> shards", unit="img", disable=not progress):
            path = src / rel
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
            if not caption:
                counts["skipped_no_caption"] += 1
                continue
            key = base = sanitize_key(rel)
            k = 1
            while key in used:
                k += 1
                key = f"{base}_{k}"
            counts["renamed_keys"] += key != base
            used.add(key)
            width, height = _image_size(path)
            counts["unreadable_image"] += width is None
            shards.write({"__key__": key, IMAGE_EXTENSIONS[path.suffix.lower()]: path.read_bytes(), "txt": caption,
                          "json": _json_bytes({"width": width, "height": height, "source": rel})})
            counts["written"] += 1
    finally:
        paths = shards.close()
    args = {"src_dir": str(src_dir), "samples_per_shard": samples_per_shard, "prefix": prefix}
    shards.write_manifest("folder", args, counts)
    print(f"folder -> shards: {counts['written']} samples in {len(paths)} shards under {out_dir}; "
          f"skipped {counts['skipped_no_caption']} without caption; "
          f"{counts['unreadable_image']} unreadable images copied with null size; "
          f"{counts['renamed_keys']} keys renamed to avoid collisions")
    return paths
