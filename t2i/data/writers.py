"""Write WebDataset tar shards: the synthetic shapes set, or a folder of images with .txt captions.

Shards are `<out_dir>/<prefix>-000000.tar, ...` with `samples_per_shard` samples each (the last
may be shorter), written by webdataset's `ShardWriter` as PAX tars with mtime 0, mode 0o444 and
fixed user/group, so the same inputs give byte-identical shards. Each shard is written to a hidden
temporary name (`.<prefix>-000000.tar.partial`, which no `*.tar` spec matches), flushed to disk and
renamed when complete: a killed or failed run never leaves a partial shard under a shard's name.
A `manifest.json` next to them (written last, atomically) lists shard names, per-shard sample counts
(the loader checks shards against them: t2i.data.shards), counts of skipped inputs and the arguments.

An `out_dir` that already holds `*.tar` shards or a manifest.json is refused (a DataError) unless
`overwrite=True` (--overwrite), which first deletes the manifest, the shards it lists (an earlier run
may have used another prefix), the `<prefix>-*.tar` shards and any partial leftovers: a stale shard
from a larger earlier run would otherwise be read with the new ones. `t2i make-shards` names shards
after the output folder (`default_prefix`) and prints the `data.shards` pattern (`shard_pattern`).
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

from t2i.data.decode import clean_caption
from t2i.data.shapes import MIN_SIZE, iter_samples
from t2i.errors import DataError
from t2i.io import fsync_dir, write_json

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Reproducible tar headers; PAX so keys longer than 100 characters (deep folder paths) still fit.
TAR_OPTIONS = dict(mtime=0, mode=0o444, user="t2i", group="t2i", format="PAX_FORMAT")


PARTIAL = ".partial"  # `.<prefix>-NNNNNN.tar.partial` while a shard is written


def default_prefix(out_dir) -> str:
    """The shard name prefix `t2i make-shards` uses without --prefix: the --out folder's own name
    (`data/mine` -> `mine`, so data.shards reads data/mine/mine-{000000..000003}.tar), characters
    other than letters, digits, `.`, `_` and `-` replaced by `_`."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(out_dir).resolve().name).strip(".")
    return name or "shards"


def shard_pattern(out_dir, prefix: str, n_shards: int) -> str:
    """The `data.shards` spec naming exactly the n shards written: a brace range, or the one file."""
    first = os.path.join(str(out_dir), f"{prefix}-{0:06d}.tar")
    if n_shards == 1:
        return first
    return os.path.join(str(out_dir), f"{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar")


def _manifest_shards(manifest: Path) -> list[Path]:
    """The shard files a make-shards manifest.json lists (none when it is missing or of another schema)."""
    try:
        names = [e["name"] for e in json.loads(manifest.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [manifest.parent / n for n in names if isinstance(n, str) and "/" not in n and n.endswith(".tar")]


class _Shards:
    """A ShardWriter opened on the first sample (so zero samples write zero shards) that counts per
    shard and publishes each shard (rename from its temporary name) only once it is complete."""

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int, overwrite: bool):
        if samples_per_shard < 1:
            raise DataError(f"--per-shard (samples_per_shard) must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix or "%" in prefix:
            raise DataError(f"--prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise DataError(f"--out {self.out_dir} is a file, not a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / "manifest.json"
        existing = sorted(p.name for p in self.out_dir.glob("*.tar"))
        if (existing or manifest.exists()) and not overwrite:
            what = f"{len(existing)} shard(s) ({existing[0]}, ...)" if existing else "a manifest.json"
            hint = "" if manifest.exists() else " (and no manifest.json: an earlier run may have been killed)"
            raise DataError(f"--out {self.out_dir} already holds {what}{hint}; pass --overwrite to replace "
                            f"them (the '{prefix}-*.tar' shards and those its manifest.json lists), or choose "
                            f"another --out")
        # the manifest first: a killed overwrite must not leave an old manifest next to new shards
        listed = _manifest_shards(manifest)  # an earlier run's shards, whatever prefix it used
        for path in [manifest, *listed, *self.out_dir.glob(f"{prefix}-*.tar"),
                     *self.out_dir.glob(f".{prefix}-*.tar{PARTIAL}")]:
            path.unlink(missing_ok=True)
        self.pattern = str(self.out_dir / f".{prefix}-%06d.tar{PARTIAL}")
        self.samples_per_shard = samples_per_shard
        self.writer = None
        self.counts: dict[str, int] = {}  # final shard path -> samples

    @staticmethod
    def final(partial: str) -> str:
        head, name = os.path.split(partial)
        return os.path.join(head, name[1:-len(PARTIAL)])

    @staticmethod
    def _publish(partial: str) -> None:
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, _Shards.final(partial))

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self.writer = wds.ShardWriter(self.pattern, maxcount=self.samples_per_shard, maxsize=float("inf"),
                                          verbose=0, post=self._publish, **TAR_OPTIONS)
        self.writer.write(sample)
        name = self.final(self.writer.fname)
        self.counts[name] = self.counts.get(name, 0) + 1

    def close(self) -> list[str]:
        """Finish and publish the last shard; the final paths of all shards."""
        if self.writer is not None:
            self.writer.close()
            fsync_dir(self.out_dir)
        return list(self.counts)

    def abort(self) -> None:
        """After a failure: close the shard being written without publishing it, and delete it."""
        if self.writer is not None and getattr(self.writer, "tarstream", None) is not None:
            partial = self.writer.fname
            self.writer.post = None
            try:
                self.writer.close()
            finally:
                Path(partial).unlink(missing_ok=True)

    def write_manifest(self, kind: str, args: dict, counts: dict) -> None:
        manifest = {
            "kind": kind,
            "args": args,
            "num_samples": sum(self.counts.values()),
            "num_shards": len(self.counts),
            "shards": [{"name": os.path.basename(f), "samples": n} for f, n in self.counts.items()],
            "counts": counts,
        }
        write_json(self.out_dir / "manifest.json", manifest, fsync=True)


def _write_all(shards: _Shards, samples) -> list[str]:
    """Write every sample; on any failure (or Ctrl-C) the shard in progress is deleted, not published."""
    try:
        for sample in samples:
            shards.write(sample)
    except BaseException:
        shards.abort()
        raise
    return shards.close()


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
        raise DataError(f"--n (n) must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise DataError(f"--size (size) must be >= {MIN_SIZE} px so the shapes stay recognisable, got {size}")
    shards = _Shards(out_dir, prefix, samples_per_shard, overwrite)
    paths = _write_all(shards, ({"__key__": key, "png": _png_bytes(image), "txt": caption, "json": _json_bytes(meta)}
                                for key, image, caption, meta in tqdm(iter_samples(n, seed, size), total=n,
                                                                      desc="shapes -> shards", unit="img",
                                                                      disable=not progress)))
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


def _read_caption_file(path: Path, counts: dict) -> str:
    """The stripped caption of a `.txt` file ("" if there is none); invalid UTF-8 -> U+FFFD, counted."""
    if not path.is_file():
        return ""
    return clean_caption(path.read_bytes(), None, counts)


def write_folder_shards(src_dir, out_dir, samples_per_shard: int = 1000, prefix: str = "images",
                        overwrite: bool = False, progress: bool = True) -> list[str]:
    """Shards from a folder tree of images (jpg/jpeg/png/webp) with same-name `.txt` captions.

    Image bytes are copied as they are under `jpg` / `png` / `webp`; `txt` is the stripped caption
    (invalid UTF-8 replaced by U+FFFD, counted as `caption_invalid_utf8`; not cut: the loader cuts to
    data.max_caption_bytes); `json` is `{"width", "height", "source"}` (size from the header; null
    when PIL cannot open the file, which is still copied so the loader skips and counts it). Images
    without a caption file, or with an empty one, are skipped and counted. Keys come from
    `sanitize_key`; a key that collides with an earlier one gets `_2`, `_3`, ... (counted as
    `renamed_keys`). Returns paths.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"--src {src}: source folder does not exist (or is not a folder)")
    images = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    counts = {"images_found": len(images), "written": 0, "skipped_no_caption": 0,
              "unreadable_image": 0, "renamed_keys": 0, "caption_invalid_utf8": 0}
    shards = _Shards(out_dir, prefix, samples_per_shard, overwrite)
    used: set[str] = set()

    def samples():
        for rel in tqdm(images, desc="folder -> shards", unit="img", disable=not progress):
            path = src / rel
            caption = _read_caption_file(path.with_suffix(".txt"), counts)
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
            yield {"__key__": key, IMAGE_EXTENSIONS[path.suffix.lower()]: path.read_bytes(), "txt": caption,
                   "json": _json_bytes({"width": width, "height": height, "source": rel})}
            counts["written"] += 1

    paths = _write_all(shards, samples())
    args = {"src_dir": str(src_dir), "samples_per_shard": samples_per_shard, "prefix": prefix}
    shards.write_manifest("folder", args, counts)
    print(f"folder -> shards: {counts['written']} samples in {len(paths)} shards under {out_dir}; "
          f"skipped {counts['skipped_no_caption']} without caption; "
          f"{counts['unreadable_image']} unreadable images copied with null size; "
          f"{counts['renamed_keys']} keys renamed to avoid collisions; "
          f"{counts['caption_invalid_utf8']} captions with invalid UTF-8 (replaced by U+FFFD)")
    return paths
