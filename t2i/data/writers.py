"""Write WebDataset tar shards: the synthetic shapes set, or a folder of images with .txt captions.

Both keep the images' aspect ratios and record each sample's size as json `width` / `height`, which
bucketed training (t2i.buckets, `data.buckets`) reads to choose a bucket without decoding pixels.
A folder's images are copied byte for byte (any aspect ratio; `square=SIZE` / --square instead writes
each one short-side resized and centre-cropped to SIZE × SIZE); shapes are square unless `aspects`
(--aspects) gives sizes, taken in turn, on which the square rendering is padded with background.

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

from t2i.buckets import Size, parse_size, size_name
from t2i.data.decode import clean_caption, resize_center_crop
from t2i.data.shapes import MIN_SIZE, iter_samples, make_sample_sized
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


def parse_aspects(spec) -> list[Size]:
    """`--aspects`: "64x64,96x64,64x96" (or a sequence of "WxH" strings / (w, h) pairs) -> [(w, h), ...]
    (width x height, t2i.buckets.parse_size; a bare "64" is 64x64). Each side must be >= MIN_SIZE."""
    parts = [p for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    if not parts:
        raise DataError(f"--aspects: give at least one size, WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {spec!r}")
    sizes = [tuple(p) if isinstance(p, (tuple, list)) else parse_size(p, key="--aspects") for p in parts]
    for w, h in sizes:
        if not (isinstance(w, int) and isinstance(h, int)) or w < MIN_SIZE or h < MIN_SIZE:
            raise DataError(f"--aspects: each side must be >= {MIN_SIZE} px so the shapes stay recognisable, "
                            f"got {w}x{h}")
    return sizes


def _sized_samples(n: int, seed: int, sizes: list[Size]):
    for index in range(n):
        width, height = sizes[index % len(sizes)]
        image, caption, meta = make_sample_sized(index, seed, width, height)
        yield f"{index:08d}", image, caption, meta


def write_shapes_shards(out_dir, n: int, samples_per_shard: int = 1000, seed: int = 0, size: int = 64,
                        prefix: str = "shapes", overwrite: bool = False, progress: bool = True,
                        aspects=None) -> list[str]:
    """Shards of `t2i.data.shapes` samples 0..n-1: `png`, `txt` (caption), `json` (ground truth). Returns paths.

    Without `aspects` every image is size × size (byte-identical to the shards written before `aspects`
    existed). With `aspects` (`parse_aspects`: "64x64,96x64,64x96" or [(w, h), ...]) sample i is
    aspects[i % len(aspects)] = W × H: `t2i.data.shapes.make_sample_sized`, the square of side min(W, H)
    centred on background, boxes shifted, json width/height = W, H; `size` is then unused, and the
    manifest's args hold `aspects` (as "WxH" names) instead of `size`."""
    if n < 1:
        raise DataError(f"--n (n) must be >= 1, got {n}")
    args = {"n": n, "samples_per_shard": samples_per_shard, "seed": seed, "size": size, "prefix": prefix}
    if aspects is None:
        if size < MIN_SIZE:
            raise DataError(f"--size (size) must be >= {MIN_SIZE} px so the shapes stay recognisable, got {size}")
        samples = iter_samples(n, seed, size)
    else:
        sizes = parse_aspects(aspects)
        del args["size"]
        args["aspects"] = [size_name(s) for s in sizes]
        samples = _sized_samples(n, seed, sizes)
    shards = _Shards(out_dir, prefix, samples_per_shard, overwrite)
    paths = _write_all(shards, ({"__key__": key, "png": _png_bytes(image), "txt": caption, "json": _json_bytes(meta)}
                                for key, image, caption, meta in tqdm(samples, total=n, desc="shapes -> shards",
                                                                      unit="img", disable=not progress)))
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


PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
SAVE_MODES = {"JPEG": ("L", "RGB", "CMYK"), "PNG": ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"),
              "WEBP": ("RGB", "RGBA")}


def _is_lossless_webp(data: bytes) -> bool:
    """A WebP whose (first) image chunk is VP8L (lossless) rather than VP8 (lossy); animations count as lossy."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    pos = 12
    while pos + 8 <= len(data):
        fourcc, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if fourcc in (b"VP8L", b"VP8 ", b"ANMF"):
            return fourcc == b"VP8L"
        pos += 8 + length + (length & 1)
    return False


def _square_bytes(data: bytes, ext: str, size: int) -> bytes | None:
    """`data` (an image stored under `ext`) short-side resized (bicubic) and centre-cropped to size × size
    (t2i.data.decode.resize_center_crop), re-encoded in the same format: PNG (lossless), JPEG quality 95,
    WebP lossless when the source is lossless else quality 95. The first frame of an animation; the ICC
    profile is kept, other metadata (EXIF included) are not. None when PIL cannot decode (or re-encode) it."""
    fmt = PIL_FORMATS[ext]
    options = {"JPEG": {"quality": 95}, "PNG": {},
               "WEBP": {"lossless": True} if _is_lossless_webp(data) else {"quality": 95}}[fmt]
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image, icc = im, im.info.get("icc_profile")
            if image.mode in ("1", "P", "PA"):  # resize would fall back to nearest for these
                has_alpha = image.mode == "PA" or "transparency" in image.info
                image = image.convert("RGBA" if has_alpha else ("L" if image.mode == "1" else "RGB"))
            image = resize_center_crop(image, size)
        if image.mode not in SAVE_MODES[fmt]:
            image = image.convert("RGBA" if "A" in image.mode and fmt != "JPEG" else "RGB")
        buf = io.BytesIO()
        image.save(buf, format=fmt, **options, **({"icc_profile": icc} if icc else {}))
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - copied as it is and counted, as an unreadable header is
        return None


def _read_caption_file(path: Path, counts: dict) -> str:
    """The stripped caption of a `.txt` file ("" if there is none); invalid UTF-8 -> U+FFFD, counted."""
    if not path.is_file():
        return ""
    return clean_caption(path.read_bytes(), None, counts)


def write_folder_shards(src_dir, out_dir, samples_per_shard: int = 1000, prefix: str = "images",
                        overwrite: bool = False, progress: bool = True, square: int | None = None) -> list[str]:
    """Shards from a folder tree of images (jpg/jpeg/png/webp) with same-name `.txt` captions.

    Image bytes are copied as they are under `jpg` / `png` / `webp`, so each image keeps its size and
    aspect ratio (for bucketed training, t2i.buckets); `txt` is the stripped caption (invalid UTF-8
    replaced by U+FFFD, counted as `caption_invalid_utf8`; not cut: the loader cuts to
    data.max_caption_bytes); `json` is `{"width", "height", "source"}` (size from the header; null
    when PIL cannot open the file, which is still copied so the loader skips and counts it).

    `square=SIZE` (--square) instead writes each image short-side resized (bicubic) and centre-cropped
    to SIZE × SIZE, re-encoded in the format its extension names (`_square_bytes`: PNG stays PNG, JPEG at
    quality 95, WebP lossless or quality 95 as the source), json width/height = SIZE, SIZE; an image PIL
    cannot decode is copied as it is with a null size and counted as `unreadable_image`, as without it.

    Images without a caption file, or with an empty one, are skipped and counted. Keys come from
    `sanitize_key`; a key that collides with an earlier one gets `_2`, `_3`, ... (counted as
    `renamed_keys`). The manifest's args record `square` (null: sizes kept). Returns paths.
    """
    if square is not None and (isinstance(square, bool) or not isinstance(square, int) or square < 1):
        raise DataError(f"--square (square) must be a positive number of pixels, got {square!r}")
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
            ext = IMAGE_EXTENSIONS[path.suffix.lower()]
            data = path.read_bytes()
            if square is None:
                width, height = _image_size(path)
            else:
                resized = _square_bytes(data, ext, square)
                width = height = None if resized is None else square
                data = data if resized is None else resized
            counts["unreadable_image"] += width is None
            yield {"__key__": key, ext: data, "txt": caption,
                   "json": _json_bytes({"width": width, "height": height, "source": rel})}
            counts["written"] += 1

    paths = _write_all(shards, samples())
    args = {"src_dir": str(src_dir), "samples_per_shard": samples_per_shard, "prefix": prefix, "square": square}
    shards.write_manifest("folder", args, counts)
    print(f"folder -> shards: {counts['written']} samples in {len(paths)} shards under {out_dir}; "
          f"skipped {counts['skipped_no_caption']} without caption; "
          f"{counts['unreadable_image']} unreadable images copied with null size; "
          f"{counts['renamed_keys']} keys renamed to avoid collisions; "
          f"{counts['caption_invalid_utf8']} captions with invalid UTF-8 (replaced by U+FFFD)")
    return paths
