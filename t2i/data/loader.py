"""Streaming WebDataset shards with a resumable position and counted bad samples.

Shards are read with webdataset's tar reader (local paths, `pipe:` commands, anything `gopen`
opens). What webdataset does not give us, and is written here:

* **Exact resume.** Each (rank, worker) slot reads an infinite, deterministic stream: epoch e
  permutes the shard list with seed (seed, e), the slot takes its share, a seeded shuffle buffer
  mixes it. The position (epoch, samples yielded in that epoch) travels with every batch; the
  checkpoint stores it per worker, and a resumed stream replays that epoch's *raw* samples
  (no image decode) up to the position, so the next sample is the next unseen one.
* **Splitting.** With at least as many shards as slots, slots take disjoint shards; with fewer,
  every slot reads all shards and keeps every n-th sample (so 2 ranks still work on 1 shard).
* **Bad samples** (undecodable image, missing caption, unreadable/truncated tar member) are
  skipped and counted per reason; counts ride along with the batches and are checkpointed.

No horizontal flips: captions state left/right, and a flip would make them wrong.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from t2i.config import DataConfig

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
BAD_REASONS = ("image", "caption", "read", "cache")  # cache: a sample missing from its data.cache file


class DataError(RuntimeError):
    """Too many bad samples, or no shards to read."""


# ----------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------


def expand_shards(spec) -> list[str]:
    """Brace patterns, lists, `::`-joined lists, directories (*.tar), list files, `pipe:` URLs."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls: list[str] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item.startswith("pipe:") or "://" in item:
            urls += list(braceexpand.braceexpand(item))
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise DataError(f"data.shards: directory {item} holds no .tar shards")
            urls += found
        elif path.is_file() and path.suffix not in (".tar", ".tgz", ".gz"):
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            urls += expand_shards([ln for ln in lines if ln and not ln.startswith("#")])
        else:
            urls += list(braceexpand.braceexpand(item))
    missing = [u for u in urls if not (u.startswith("pipe:") or "://" in u) and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"data.shards: {len(missing)} shard(s) not found: {missing[:3]}{more}")
    if not urls:
        raise DataError(f"data.shards={spec!r} names no shards")
    return urls


def slot_plan(urls: list[str], epoch: int, seed: int, slot: int, n_slots: int) -> tuple[list[str], int, int]:
    """(shards, stride, offset) of one slot in one epoch: keep samples i with i % stride == offset."""
    order = list(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= n_slots:
        return order[slot::n_slots], 1, 0
    return order, n_slots, slot


# ----------------------------------------------------------------------------------------------
# One slot's stream
# ----------------------------------------------------------------------------------------------


def _raw_samples(urls: list[str], counts: dict) -> Iterator[dict]:
    """Undecoded samples (dict of bytes) from tar shards; read errors are counted, not raised."""
    def handler(exn):
        counts["read"] += 1
        return True
    for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
        yield sample


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Seeded reservoir shuffle (webdataset's shuffle seeds from pid/time, so it cannot replay)."""
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def decode_sample(raw: dict, resolution: int, rng: random.Random) -> tuple[Optional[dict], Optional[str]]:
    """(sample, None) or (None, bad reason). Image: short side -> resolution, centre crop, [-1, 1]."""
    caption = _caption(raw, rng)
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


def _caption(raw: dict, rng: random.Random) -> Optional[str]:
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


def slot_stream(urls: list[str], cfg: DataConfig, seed: int, slot: int, n_slots: int,
                epoch: int = 0, index: int = 0, counts: Optional[dict] = None) -> Iterator[dict]:
    """Infinite stream of decoded samples for one slot, starting after `index` samples of `epoch`.

    Each sample carries `pos` = (epoch, samples yielded so far in the epoch) and the cumulative bad
    counts, so whoever consumes it can checkpoint exactly where the stream stands.
    """
    counts = dict(counts) if counts else {r: 0 for r in BAD_REASONS}
    counts.setdefault("good", 0)
    reader = None
    if cfg.cache:  # precomputed encodings (t2i.cache): the tar gives keys, captions and order only
        from t2i.cache import CacheReader
        reader = CacheReader(cfg.cache)
    while True:
        shards, stride, offset = slot_plan(urls, epoch, seed, slot, n_slots)
        rng = random.Random(f"{seed}-{epoch}-{slot}")
        reads = {"read": 0}  # read errors of this epoch; those met while replaying are already counted
        read_base, replayed = counts["read"], 0
        raw = (s for i, s in enumerate(_raw_samples(shards, reads)) if i % stride == offset)
        position = 0
        yielded_any = False
        for item in _shuffled(raw, cfg.shuffle_buffer, rng):
            position += 1
            if position <= index:  # fast-forward on resume: no decode, but the same RNG draws
                _caption(item, rng)
                replayed = reads["read"]
                continue
            counts["read"] = read_base + reads["read"] - replayed
            sample, reason = (reader.sample(item, rng) if reader is not None
                              else decode_sample(item, cfg.resolution, rng))
            if sample is None:
                counts[reason] = counts.get(reason, 0) + 1
                continue
            counts["good"] += 1
            yielded_any = True
            sample["pos"] = (epoch, position)
            sample["counts"] = dict(counts)
            yield sample
        counts["read"] = read_base + reads["read"] - replayed
        if not yielded_any and index == 0:
            raise DataError(f"slot {slot}/{n_slots} read no usable sample in epoch {epoch} from {len(shards)} "
                            f"shard(s); bad counts so far: {counts}")
        epoch, index = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Per-rank loader
# ----------------------------------------------------------------------------------------------


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's share; DataLoader worker j plays logical worker (j + first_worker) % W so that a
    resumed loader continues the round-robin order of the interrupted one."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int, rank: int, world_size: int,
                 workers: dict, first_worker: int):
        super().__init__()
        self.urls, self.cfg, self.seed = urls, cfg, seed
        self.rank, self.world_size = rank, world_size
        self.workers, self.first_worker = workers, first_worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.first_worker) % n_workers
        state = self.workers.get(logical, {})
        stream = slot_stream(self.urls, self.cfg, self.seed, slot=self.rank * n_workers + logical,
                             n_slots=self.world_size * n_workers, epoch=state.get("epoch", 0),
                             index=state.get("index", 0), counts=state.get("counts"))
        for sample in stream:
            sample["worker"] = logical
            yield sample


def collate(samples: list[dict]) -> dict:
    last = samples[-1]
    batch = {"captions": [s["caption"] for s in samples],
             "keys": [s["key"] for s in samples], "worker": last["worker"], "pos": last["pos"],
             "counts": last["counts"]}
    if "cache" in last:  # data.cache: stored encodings instead of images (t2i.cache.collate)
        from t2i.cache import collate as collate_cached
        batch["cache"] = collate_cached([s["cache"] for s in samples])
    else:  # default_collate stacks straight into shared memory inside a worker: one copy fewer
        batch["images"] = torch.utils.data.default_collate([s["image"] for s in samples])
    return batch


@dataclass
class LoaderState:
    """Where each logical worker of one rank stands; stored per rank in checkpoints."""
    num_workers: int
    next_worker: int
    workers: dict  # logical worker -> {"epoch", "index", "counts"}


class TrainLoader:
    """Infinite iterator of batches for one rank, with `state_dict()` for exact resume."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int, batch_size: int,
                 state: Optional[dict] = None, cache_identity: Optional[dict] = None):
        """`cache_identity` (t2i.cache.identity of the frozen encoders): required with data.cache; every
        shard's cache file must match it (t2i.cache.check_cache), else a CacheError (a DataError)."""
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards)
        if cfg.cache:
            from t2i.cache import check_cache
            if cache_identity is None:
                raise DataError("data.cache is set but the loader was given no cache_identity "
                                "(t2i.cache.identity(text, vae, cfg)) to check the cache against")
            check_cache(cfg.cache, self.urls, cache_identity)
        n_workers = max(1, cfg.num_workers)
        if state is not None and state["num_workers"] != n_workers:
            raise DataError(f"checkpoint was written with data.num_workers={state['num_workers']}; "
                            f"resuming with {cfg.num_workers} would change the sample order")
        self.state = LoaderState(n_workers, 0, {}) if state is None else LoaderState(**state)
        self.dataset = ShardDataset(self.urls, cfg, seed, rank, world_size, dict(self.state.workers),
                                    self.state.next_worker)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, num_workers=cfg.num_workers, collate_fn=collate,
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
        self._it: Optional[Iterator] = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        epoch, index = batch["pos"]
        self.state.workers[batch["worker"]] = {"epoch": epoch, "index": index, "counts": batch["counts"]}
        self.state.next_worker = (batch["worker"] + 1) % self.state.num_workers
        self.check_bad_fraction()
        return batch

    def state_dict(self) -> dict:
        return {"num_workers": self.state.num_workers, "next_worker": self.state.next_worker,
                "workers": {k: dict(v) for k, v in self.state.workers.items()}}

    def counts(self) -> dict:
        total = {r: 0 for r in BAD_REASONS + ("good",)}
        for w in self.state.workers.values():
            for r, n in w["counts"].items():
                total[r] = total.get(r, 0) + n
        return total

    def check_bad_fraction(self) -> None:
        c = self.counts()
        bad = sum(c[r] for r in BAD_REASONS)
        seen = bad + c["good"]
        if seen >= self.cfg.bad_check_after and bad / seen > self.cfg.max_bad_fraction:
            raise DataError(f"{bad} of {seen} samples on this rank were bad ({bad / seen:.1%} > "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction:.1%}); by reason: "
                            + ", ".join(f"{r}={c[r]}" for r in BAD_REASONS))
