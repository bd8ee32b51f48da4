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

import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from t2i.config import DataConfig
from t2i.data.cache import CacheReader, collate as collate_cached
from t2i.data.decode import decode_sample, read_caption
from t2i.data.shards import expand_shards, raw_samples, slot_plan
from t2i.errors import DataError

BAD_REASONS = ("image", "caption", "read", "cache")  # cache: a sample missing from its data.cache file


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


def slot_stream(urls: list[str], cfg: DataConfig, seed: int, slot: int, n_slots: int,
                epoch: int = 0, index: int = 0, counts: Optional[dict] = None) -> Iterator[dict]:
    """Infinite stream of decoded samples for one slot, starting after `index` samples of `epoch`.

    Each sample carries `pos` = (epoch, samples yielded so far in the epoch) and the cumulative bad
    counts, so whoever consumes it can checkpoint exactly where the stream stands.
    """
    counts = dict(counts) if counts else {r: 0 for r in BAD_REASONS}
    counts.setdefault("good", 0)
    reader = None
    if cfg.cache:  # precomputed encodings (t2i.data.cache): the tar gives keys, captions and order only
        reader = CacheReader(cfg.cache)
    while True:
        shards, stride, offset = slot_plan(urls, epoch, seed, slot, n_slots)
        rng = random.Random(f"{seed}-{epoch}-{slot}")
        reads = {"read": 0}  # read errors of this epoch; those met while replaying are already counted
        read_base, replayed = counts["read"], 0
        raw = (s for i, s in enumerate(raw_samples(shards, reads)) if i % stride == offset)
        position = 0
        yielded_any = False
        for item in _shuffled(raw, cfg.shuffle_buffer, rng):
            position += 1
            if position <= index:  # fast-forward on resume: no decode, but the same RNG draws
                read_caption(item, rng)
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
    if "cache" in last:  # data.cache: stored encodings instead of images (t2i.data.cache.collate)
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
        """`cache_identity` (t2i.data.cache.identity of the frozen encoders): required with data.cache; every
        shard's cache file must match it (t2i.data.cache.check_cache), else a CacheError (a DataError)."""
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards)
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


def bad_counts(loader: TrainLoader, reduce=None) -> dict:
    """The loader's bad-sample counts by reason, summed over ranks by `reduce` (a tensor -> tensor
    all-reduce, e.g. t2i.train.engine.sum_over_ranks); reasons with no bad sample are left out."""
    counts = loader.counts()
    total = torch.tensor([counts[r] for r in BAD_REASONS], dtype=torch.long)
    total = reduce(total) if reduce is not None else total
    return {r: int(n) for r, n in zip(BAD_REASONS, total) if n}
