"""Precomputed, shard-aligned caches of text encodings and VAE posteriors (`t2i cache`, `data.cache`).

For every shard ``<name>.tar`` the cache folder holds ``<name>.safetensors`` (written to a temp name,
then renamed). A few large tensors per file, rows addressed through a JSON index:

    clip        [M, C, wl + wg]   CLIP-L | bigG penultimate states, without the zero padding to d_t5
    pooled      [M, eL + eG]      pooled CLIP vectors
    t5          [sum n_i, d_t5]   T5 states of caption i at rows t5_offsets[i]:t5_offsets[i+1]; n_i = the
                                  real token count (up to and including </s>) under text.t5_padding=zero
                                  (exact: the rest is 0), the full max_t5_tokens under keep
    t5_offsets  [M + 1] int64
    mean, std   [N, c, h, w]      VAE posterior of the image as training decodes it (identity VAE: `image`)
    index       uint8 JSON        {"samples": {key: [image row, {caption hash: text row}]},
                                   "bad": {key: "caption" | "image" | ...}}

With aspect-ratio buckets (data.buckets, t2i.buckets) each image is decoded as training decodes it
(cover-cropped to the bucket its size falls in; out of the set's aspect range: bad "aspect") and its
posterior is stored at its bucket's size, one tensor per bucket present in the shard:

    mean@WxH, std@WxH  [N_b, c, H/f, W/f]  (identity VAE: image@WxH [N_b, 3, H, W]), e.g. mean@1216x832
    index       uint8 JSON        {"samples": {key: [row in its bucket's tensors, {caption hash: text row},
                                                     "WxH"]}, "bad": {...}}

and the metadata's ``buckets`` holds the images per bucket ({"WxH": n} over the whole set). The VAE
encodes per bucket (a batch has one size). Without buckets the file is exactly the square format above.

M counts (sample, caption) pairs: every caption of a json ``captions`` list is encoded, since the
loader picks one at random. Captions go through the loader's rule (t2i.data.decode.clean_caption:
invalid UTF-8 -> U+FFFD, cut to data.max_caption_bytes), so the hashes training looks up match.
Floats are stored in bf16 unless ``--dtype float32``. The safetensors metadata holds the identity
JSON (encoders, VAE, resolution, crop rule, t5_padding, store dtype, format, data.max_caption_bytes
/ data.max_image_pixels when not at their defaults, and with data.buckets the bucket set and its crop
rule), ``identity_sha256`` (the hash of that identity WITHOUT store_dtype, which training accepts either
way), the source shard's size in bytes and its sample count (and its read / short-shard events and
caption notes). A file whose hash or shard size
differs from the current ones is stale and refused (``check_cache``), never silently used.

Training (``encode_batch``) rebuilds exactly what the encoders give: context = [pad_channels(clip);
pad_tokens(t5)], latents = (mean + std * randn(generator) - shift) * scale with the same generator
draws as ``latent_dist.sample(generator)``, then the same caption dropout.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from t2i.buckets import BucketSet, bucket_set
from t2i.data.decode import MAX_CAPTION_BYTES, MAX_IMAGE_PIXELS, caption_candidates, decode_sample, read_caption
from t2i.data.shards import manifest_counts, raw_samples
from t2i.errors import CacheError
from t2i.models.text_encoders import DTYPES

FORMAT_VERSION = 1
# Part of the cache identity (hashed): the text is kept verbatim so that existing caches stay valid.
CROP_RULE = "short side -> resolution (bicubic), centre crop, [-1, 1] (t2i.data.loader.decode_sample)"
# With data.buckets (identity key "bucket_crop", next to the bucket set under "buckets").
BUCKET_CROP_RULE = ("bucket nearest in log aspect (json width/height, else the image header); scale (bicubic) "
                    "to cover it, centre crop, [-1, 1] (t2i.data.decode.resize_cover_crop)")
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SUFFIX = ".safetensors"


# ----------------------------------------------------------------------------------------------
# Names and identity
# ----------------------------------------------------------------------------------------------


def shard_name(url: str) -> str:
    """`<name>` of the last `<name>.tar` in a path or `pipe:` command."""
    found = re.findall(r"([^/\s'\"]+)\.(?:tar|tgz|tar\.gz)\b", url)
    if not found:
        raise CacheError(f"data.cache: cannot tell the shard name of {url!r} (no <name>.tar in it)")
    return found[-1]


def cache_path(cache_dir, url: str) -> Path:
    """<cache_dir>/<name>-<8 hex of the shard's folder>.safetensors: two folders' `00000.tar` (img2dataset
    names every folder's shards alike) get different files. A cache written before the folder digest
    (`<name>.safetensors`) is still found."""
    named = Path(cache_dir) / f"{shard_name(url)}-{_folder_digest(url)}{SUFFIX}"
    legacy = Path(cache_dir) / (shard_name(url) + SUFFIX)
    return legacy if not named.exists() and legacy.exists() else named


def _folder_digest(url: str) -> str:
    where = url if ("://" in url or url.startswith("pipe:")) else str(Path(url).resolve().parent)
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def all_captions(raw: dict, max_bytes: Optional[int] = MAX_CAPTION_BYTES, counts: Optional[dict] = None) -> list[str]:
    """Every caption ``t2i.data.decode.read_caption`` can pick for this raw sample (the same rules, the
    same data.max_caption_bytes cut); the caption notes of each distinct one are added to `counts`."""
    out: dict[str, dict] = {}
    for text, notes in caption_candidates(raw, max_bytes)[1]:
        out.setdefault(text, notes)
    if counts is not None:
        for notes in out.values():
            for k, n in notes.items():
                counts[k] = counts.get(k, 0) + n
    return list(out)


def identity(text, vae, cfg) -> dict:
    """What a cache's contents depend on (without the store dtype). ``cfg`` is the full Config."""
    vae_id = dict(vae.identity())
    if vae.kind == "tiny":  # random weights from the run seed (FrozenVAE(cfg.vae, seed=cfg.run.seed))
        vae_id["seed"] = cfg.run.seed
    ident = {"format": FORMAT_VERSION, "text": text.identity(), "vae": vae_id,
             "resolution": cfg.data.resolution, "crop": CROP_RULE, "t5_padding": cfg.text.t5_padding}
    # The caption cut and pixel cap decide which caption rows and bad samples a cache holds; at their
    # defaults they are left out, so that caches written before these keys existed stay valid.
    for key, default in (("max_caption_bytes", MAX_CAPTION_BYTES), ("max_image_pixels", MAX_IMAGE_PIXELS),
                         ("min_size", 0)):
        value = getattr(cfg.data, key, default)
        if value != default:
            ident[key] = value
    # Buckets: only when on, so that square caches (and their hashes) stay what they were.
    buckets = bucket_set(getattr(cfg.data, "buckets", None), cfg.data.resolution)
    if buckets is not None:
        ident["buckets"] = buckets.identity()
        ident["bucket_crop"] = BUCKET_CROP_RULE
    return ident


def identity_hash(ident: dict) -> str:
    ident = {k: v for k, v in ident.items() if k != "store_dtype"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _bucket_text(ident: Optional[dict], digits: str = ".4g") -> str:
    if not ident:
        return "none (square images at data.resolution)"
    lo, hi = (ident.get(k) for k in ("min_aspect", "max_aspect"))
    aspects = " to ".join(format(v, digits) if isinstance(v, (int, float)) else repr(v) for v in (lo, hi))
    return f"[{', '.join(map(str, ident.get('sizes') or []))}] (aspects {aspects})"


def identity_diff(cached: dict, current: dict) -> list[str]:
    """'field: cache X, now Y' for every differing field (store_dtype is not compared). A changed bucket
    set is one entry, 'buckets (data.buckets): cache [sizes] (aspects ...), now ...'."""
    a, b = _flat(cached), _flat(current)
    out = {k: f"{k}: cache {a.get(k)!r}, now {b.get(k)!r}" for k in set(a) | set(b)
           if k != "store_dtype" and not k.startswith("buckets.") and a.get(k) != b.get(k)}
    if cached.get("buckets") != current.get("buckets"):
        was, now = _bucket_text(cached.get("buckets")), _bucket_text(current.get("buckets"))
        if was == now:  # aspects that differ past 4 digits
            was, now = _bucket_text(cached.get("buckets"), ""), _bucket_text(current.get("buckets"), "")
        out["buckets"] = f"buckets (data.buckets): cache {was}, now {now}"
        if not cached.get("buckets") or not current.get("buckets"):
            out.pop("bucket_crop", None)  # follows from the line above
    return [out[k] for k in sorted(out)]


def _local_size(url: str) -> Optional[int]:
    return None if url.startswith("pipe:") or "://" in url else os.path.getsize(url)


def read_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def problem(path: Path, url: str, ident: dict, store_dtype: Optional[str] = None) -> Optional[str]:
    """Why the cache file of `url` cannot be used ('missing', or the stale reason), or None.
    With `store_dtype`, a file stored in another dtype counts as stale too (the tool rewrites it)."""
    if not path.is_file():
        return "missing"
    try:
        meta = read_meta(path)
    except Exception as e:  # noqa: BLE001 -- a truncated / foreign file is stale, whatever the error
        return f"unreadable ({type(e).__name__}: {e})"
    if meta.get("identity_sha256") != identity_hash(ident):
        try:
            diff = identity_diff(json.loads(meta.get("identity", "{}")), ident)
        except ValueError:
            diff = []
        return "identity differs in " + ("; ".join(diff) if diff else "its hash")
    size = _local_size(url)
    if size is not None and meta.get("shard_bytes") not in (None, "", str(size)):
        return f"shard size changed: cache built from {meta['shard_bytes']} bytes, {url} has {size} now"
    if store_dtype is not None and meta.get("store_dtype") != store_dtype:
        return f"stored in {meta.get('store_dtype')}, not {store_dtype}"
    return None


def check_unique_names(cache_dir, urls: list[str]) -> None:
    """One cache file per shard: the same shard listed twice (one folder, one name) would collide."""
    names = collections.Counter(cache_path(cache_dir, u).name for u in urls)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise CacheError(f"data.cache={cache_dir}: {len(clash)} shard name(s) occur more than once in "
                         f"data.shards (first: {clash[0]}.tar), so their cache files would collide")


def check_cache(cache_dir, urls: list[str], ident: dict) -> None:
    """Every shard must have a cache file built with the current identity from the same shard, else
    raise CacheError naming the folder, the counts, the first missing / stale file and why."""
    check_unique_names(cache_dir, urls)
    missing, stale = [], []
    for url in urls:
        path = cache_path(cache_dir, url)
        why = problem(path, url, ident)
        if why == "missing":
            missing.append(path)
        elif why:
            stale.append((path, why))
    if not missing and not stale:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(urls)} shard cache file(s) missing (first: {missing[0]})")
    if stale:
        parts.append(f"{len(stale)} stale (first: {stale[0][0]}: {stale[0][1]})")
    raise CacheError(f"data.cache={cache_dir}: " + " and ".join(parts) + "; a stale cache is never used: "
                     f"rebuild it with `t2i cache --config <this config> --out {cache_dir}` (or unset data.cache)")


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class _Encoder:
    """Batches of images and captions of one shard -> stored-dtype CPU rows."""

    def __init__(self, text, vae, cfg, store: torch.dtype, device):
        self.text, self.vae, self.cfg, self.store, self.device = text, vae, cfg, store, device
        self.clip_width = text.clip_l.width + text.clip_g.width
        self.rows: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        self.t5_lengths: list[int] = []

    @torch.no_grad()
    def images(self, images: list[torch.Tensor], bucket: Optional[str] = None) -> None:
        """Encode images of one size; with `bucket` ("WxH") their rows go to `<name>@<bucket>`."""
        at = "" if bucket is None else f"@{bucket}"
        x = torch.stack(images).to(self.device)
        if self.vae.vae is None:
            self.rows["image" + at].append(x.to("cpu", self.store))
            return
        dist = self.vae.vae.encode(x.to(self.vae.vae.dtype)).latent_dist
        self.rows["mean" + at].append(dist.mean.to("cpu", self.store))
        self.rows["std" + at].append(dist.std.to("cpu", self.store))

    @torch.no_grad()
    def captions(self, captions: list[str]) -> None:
        text, C = self.text, self.text.cfg.clip_context
        context, pooled = text.encode(captions)
        if self.cfg.text.t5_padding == "zero":
            lengths = text.t5_lengths(text.tokenize(captions)["t5"]).tolist()
        else:
            lengths = [text.cfg.max_t5_tokens] * len(captions)
        self.rows["clip"].append(context[:, :C, :self.clip_width].to("cpu", self.store))
        self.rows["pooled"].append(pooled.to("cpu", self.store))
        t5 = context[:, C:].to("cpu", self.store)
        self.rows["t5"] += [t5[i, :n] for i, n in enumerate(lengths)]
        self.t5_lengths += lengths

    def tensors(self, bucketed: bool = False) -> dict[str, torch.Tensor]:
        """The file's tensors. `bucketed`: the image rows are per bucket (`<name>@WxH`, only the buckets
        present), instead of one square `mean`/`std`/`image` (present even when empty)."""
        text, vae, C = self.text, self.vae, self.text.cfg.clip_context
        shapes = {"clip": (C, self.clip_width), "pooled": (text.pooled_dim,), "t5": (text.context_dim,)}
        names = ("image",) if vae.vae is None else ("mean", "std")
        if bucketed:
            shapes.update({n: () for n in sorted(self.rows) if "@" in n})  # never empty
        else:
            side = vae.latent_size(self.cfg.data.resolution)
            shapes.update({n: (vae.latent_channels, side, side) for n in names})
        out = {n: torch.cat(self.rows[n]).contiguous() if self.rows[n] else torch.zeros((0, *shape), dtype=self.store)
               for n, shape in shapes.items()}
        out["t5_offsets"] = torch.tensor([0] + self.t5_lengths, dtype=torch.int64).cumsum(0)
        return out


def write_shard(url: str, out_dir, text, vae, cfg, store_dtype: str = "bfloat16", batch_size: int = 32,
                device="cpu", progress: Optional[Callable[[int], None]] = None) -> Path:
    """Encode one shard into ``out_dir/<name>.safetensors`` (temp file + atomic rename). With data.buckets
    every image is decoded at its bucket's size and encoded in batches of one bucket."""
    store = STORE_DTYPES[store_dtype]
    enc = _Encoder(text, vae, cfg, store, device)
    index: dict = {"samples": {}, "bad": {}}
    counts = {"read": 0, "short_shard": 0, "caption_truncated": 0, "caption_invalid_utf8": 0}
    max_bytes = getattr(cfg.data, "max_caption_bytes", MAX_CAPTION_BYTES)
    max_pixels = getattr(cfg.data, "max_image_pixels", MAX_IMAGE_PIXELS)
    buckets = bucket_set(getattr(cfg.data, "buckets", None), cfg.data.resolution)
    names = buckets.names if buckets is not None else [None]
    images: list[list] = [[] for _ in names]  # pending images per bucket (one list without buckets)
    per_bucket = [0] * len(names)  # rows written per bucket
    captions: list = []
    n_images = n_texts = n_samples = 0

    def flush(force: bool = False):
        nonlocal captions
        for b, pending in enumerate(images):
            if pending and (force or len(pending) >= batch_size):
                enc.images(pending, names[b])
                images[b] = []
        while captions and (force or len(captions) >= batch_size):
            enc.captions(captions[:batch_size])
            captions = captions[batch_size:]

    for raw in raw_samples([url], counts, manifest_counts([url])):
        n_samples += 1
        key = raw["__key__"]
        sample, reason = decode_sample(raw, cfg.data.resolution, random.Random(0), max_caption_bytes=max_bytes,
                                       max_pixels=max_pixels, min_size=getattr(cfg.data, "min_size", 0),
                                       buckets=buckets)
        if sample is None:
            index["bad"][key] = reason
        else:
            rows = {}
            for caption in all_captions(raw, max_bytes, counts):
                rows[caption_hash(caption)] = n_texts
                captions.append(caption)
                n_texts += 1
            b = sample["bucket"] if buckets is not None else 0
            index["samples"][key] = [n_images, rows] if buckets is None else [per_bucket[b], rows, names[b]]
            images[b].append(sample["image"])
            per_bucket[b] += 1
            n_images += 1
        flush()
        if progress:
            progress(1)
    flush(force=True)
    tensors = enc.tensors(bucketed=buckets is not None)
    tensors["index"] = torch.frombuffer(bytearray(json.dumps(index).encode()), dtype=torch.uint8)
    ident = dict(identity(text, vae, cfg), store_dtype=store_dtype)
    size = _local_size(url)
    meta = {"format": str(FORMAT_VERSION), "identity": json.dumps(ident, sort_keys=True),
            "identity_sha256": identity_hash(ident), "store_dtype": store_dtype, "shard": url,
            "shard_bytes": "" if size is None else str(size), "samples": str(n_samples),
            "images": str(n_images), "captions": str(n_texts), "read_errors": str(counts["read"]),
            "short_shard": str(counts["short_shard"]), "captions_truncated": str(counts["caption_truncated"]),
            "captions_invalid_utf8": str(counts["caption_invalid_utf8"]),
            "t5_tokens": "trimmed" if cfg.text.t5_padding == "zero" else "full"}
    if buckets is not None:  # (a square file's metadata is what it always was)
        meta["buckets"] = json.dumps(dict(zip(names, per_bucket)))
    out = cache_path(out_dir, url)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; a shared cache is read by other users
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# Reader (inside the loader's workers) and the training side
# ----------------------------------------------------------------------------------------------


class ShardCache:
    """One open cache file: the index in memory, rows read lazily (mmap) by slice."""

    def __init__(self, path: Path):
        self.file = safe_open(str(path), framework="pt")
        self.index = json.loads(bytes(self.file.get_tensor("index").numpy()).decode())
        self.offsets = self.file.get_tensor("t5_offsets").tolist()
        names = set(self.file.keys())
        self.image_names = ("image",) if any(n.split("@")[0] == "image" for n in names) else ("mean", "std")
        self.slices = {n: self.file.get_slice(n) for n in ("clip", "pooled", "t5") + self.image_names
                       if n in names}  # (a bucketed file has `<name>@WxH` instead: opened when first read)

    def _slice(self, name: str):
        if name not in self.slices:
            self.slices[name] = self.file.get_slice(name)
        return self.slices[name]

    def lookup(self, key: str, caption: str, buckets: Optional[BucketSet] = None
               ) -> tuple[Optional[dict], Optional[str], int]:
        """(rows, None, bucket) or (None, bad reason, 0). `bucket`: the entry's bucket's index in
        `buckets` (0 for a square file). An entry whose bucket is not in `buckets` (or a bucketed entry
        read without buckets, or a square one with) is bad "cache": a matching identity rules it out."""
        entry = self.index["samples"].get(key)
        if entry is None:
            return None, self.index["bad"].get(key, "cache"), 0
        image_row, rows = entry[0], entry[1]
        name = entry[2] if len(entry) > 2 else None
        if (name is None) != (buckets is None) or (name is not None and name not in buckets.names):
            return None, "cache", 0
        row = rows.get(caption_hash(caption))
        if row is None:
            return None, "cache", 0
        s = self.slices
        at = "" if name is None else f"@{name}"
        out = {n: self._slice(n + at)[image_row:image_row + 1][0] for n in self.image_names}
        out["clip"] = s["clip"][row:row + 1][0]
        out["pooled"] = s["pooled"][row:row + 1][0]
        out["t5"] = s["t5"][self.offsets[row]:self.offsets[row + 1]]
        return out, None, 0 if name is None else buckets.index(name)


class CacheReader:
    """Samples from cache files instead of decoded images: ``sample(raw, rng)`` replaces
    ``decode_sample`` (same caption pick and RNG draws, same bad reasons, plus "cache")."""

    def __init__(self, cache_dir, max_open: int = 8, max_caption_bytes: Optional[int] = MAX_CAPTION_BYTES):
        self.cache_dir, self.max_open, self.max_caption_bytes = cache_dir, max_open, max_caption_bytes
        self.open: collections.OrderedDict[str, ShardCache] = collections.OrderedDict()

    def shard(self, url: str) -> ShardCache:
        if url in self.open:
            self.open.move_to_end(url)
        else:
            self.open[url] = ShardCache(cache_path(self.cache_dir, url))
            while len(self.open) > self.max_open:
                self.open.popitem(last=False)
        return self.open[url]

    def sample(self, raw: dict, rng: random.Random, counts: Optional[dict] = None,
               buckets: Optional[BucketSet] = None) -> tuple[Optional[dict], Optional[str]]:
        """The sample's cached rows ("cache") and "bucket", its bucket's index in `buckets` (0 without)."""
        caption = read_caption(raw, rng, max_bytes=self.max_caption_bytes, counts=counts)
        if not caption:
            return None, "caption"
        try:
            cached, reason, bucket = self.shard(raw["__url__"]).lookup(raw["__key__"], caption, buckets)
        except Exception:  # noqa: BLE001 -- an unreadable cache file: a bad sample, not a crash
            return None, "cache"
        if cached is None:
            return None, reason
        return {"key": raw["__key__"], "caption": caption, "cache": cached, "bucket": bucket}, None


def collate(items: list[dict]) -> dict:
    """Stack cached rows; T5 rows are zero-padded to the longest in the batch."""
    out = {n: torch.stack([c[n] for c in items]) for n in items[0] if n != "t5"}
    n = max(c["t5"].shape[0] for c in items)
    out["t5"] = torch.stack([F.pad(c["t5"], (0, 0, 0, n - c["t5"].shape[0])) for c in items])
    return out


def conditioning(text, cached: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, C + T, d_t5], pooled) as ``text.encode`` returns them, before caption dropout."""
    dtype, device = DTYPES[text.cfg.dtype], text.t5.device
    clip = cached["clip"].to(device, dtype)
    t5 = cached["t5"].to(device, dtype)
    clip = F.pad(clip, (0, text.context_dim - clip.shape[-1]))
    t5 = F.pad(t5, (0, 0, 0, text.cfg.max_t5_tokens - t5.shape[1]))
    return torch.cat([clip, t5], dim=-2), cached["pooled"].to(device, dtype)


def latents(vae, cached: dict, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """What ``vae.encode(images, generator)`` returns, from the stored posterior: the same randn draw
    (shape of the mean, VAE dtype, on the generator's device) as diffusers' latent_dist.sample."""
    if vae.vae is None:
        return cached["image"].to(device, torch.float32)
    dtype = vae.vae.dtype
    mean, std = cached["mean"].to(device, dtype), cached["std"].to(device, dtype)
    noise = torch.randn(mean.shape, generator=generator, dtype=dtype,
                        device=generator.device if generator is not None else device).to(device)
    return (mean + std * noise - vae.shift_factor) * vae.scaling_factor
