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
* **Bad samples** are skipped and counted once per reason (BAD_REASONS): "image" (undecodable, or
  over data.max_image_pixels), "caption" (none), "read" (a shard the reader failed on: cut inside a
  member, corrupt), "short_shard" (a shard that ends early without error: no end-of-archive marker,
  or fewer samples than its make-shards manifest.json lists; see t2i.data.shards), "cache" (missing
  from data.cache), "small" (under data.min_size), "aspect" (outside data.buckets' range). A shard event is counted by the one slot that owns the sample index where it
  happened, so a shard read by several slots (fewer shards than slots) still counts once.
  Captions cut to data.max_caption_bytes or with invalid UTF-8 are counted too (CAPTION_NOTES) but
  are not bad. Counts ride along with the batches and are checkpointed; a checkpoint whose counts
  lack a key (written before it existed) resumes with that key at 0.
* **Buckets** (data.buckets, t2i.buckets, docs/design/buckets.md). Each slot batches its own
  stream: a sample joins its bucket's buffer, and a buffer that reaches the micro-batch size is one
  micro-batch (of one size). Without buckets there is one bucket, the square, and this is plain
  consecutive batching. Every slot's stream is infinite, so every rank always has its next batch: no
  rank waits for another, and no epoch end can leave one without. A buffer holds at most
  micro_batch - 1 samples (a full one is emitted at once), decoded uint8 at its bucket's size; the
  samples waiting in the buffers are part of the state as their (epoch, position) in the slot's
  stream, and a resume re-reads them (an older epoch's too) without counting them again. Samples out
  of the bucket set's aspect range are bad ("aspect"); per-bucket image counts ride in the counts as
  "bucket/WxH".

No horizontal flips: captions state left/right, and a flip would make them wrong.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from t2i.config import DataConfig
from t2i.buckets import BucketSet, bucket_set
from t2i.data.cache import CacheReader, collate as collate_cached
from t2i.data.decode import CAPTION_NOTES, decode_sample, image_to_tensor, read_caption
from t2i.data.shards import SHARD_EVENTS, expand_shards, manifest_counts, read_shards, slot_plan
from t2i.errors import DataError

log = logging.getLogger(__name__)

# cache: a sample missing from its data.cache file; read / short_shard: t2i.data.shards SHARD_EVENTS
BAD_REASONS = ("image", "caption", "read", "cache", "short_shard", "small", "aspect")  # small: under
# data.min_size; aspect: outside data.buckets' aspect range
COUNT_KEYS = BAD_REASONS + CAPTION_NOTES + ("good",)  # CAPTION_NOTES are counted, but not bad


# ----------------------------------------------------------------------------------------------
# One slot's stream
# ----------------------------------------------------------------------------------------------


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


def _slot_share(items: Iterator[dict], stride: int, offset: int, events: dict, slot: str) -> Iterator[dict]:
    """The samples i (over the epoch's shards) with i % stride == offset; a shard event (read /
    short_shard) is counted in `events` and logged only by the slot that owns the index it happened at."""
    i = 0
    for item in items:
        reason = item.get("__event__")
        if reason is not None:
            if i % stride == offset:
                events[reason] += 1
                log.warning("%s (counted as bad '%s' by slot %s)", item["__detail__"], reason, slot)
            continue
        if i % stride == offset:
            yield item
        i += 1


def _epoch_items(urls, cfg: DataConfig, seed: int, slot: int, n_slots: int, epoch: int, expected: dict,
                 events: dict) -> tuple[random.Random, Iterator[dict], int]:
    """(the slot's RNG for `epoch`, its shuffled raw samples, its shard count); shard events go to `events`."""
    shards, stride, offset = slot_plan(urls, epoch, seed, slot, n_slots)
    rng = random.Random(f"{seed}-{epoch}-{slot}")
    raw = _slot_share(read_shards(shards, expected), stride, offset, events, f"{slot}/{n_slots}")
    return rng, _shuffled(raw, cfg.shuffle_buffer, rng), len(shards)


def slot_stream(urls: list[str], cfg: DataConfig, seed: int, slot: int, n_slots: int,
                epoch: int = 0, index: int = 0, counts: Optional[dict] = None,
                expected: Optional[dict] = None, buckets: Optional[BucketSet] = None,
                waiting: Iterable = (), as_tensor: bool = True) -> Iterator[dict]:
    """Infinite stream of decoded samples for one slot, starting after `index` samples of `epoch`.

    Each sample carries `pos` = (epoch, samples yielded so far in the epoch), `bucket` (its index in
    `buckets`; 0 without) and the cumulative counts (COUNT_KEYS), so whoever consumes it can checkpoint
    exactly where the stream stands. `expected`: {url: samples} from the shards' manifests (default: read
    with t2i.data.shards.manifest_counts). `waiting`: (epoch, position) of samples at or before the start
    that a consumer still held (a checkpoint's bucket buffers); they come first, in stream order, marked
    `replayed` (their counts are already in `counts`). `as_tensor=False`: images stay PIL (uint8).
    """
    counts = {k: 0 for k in COUNT_KEYS} | dict(counts or {})  # an older checkpoint may lack new keys
    expected = manifest_counts(urls) if expected is None else expected
    reader = None
    if cfg.cache:  # precomputed encodings (t2i.data.cache): the tar gives keys, captions and order only
        reader = CacheReader(cfg.cache, max_caption_bytes=cfg.max_caption_bytes)

    def decode(item, rng, counts):
        if reader is not None:
            return reader.sample(item, rng, counts, buckets=buckets)
        return decode_sample(item, cfg.resolution, rng, max_caption_bytes=cfg.max_caption_bytes,
                             max_pixels=cfg.max_image_pixels, min_size=cfg.min_size, counts=counts,
                             buckets=buckets, as_tensor=as_tensor)

    def replayed(item, rng, e, position):
        sample, reason = decode(item, rng, None)  # counted when it was first read
        if sample is None:  # the shard changed since: it cannot rejoin its bucket
            log.warning("slot %d/%d: waiting sample %s (epoch %d, position %d) no longer decodes (%s) on resume; "
                        "dropped", slot, n_slots, item.get("__key__"), e, position, reason)
            return None
        return sample | {"pos": (e, position), "replayed": True}

    held = sorted({(int(e), int(p)) for e, p in waiting})
    for old in sorted({e for e, _ in held if e < epoch}):  # waiting samples of earlier epochs: re-read them
        wanted = {p for e, p in held if e == old}
        rng, items, _ = _epoch_items(urls, cfg, seed, slot, n_slots, old, expected, {k: 0 for k in SHARD_EVENTS})
        for position, item in enumerate(items, 1):
            if position in wanted:
                if (sample := replayed(item, rng, old, position)) is not None:
                    yield sample
                if position == max(wanted):
                    break
            else:
                read_caption(item, rng, max_bytes=cfg.max_caption_bytes)
    wanted = {p for e, p in held if e == epoch}
    while True:
        # Shard events are met while reading ahead of the shuffle buffer: those met while replaying to
        # `index` are already in the checkpointed counts, so counts = base + events - replayed.
        events = {k: 0 for k in SHARD_EVENTS}
        base, before = {k: counts[k] for k in SHARD_EVENTS}, dict(events)
        rng, items, n_shards = _epoch_items(urls, cfg, seed, slot, n_slots, epoch, expected, events)
        position = 0
        yielded_any = False
        for item in items:
            position += 1
            if position <= index:  # fast-forward on resume: no decode (but of waiting samples), same RNG draws
                if position in wanted:
                    if (sample := replayed(item, rng, epoch, position)) is not None:
                        yield sample
                else:
                    read_caption(item, rng, max_bytes=cfg.max_caption_bytes)
                before = dict(events)
                continue
            for k in SHARD_EVENTS:
                counts[k] = base[k] + events[k] - before[k]
            sample, reason = decode(item, rng, counts)
            if sample is None:
                counts[reason] = counts.get(reason, 0) + 1
                continue
            counts["good"] += 1
            yielded_any = True
            sample["pos"] = (epoch, position)
            sample["counts"] = dict(counts)
            yield sample
        for k in SHARD_EVENTS:
            counts[k] = base[k] + events[k] - before[k]
        if not yielded_any and index == 0:
            raise DataError(f"slot {slot}/{n_slots} read no usable sample in epoch {epoch} from {n_shards} "
                            f"shard(s); bad counts so far: {counts}")
        epoch, index, wanted = epoch + 1, 0, set()


def bucket_batches(stream: Iterator[dict], batch_size: int, names: Optional[list[str]], epoch: int = 0,
                   index: int = 0, counts: Optional[dict] = None) -> Iterator[dict]:
    """One slot's micro-batches: each sample joins its bucket's buffer; a buffer of `batch_size` samples
    is emitted as one batch (collate). Every batch carries the slot's `state` after it: the stream
    position of the last sample read (epoch, index), the counts (with "bucket/<WxH>" += the batch), and
    `waiting`, the (epoch, position) of every sample still in a buffer, oldest first. `epoch`, `index`,
    `counts`: the state the stream starts from (a resume; its replayed waiting samples come first).
    `names`: the buckets' names, or None without buckets (one buffer; no per-bucket counts, so a square
    run's state is what it was before buckets existed)."""
    buffers: list[list[dict]] = [[] for _ in names or [None]]
    counts = {k: 0 for k in COUNT_KEYS} | dict(counts or {})
    emitted = {k: n for k, n in counts.items() if k.startswith("bucket/")}  # the stream's counts lack them
    for sample in stream:
        if not sample.get("replayed"):
            (epoch, index), counts = sample["pos"], sample["counts"]
        buffer = buffers[sample["bucket"]]
        buffer.append(sample)
        while len(buffer) >= batch_size:  # (more than one batch only after a forced smaller micro-batch)
            batch, buffer[:] = buffer[:batch_size], buffer[batch_size:]
            out = collate(batch)
            if names is not None:
                out["bucket"] = name = names[batch[0]["bucket"]]
                emitted[f"bucket/{name}"] = emitted.get(f"bucket/{name}", 0) + batch_size
            out["state"] = {"epoch": epoch, "index": index, "counts": counts | emitted,
                            "waiting": sorted(s["pos"] for b in buffers for s in b)}
            yield out


# ----------------------------------------------------------------------------------------------
# Per-rank loader
# ----------------------------------------------------------------------------------------------


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's share, as micro-batches (bucket_batches); DataLoader worker j plays logical worker
    (j + first_worker) % W so that a resumed loader continues the round-robin order of the interrupted one."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int, rank: int, world_size: int,
                 workers: dict, first_worker: int, batch_size: int, expected: Optional[dict] = None):
        super().__init__()
        self.urls, self.cfg, self.seed, self.expected = urls, cfg, seed, expected
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.workers, self.first_worker = workers, first_worker
        self.buckets = bucket_set(cfg.buckets, cfg.resolution)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.first_worker) % n_workers
        state = self.workers.get(logical, {})
        epoch, index, counts = state.get("epoch", 0), state.get("index", 0), state.get("counts")
        stream = slot_stream(self.urls, self.cfg, self.seed, slot=self.rank * n_workers + logical,
                             n_slots=self.world_size * n_workers, epoch=epoch, index=index, counts=counts,
                             expected=self.expected, buckets=self.buckets, waiting=state.get("waiting", ()),
                             as_tensor=False)
        names = self.buckets.names if self.buckets else None
        for batch in bucket_batches(stream, self.batch_size, names, epoch, index, counts):
            batch["worker"] = logical
            yield batch


def collate(samples: list[dict]) -> dict:
    """Captions, keys, and the stacked images (PIL images converted here: t2i.data.decode.image_to_tensor)
    or cached encodings of samples of one size."""
    batch = {"captions": [s["caption"] for s in samples], "keys": [s["key"] for s in samples]}
    if "cache" in samples[-1]:  # data.cache: stored encodings instead of images (t2i.data.cache.collate)
        batch["cache"] = collate_cached([s["cache"] for s in samples])
    else:  # default_collate stacks straight into shared memory inside a worker: one copy fewer
        images = [s["image"] if isinstance(s["image"], torch.Tensor) else image_to_tensor(s["image"]) for s in samples]
        batch["images"] = torch.utils.data.default_collate(images)
    return batch


def _as_is(batch: dict) -> dict:
    return batch  # the dataset yields whole batches (DataLoader batch_size=None)


@dataclass
class LoaderState:
    """Where each logical worker of one rank stands; stored per rank in checkpoints."""
    num_workers: int
    next_worker: int
    workers: dict  # logical worker -> {"epoch", "index", "counts"[, "waiting": [(epoch, position)]]}


class TrainLoader:
    """Infinite iterator of batches for one rank, with `state_dict()` for exact resume."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int, batch_size: int,
                 state: Optional[dict] = None, cache_identity: Optional[dict] = None):
        """`cache_identity` (t2i.data.cache.identity of the frozen encoders): required with data.cache; every
        shard's cache file must match it (t2i.data.cache.check_cache), else a CacheError (a DataError)."""
        self.cfg = cfg
        self.buckets = bucket_set(cfg.buckets, cfg.resolution)
        self.urls = expand_shards(cfg.shards, allow_pipe_in_lists=cfg.allow_pipe_in_lists)
        self.expected = manifest_counts(self.urls)  # per-shard sample counts of make-shards manifests
        slots = world_size * max(1, cfg.num_workers)
        if rank == 0 and len(self.urls) < slots:
            log.warning("data.shards: %d shard(s) for %d reading slots (%d rank(s) x %d worker(s)): every slot "
                        "reads all shards and keeps 1/%d of their samples, so each shard is read %dx (its "
                        "samples decoded once); write at least %d shards (t2i make-shards --per-shard) for disjoint reads",
                        len(self.urls), slots, world_size, max(1, cfg.num_workers), slots, slots, slots)
        if cfg.cache:
            from t2i.data.cache import check_cache
            if cache_identity is None:
                raise DataError("data.cache is set but the loader was given no cache_identity "
                                "(t2i.data.cache.identity(text, vae, cfg)) to check the cache against")
            check_cache(cfg.cache, self.urls, cache_identity)
        n_workers = max(1, cfg.num_workers)
        if state is not None and state["num_workers"] != n_workers:
            raise DataError(f"checkpoint was written with data.num_workers={state['num_workers']}; "
                            f"resuming with {cfg.num_workers} would change the sample order")
        self.state = LoaderState(n_workers, 0, {}) if state is None else LoaderState(
            state["num_workers"], state["next_worker"], state["workers"])
        names = self.buckets.names if self.buckets else None
        if state is not None and state.get("buckets") != names:  # only a --force-override resume gets here
            dropped = sum(len(w.pop("waiting", ())) for w in self.state.workers.values())
            log.warning("data.buckets changed since the checkpoint (%s -> %s): %d sample(s) waiting in the old "
                        "buckets' buffers are dropped, not moved into other buckets; the streams continue where "
                        "they stood", state.get("buckets"), names, dropped)
        self.batch_size = batch_size
        self.dataset = ShardDataset(self.urls, cfg, seed, rank, world_size, dict(self.state.workers),
                                    self.state.next_worker, batch_size, self.expected)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=_as_is,
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
        self._it: Optional[Iterator] = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        state = batch["state"]
        self.state.workers[batch["worker"]] = {k: v for k, v in state.items() if k != "waiting" or v}
        self.state.next_worker = (batch["worker"] + 1) % self.state.num_workers
        self.check_bad_fraction()
        return batch

    def state_dict(self) -> dict:
        state = {"num_workers": self.state.num_workers, "next_worker": self.state.next_worker,
                 "workers": {k: dict(v) for k, v in self.state.workers.items()}}
        if self.buckets is not None:  # (a square run's state is what it was before buckets existed)
            state["buckets"] = self.buckets.names
        return state

    def counts(self) -> dict:
        total = {r: 0 for r in COUNT_KEYS}
        for w in self.state.workers.values():
            for r, n in w["counts"].items():
                total[r] = total.get(r, 0) + n
        return total

    def waiting(self) -> int:
        """Samples in this rank's bucket buffers (as of the last batch each worker delivered)."""
        return sum(len(w.get("waiting", ())) for w in self.state.workers.values())

    def check_bad_fraction(self) -> None:
        c = self.counts()
        bad = sum(c[r] for r in BAD_REASONS)
        seen = bad + c["good"]
        if seen >= self.cfg.bad_check_after and bad / seen > self.cfg.max_bad_fraction:
            raise DataError(f"{bad} of {seen} samples on this rank were bad ({bad / seen:.1%} > "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction:.1%}); by reason: "
                            + ", ".join(f"{r}={c[r]}" for r in BAD_REASONS))


def bad_counts(loader: TrainLoader, reduce=None) -> dict:
    """The loader's bad-sample counts by reason, summed over ranks by `reduce` (a tensor -> tensor
    all-reduce, e.g. t2i.train.engine.sum_over_ranks); reasons with no bad sample are left out."""
    counts = loader.counts()
    total = torch.tensor([counts[r] for r in BAD_REASONS], dtype=torch.long)
    total = reduce(total) if reduce is not None else total
    return {r: int(n) for r, n in zip(BAD_REASONS, total) if n}


def note_counts(loader: TrainLoader, reduce=None) -> dict:
    """Like bad_counts for the caption notes (CAPTION_NOTES: captions cut to data.max_caption_bytes,
    invalid UTF-8 replaced): counted, but not bad samples."""
    counts = loader.counts()
    total = torch.tensor([counts[r] for r in CAPTION_NOTES], dtype=torch.long)
    total = reduce(total) if reduce is not None else total
    return {r: int(n) for r, n in zip(CAPTION_NOTES, total) if n}


def bucket_counts(loader: TrainLoader, reduce=None) -> dict:
    """With data.buckets: {"images_per_bucket": {WxH: images trained}, "waiting": samples in the bucket
    buffers, "dropped_aspect": samples out of the aspect range}, summed over ranks by `reduce` (as in
    bad_counts; every rank must call it at the same step). {} without buckets."""
    if loader.buckets is None:
        return {}
    counts, names = loader.counts(), loader.buckets.names
    local = torch.tensor([counts.get(f"bucket/{n}", 0) for n in names] + [loader.waiting(), counts["aspect"]],
                         dtype=torch.long)
    total = (reduce(local) if reduce is not None else local).tolist()
    return {"images_per_bucket": dict(zip(names, total)), "waiting": total[-2], "dropped_aspect": total[-1]}
