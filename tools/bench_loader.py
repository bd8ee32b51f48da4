"""Throughput of the training data loader against a plain webdataset + PIL loop on the same shards.

    t2i bench-loader --shards 'data/mine/mine-{000000..000003}.tar' --resolution 32 \\
        --batch-size 32 --workers 0,1,2 --seconds 10 --repeats 3 --json bench.json
    t2i bench-loader --synthetic /tmp/jpeg-bench --resolution 256 --batch-size 32
    t2i bench-loader                   # the embedded default's shards, or a cached shapes set (tools/bench_data.py)

Both loaders do the same work per sample: read the tar member, decode the image with PIL, resize the
short side to --resolution (bicubic, the same target size and `reducing_gap` as the trainer), centre
crop, to a float tensor in [-1, 1] (C, H, W), then batch with a torch DataLoader with the same
batch size, worker count and prefetch factor (4).

* **ours**: `t2i.data.loader.TrainLoader` (rank 0 of 1): adds a seeded shuffle buffer over the raw
  samples, the resumable position, bad-sample counts and captions chosen with a seeded RNG.
* **plain**: `wds.WebDataset(urls, shardshuffle=False).repeat().decode("pil").map(...)`: no shuffle,
  shards split over DataLoader workers by webdataset (`split_by_worker`), images batched with
  torch's `default_collate`. It makes the same pixels as ours (tests/test_bench_loader.py checks).
  Like ours it skips a bad sample (an undecodable image, a damaged tar) instead of stopping: every
  stage gets a handler that counts it and continues (webdataset's `warn_and_continue`, counted).

Both loaders' skipped samples are counted over each run (warm-up included) and reported in the table
and JSON (`bad_samples`); ours never stops on data.max_bad_fraction here.

Each measurement skips a warm-up (worker start-up plus the first `workers * prefetch + 2` batches, so
the queue filled while the consumer waited does not count), then counts samples for --seconds of wall
time. The table gives the median over --repeats runs (runs interleave ours / plain) with the range,
the rate per worker, ours / plain, and the CPU time per sample of this process plus its DataLoader
workers over the timed window (psutil; steadier than samples/s on a shared machine, since other
jobs' load lowers the rate but not the CPU time a sample costs). `--synthetic DIR` writes (once) JPEG shards of smooth random
640x480 images with captions into DIR and benchmarks those.

**Bucketed vs square** (`--buckets RULE_OR_LIST`, YAML as data.buckets takes it: '{step: 64}',
'[256x256, 320x192]'): the loaders become `ours` (the square TrainLoader, data.buckets null) and
`bucketed` (the same TrainLoader with data.buckets set), interleaved on the same shards, and a second
table gives bucketed / square (samples/s and CPU time per sample), the samples dropped for their aspect,
and the bucket buffers' memory over each run (warm-up included):

* peak waiting samples: the largest sum over workers of len(state["waiting"]) after a batch
  (`TrainLoader.waiting()`); 0 for the square loader, whose one buffer empties at every batch;
* peak waiting bytes, exact: every slot's buffered samples are tapped on their way into the buffers
  (`bucket_batches` wrapped in this process, inherited by forked workers), so the bytes of the
  waiting uint8 images (W*H*3 each) are summed; beside it the upper bound peak waiting samples x the
  largest bucket's W*H*3;
* peak buffer bytes per slot: the most the buffers of one slot held at once, the batch being
  completed included (for the square loader batch x R*R*3);
* the hard bound per slot: n_buckets x (batch - 1) waiting samples, (batch - 1) x sum of the
  buckets' W*H*3 bytes (at most n_buckets x (batch - 1) x the largest W*H*3).

`--synthetic-aspects DIR` writes (once) such shards of mixed aspect (`--synthetic-sizes`, default
ASPECT_SIZES: 4:3, 3:4, 16:9, 9:16, 1:1, 2:1, 3:2, ... and one 2.5:1 beyond data.buckets' default
range, 1 image in 12) with json width / height (as t2i make-shards writes), so a bucketed loader picks
buckets from the metadata.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from t2i.cmdline import parser as make_parser
from t2i.errors import ConfigError
from t2i.io import atomic_write, write_json

PREFETCH = 4  # TrainLoader's prefetch_factor
LOADERS = ("ours", "plain", "bucketed")
# --synthetic-aspects: sizes cycled through per shard; 1000x400 (2.5:1) is past the default max_aspect 2
ASPECT_SIZES = ((640, 480), (480, 640), (800, 450), (450, 800), (512, 512), (600, 600), (900, 450),
                (640, 427), (427, 640), (768, 512), (1000, 400), (560, 420))


# ----------------------------------------------------------------------------------------------
# Synthetic JPEG shards
# ----------------------------------------------------------------------------------------------


def smooth_image(rng: np.random.Generator, width: int, height: int):
    """A smooth random RGB image: a coarse random grid upsampled bicubically, plus a little texture."""
    from PIL import Image
    gw, gh = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    coarse = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def write_synthetic_shards(out_dir, n_shards: int = 4, per_shard: int = 250, width: int = 640,
                           height: int = 480, quality: int = 90, seed: int = 0,
                           sizes: list[tuple[int, int]] | None = None) -> list[str]:
    """JPEG shards `<out_dir>/bench-%06d.tar` (txt captions); existing complete ones are reused. With
    `sizes` ((width, height) pairs), sample i of a shard is sizes[i % len(sizes)] (width / height
    ignored) and carries a json {"width", "height"} as t2i make-shards writes it."""
    import webdataset as wds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"n_shards": n_shards, "per_shard": per_shard, "width": width, "height": height,
            "quality": quality, "seed": seed}
    if sizes is not None:  # (the spec of a plain set stays what recorded benchmarks wrote)
        sizes = [tuple(int(v) for v in size) for size in sizes]
        spec.update(width=None, height=None, sizes=[list(size) for size in sizes])
    stamp = out / "bench-manifest.json"
    paths = [str(out / f"bench-{i:06d}.tar") for i in range(n_shards)]
    if stamp.exists() and json.loads(stamp.read_text()) == spec and all(Path(p).exists() for p in paths):
        return paths
    words = ["red", "green", "blue", "soft", "bright", "misty", "evening", "morning", "field", "sky"]
    stamp.unlink(missing_ok=True)  # the stamp is written last, once every shard is complete

    def write_shard(tmp: Path, s: int) -> None:
        rng = np.random.default_rng([seed, s])
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
            for i in range(per_shard):
                w, h = sizes[i % len(sizes)] if sizes is not None else (width, height)
                buf = io.BytesIO()
                smooth_image(rng, w, h).save(buf, format="JPEG", quality=quality)
                caption = "a photo of a " + " ".join(rng.choice(words, 3))
                sample = {"__key__": f"b{s}_{i:05d}", "jpg": buf.getvalue(), "txt": caption}
                if sizes is not None:
                    sample["json"] = json.dumps({"width": w, "height": h}).encode()
                sink.write(sample)

    for s, path in enumerate(paths):
        atomic_write(path, lambda tmp, s=s: write_shard(tmp, s))
    write_json(stamp, spec, indent=None)
    return paths


# ----------------------------------------------------------------------------------------------
# The two loaders
# ----------------------------------------------------------------------------------------------


def ours_loader(urls: list[str], resolution: int, batch_size: int, workers: int, seed: int = 0,
                shuffle_buffer: int = 256, buckets=None):
    """The training loader, rank 0 of 1; `buckets`: a data.buckets value (None: the square loader)."""
    from t2i.config import DataConfig
    from t2i.data.loader import TrainLoader
    cfg = DataConfig(shards=urls, resolution=resolution, num_workers=workers, shuffle_buffer=shuffle_buffer,
                     max_bad_fraction=1.0,  # a benchmark measures bad data too; it never stops on it
                     buckets=buckets)
    return TrainLoader(cfg, seed=seed, rank=0, world_size=1, batch_size=batch_size)


def _ours_bad(loader) -> int:
    from t2i.data.loader import BAD_REASONS
    counts = loader.counts()
    return sum(counts.get(r, 0) for r in BAD_REASONS)


_SKIPPED = [0]  # bad samples the plain loader skipped in this process since its last batch


def _skip_and_count(exn: Exception) -> bool:
    """webdataset handler: skip the sample (as `warn_and_continue`, without a warning per sample) and
    count it; the count rides along with the next batch of this process (`_plain_collate`)."""
    _SKIPPED[0] += 1
    return True


def _plain_sample(sample: dict, resolution: int) -> dict:
    """What a plain loop does with a webdataset sample decoded by `.decode("pil")`."""
    from PIL import Image
    image = next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample)
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1.0:  # the trainer's target size and resampling, so both loaders make the same pixels
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    caption = sample.get("txt") or (sample.get("json") or {}).get("caption", "")
    return {"key": sample["__key__"], "caption": caption, "image": tensor}


def _plain_collate(samples: list[dict]) -> dict:
    # default_collate stacks a worker's batch straight into shared memory, as a plain DataLoader does
    bad, _SKIPPED[0] = _SKIPPED[0], 0
    return {"images": torch.utils.data.default_collate([s["image"] for s in samples]),
            "captions": [s["caption"] for s in samples], "keys": [s["key"] for s in samples], "bad": bad}


def plain_loader(urls: list[str], resolution: int, batch_size: int, workers: int):
    import functools

    import webdataset as wds
    _SKIPPED[0] = 0
    skip = _skip_and_count
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=skip).repeat()
               .decode("pil", handler=skip).map(functools.partial(_plain_sample, resolution=resolution), handler=skip))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_plain_collate, prefetch_factor=PREFETCH if workers else None)
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _shutdown(it) -> None:
    inner = getattr(it, "_it", it)  # TrainLoader holds the DataLoader iterator in _it
    shutdown = getattr(inner, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _processes(it) -> list:
    """This process and the DataLoader worker processes behind the iterator `it` (psutil handles)."""
    try:
        import psutil
    except ImportError:  # CPU time is then this process only
        return []
    inner = getattr(it, "_it", it)
    pids = [os.getpid()] + [w.pid for w in getattr(inner, "_workers", [])]
    return [psutil.Process(pid) for pid in pids]


def _cpu_seconds(procs: list) -> float:
    if not procs:
        return time.process_time()
    total = 0.0
    for proc in procs:
        t = proc.cpu_times()
        total += t.user + t.system
    return total


TAP_KEY = "bench_buffer"  # what the buffer tap adds to each batch


def _nbytes(image) -> int:
    if isinstance(image, torch.Tensor):
        return image.numel() * image.element_size()
    w, h = image.size  # the loader's buffers hold uint8 RGB PIL images
    return w * h * 3


def _tapped_bucket_batches(stream, batch_size, names, *args, **kwargs):
    """t2i.data.loader.bucket_batches, with each batch carrying the exact bytes of the slot's buffered
    images: `waiting_bytes` (the samples in state["waiting"] after the batch) and `peak_bytes` (the most
    the slot's buffers held at once so far, a batch being completed included). The per-sample cost is a
    dict insert."""
    held: dict = {}  # (epoch, position) -> bytes of a sample in a buffer
    now, peak = [0], [0]

    def tap(samples):
        for sample in samples:
            nbytes = _nbytes(sample["image"]) if "image" in sample else 0
            held[tuple(sample["pos"])] = nbytes
            now[0] += nbytes
            peak[0] = max(peak[0], now[0])
            yield sample

    for batch in _BUCKET_BATCHES(tap(stream), batch_size, names, *args, **kwargs):
        waiting = {tuple(p) for p in batch["state"]["waiting"]}
        for pos in [p for p in held if p not in waiting]:
            del held[pos]
        now[0] = sum(held.values())
        batch[TAP_KEY] = {"waiting_bytes": now[0], "peak_bytes": peak[0]}
        yield batch


_BUCKET_BATCHES = None  # the original, while the tap is installed


class buffer_tap:
    """Installs _tapped_bucket_batches in t2i.data.loader for the duration (DataLoader workers fork
    inside, so they inherit it; without it, batches simply lack TAP_KEY and the exact bytes are None)."""

    def __enter__(self):
        global _BUCKET_BATCHES
        from t2i.data import loader
        _BUCKET_BATCHES, loader.bucket_batches = loader.bucket_batches, _tapped_bucket_batches
        return self

    def __exit__(self, *exc):
        global _BUCKET_BATCHES
        from t2i.data import loader
        loader.bucket_batches, _BUCKET_BATCHES = _BUCKET_BATCHES, None
        return False


class _Buffers:
    """The bucket buffers' memory as seen by the consumer of a TrainLoader, over a whole run."""

    def __init__(self):
        self.waiting_bytes: dict = {}  # worker -> exact waiting bytes after its last batch
        self.peak_waiting = 0
        self.peak_waiting_bytes: int | None = None
        self.peak_slot_bytes: int | None = None

    def update(self, it, batch: dict) -> None:
        if not hasattr(it, "waiting"):
            return
        self.peak_waiting = max(self.peak_waiting, it.waiting())  # sum over workers of len(waiting)
        tap = batch.get(TAP_KEY)
        if tap is not None:
            self.waiting_bytes[batch.get("worker", 0)] = tap["waiting_bytes"]
            self.peak_waiting_bytes = max(self.peak_waiting_bytes or 0, sum(self.waiting_bytes.values()))
            self.peak_slot_bytes = max(self.peak_slot_bytes or 0, tap["peak_bytes"])


def measure(make, workers: int, seconds: float, warmup_batches: int | None = None) -> dict:
    """Samples/s of the iterator `make()` after a warm-up, over `seconds` of wall time, and the bad samples
    it skipped over the whole run (ours: its own counts; plain: what its batches report). A bucketed
    TrainLoader's run adds the batches per bucket, the samples dropped for their aspect (the timed window)
    and its buffers' peaks (the whole run; see _Buffers)."""
    t0 = time.perf_counter()
    it = make()
    warmup = warmup_batches if warmup_batches is not None else workers * PREFETCH + 2
    bucketed = getattr(it, "buckets", None) is not None
    buffers = _Buffers()
    skipped = 0
    try:
        first = next(it)
        buffers.update(it, first)
        skipped += first.get("bad", 0)
        startup_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            batch = next(it)
            buffers.update(it, batch)
            skipped += batch.get("bad", 0)
        shape, lo, hi = tuple(first["images"].shape[1:]), float(first["images"].min()), float(first["images"].max())
        keys: set = set()
        per_bucket: dict = {}
        n = 0
        aspect0 = it.counts().get("aspect", 0) if hasattr(it, "counts") else 0
        procs = _processes(it)
        cpu0 = _cpu_seconds(procs)
        start = time.perf_counter()
        while True:
            batch = next(it)
            skipped += batch.get("bad", 0)
            n += len(batch["keys"])
            keys.update(batch["keys"])
            if bucketed:
                per_bucket[batch["bucket"]] = per_bucket.get(batch["bucket"], 0) + len(batch["keys"])
            buffers.update(it, batch)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        cpu = _cpu_seconds(procs) - cpu0
        if not bucketed and batch["images"].shape[1:] != shape:
            raise AssertionError(f"image shape changed: {shape} -> {tuple(batch['images'].shape[1:])}")
        lo, hi = min(lo, float(batch["images"].min())), max(hi, float(batch["images"].max()))
        if hasattr(it, "counts"):  # ours: TrainLoader's own bad-sample counts
            skipped = _ours_bad(it)
            aspect = it.counts().get("aspect", 0) - aspect0
    finally:
        _shutdown(it)
    out = {"samples": n, "seconds": elapsed, "samples_per_s": n / elapsed, "startup_s": startup_s,
           "cpu_ms_per_sample": 1000 * cpu / max(1, n), "distinct_keys": len(keys), "image_shape": list(shape),
           "min": lo, "max": hi, "bad_samples": skipped}
    if hasattr(it, "waiting"):  # a TrainLoader
        out.update(aspect_dropped=aspect, peak_waiting_samples=buffers.peak_waiting,
                   peak_waiting_bytes=buffers.peak_waiting_bytes, peak_slot_buffer_bytes=buffers.peak_slot_bytes)
        if bucketed:
            out["samples_per_bucket"] = dict(sorted(per_bucket.items()))
    return out


def bucket_bounds(buckets, resolution: int, batch_size: int) -> dict:
    """The bucket set's sizes and the hard bounds on one slot's waiting samples and bytes."""
    from t2i.buckets import bucket_set
    bset = bucket_set(buckets, resolution, key="--buckets")
    pixels = [w * h for w, h in bset.sizes]
    return {"buckets": buckets, "bucket_sizes": bset.names, "min_aspect": bset.min_aspect,
            "max_aspect": bset.max_aspect, "largest_bucket_bytes": 3 * max(pixels),
            "hard_bound_waiting_samples_per_slot": len(pixels) * (batch_size - 1),
            "hard_bound_waiting_bytes_per_slot": 3 * (batch_size - 1) * sum(pixels)}


def run(urls: list[str], resolution: int, batch_size: int, workers: list[int], seconds: float,
        repeats: int = 1, loaders=("ours", "plain"), warmup_batches: int | None = None, log=print,
        buckets=None) -> dict:
    """The report. `buckets` (a data.buckets value) is what the `bucketed` loader runs with; with it,
    every TrainLoader run (ours and bucketed) goes through the buffer tap (buffer_tap)."""
    makers = {
        "ours": lambda w: (lambda: iter(ours_loader(urls, resolution, batch_size, w))),
        "plain": lambda w: (lambda: plain_loader(urls, resolution, batch_size, w)),
        "bucketed": lambda w: (lambda: iter(ours_loader(urls, resolution, batch_size, w, buckets=buckets))),
    }
    if "bucketed" in loaders and buckets is None:
        raise ConfigError("--loaders bucketed needs --buckets (a data.buckets rule or list)")
    results = []
    for w in workers:
        runs: dict = {name: [] for name in loaders}
        for r in range(repeats):
            for name in loaders:  # interleaved, so slow drifts of a shared machine hit both alike
                if buckets is not None and name != "plain":
                    with buffer_tap():
                        m = measure(makers[name](w), w, seconds, warmup_batches)
                else:
                    m = measure(makers[name](w), w, seconds, warmup_batches)
                runs[name].append(m)
                log(f"  {name:5s} workers={w} run {r + 1}/{repeats}: {m['samples_per_s']:8.1f} samples/s "
                    f"({m['samples']} in {m['seconds']:.1f} s, {m['cpu_ms_per_sample']:.2f} CPU ms/sample, "
                    f"start-up {m['startup_s']:.2f} s, {m['bad_samples']} bad samples skipped)")
        for name in loaders:
            rates = [m["samples_per_s"] for m in runs[name]]
            row = {"loader": name, "workers": w, "samples_per_s": statistics.median(rates),
                   "min_samples_per_s": min(rates), "max_samples_per_s": max(rates),
                   "per_worker_samples_per_s": statistics.median(rates) / max(1, w),
                   "cpu_ms_per_sample": statistics.median(m["cpu_ms_per_sample"] for m in runs[name]),
                   "bad_samples": sum(m["bad_samples"] for m in runs[name]), "runs": runs[name]}
            if buckets is not None and name != "plain":  # the buffers over all repeats
                row["aspect_dropped"] = sum(m["aspect_dropped"] for m in runs[name])
                row["peak_waiting_samples"] = max(m["peak_waiting_samples"] for m in runs[name])
                for key in ("peak_waiting_bytes", "peak_slot_buffer_bytes"):
                    values = [m[key] for m in runs[name] if m[key] is not None]
                    row[key] = max(values) if values else None
            results.append(row)
    plain = {r["workers"]: r["samples_per_s"] for r in results if r["loader"] == "plain"}
    for r in results:
        r["ratio_vs_plain"] = r["samples_per_s"] / plain[r["workers"]] if r["workers"] in plain else None
    report = {"shards": urls, "resolution": resolution, "batch_size": batch_size, "seconds": seconds,
              "repeats": repeats, "torch_threads": torch.get_num_threads(), "results": results}
    if buckets is not None:
        bounds = bucket_bounds(buckets, resolution, batch_size)
        report.update(bounds)
        square = {r["workers"]: r for r in results if r["loader"] == "ours"}
        for r in results:
            if r["loader"] == "plain":
                continue
            base = square.get(r["workers"])
            r["ratio_vs_square"] = r["samples_per_s"] / base["samples_per_s"] if base else None
            r["cpu_ratio_vs_square"] = r["cpu_ms_per_sample"] / base["cpu_ms_per_sample"] if base else None
            r["peak_waiting_bytes_upper_bound"] = r["peak_waiting_samples"] * (
                bounds["largest_bucket_bytes"] if r["loader"] == "bucketed" else 3 * resolution * resolution)
    return report


def table(report: dict) -> str:
    lines = ["| loader | workers | samples/s (median [min-max]) | per-worker samples/s | ratio vs plain "
             "| CPU ms/sample (all processes) | bad samples skipped |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        ratio = f"{r['ratio_vs_plain']:.2f}" if r["ratio_vs_plain"] is not None else "-"
        lines.append(f"| {r['loader']} | {r['workers']} | {r['samples_per_s']:.0f} "
                     f"[{r['min_samples_per_s']:.0f}-{r['max_samples_per_s']:.0f}] | "
                     f"{r['per_worker_samples_per_s']:.0f} | {ratio} | {r['cpu_ms_per_sample']:.3f} | "
                     f"{r.get('bad_samples', 0)} |")
    return "\n".join(lines)


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def bucket_table(report: dict) -> str:
    """Bucketed vs square (the `ours` rows): rates, CPU time, ratios and the buffers' memory."""
    lines = ["| loader | workers | samples/s (median [min-max]) | CPU ms/sample | ratio vs square (samples/s) "
             "| ratio vs square (CPU ms/sample) | aspect drops | peak waiting samples | peak waiting MB (exact) "
             "| peak waiting MB (upper bound) | peak buffer MB per slot | hard bound per slot |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = report["hard_bound_waiting_samples_per_slot"]
    bound = f"{n} samples, {_mb(report['hard_bound_waiting_bytes_per_slot'])} MB"
    for r in report["results"]:
        if "ratio_vs_square" not in r:
            continue
        ratio = "-" if r["ratio_vs_square"] is None else f"{r['ratio_vs_square']:.2f}"
        cpu_ratio = "-" if r["cpu_ratio_vs_square"] is None else f"{r['cpu_ratio_vs_square']:.2f}"
        name = "square (ours)" if r["loader"] == "ours" else "bucketed"
        lines.append(f"| {name} | {r['workers']} | {r['samples_per_s']:.0f} "
                     f"[{r['min_samples_per_s']:.0f}-{r['max_samples_per_s']:.0f}] | {r['cpu_ms_per_sample']:.2f} | "
                     f"{ratio} | {cpu_ratio} | {r['aspect_dropped']} | {r['peak_waiting_samples']} | "
                     f"{_mb(r['peak_waiting_bytes'])} | {_mb(r['peak_waiting_bytes_upper_bound'])} | "
                     f"{_mb(r['peak_slot_buffer_bytes'])} | {bound if r['loader'] == 'bucketed' else '0 waiting'} |")
    return "\n".join(lines)


def bench(argv=None) -> dict:
    """The command line; returns the report."""
    parser = make_parser("bench-loader", __doc__)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--shards", default=None, help="your shards, any spec data.shards takes (brace range, glob, "
                     "folder, list file); default: the embedded default's data/shapes/ shards, or when `make "
                     "demo` has not written them a shapes set made once in ~/.cache/t2i (tools/bench_data.py)")
    src.add_argument("--synthetic", default=None, metavar="DIR",
                     help="write (once) JPEG shards of smooth random images into DIR and benchmark them")
    src.add_argument("--synthetic-aspects", default=None, metavar="DIR",
                     help="as --synthetic, with images of mixed aspect (--synthetic-sizes) and their json "
                     "width / height: the set for --buckets")
    parser.add_argument("--synthetic-shape", default="4x250x640x480", metavar="SHARDSxPERxWxH",
                        help="(--synthetic-aspects takes SHARDSxPER from it; the sizes from --synthetic-sizes)")
    parser.add_argument("--synthetic-sizes", default=",".join(f"{w}x{h}" for w, h in ASPECT_SIZES),
                        metavar="WxH,...", help="--synthetic-aspects: the sizes sample i of a shard cycles through")
    parser.add_argument("--buckets", default=None, metavar="RULE_OR_LIST",
                        help="YAML as data.buckets takes it ('{step: 64}', '[256x256, 320x192]'): compare the "
                        "square TrainLoader (ours) with a bucketed one (bucketed); default loaders ours,bucketed")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall time per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per loader and worker count (median)")
    parser.add_argument("--warmup-batches", type=int, default=None,
                        help="batches skipped before timing (default: workers * 4 + 2)")
    parser.add_argument("--loaders", default=None, help="comma-separated: ours, plain, bucketed (default: "
                        "ours,plain; with --buckets ours,bucketed)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)

    buckets = None
    if args.buckets is not None:
        import yaml
        from t2i.buckets import bucket_set
        try:
            buckets = yaml.safe_load(args.buckets)
        except yaml.YAMLError as e:
            raise ConfigError(f"--buckets: {args.buckets!r} is not YAML ({e})") from None
        if buckets is None:
            raise ConfigError("--buckets: give a rule ('{step: 64}') or a list ('[256x256, 320x192]')")
        bucket_set(buckets, args.resolution, key="--buckets")
    if args.synthetic:
        n_shards, per_shard, width, height = (int(v) for v in args.synthetic_shape.lower().split("x"))
        urls = write_synthetic_shards(args.synthetic, n_shards, per_shard, width, height)
    elif args.synthetic_aspects:
        from t2i.buckets import parse_size
        n_shards, per_shard = (int(v) for v in args.synthetic_shape.lower().split("x")[:2])
        sizes = [parse_size(v, key="--synthetic-sizes") for v in args.synthetic_sizes.split(",") if v.strip()]
        urls = write_synthetic_shards(args.synthetic_aspects, n_shards, per_shard, sizes=sizes)
    else:
        from t2i.config import DataConfig
        from tools.bench_data import choose_shards
        default = DataConfig().shards
        _, urls = choose_shards(args.shards, default, default=default)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    spec = args.loaders or ("ours,bucketed" if buckets is not None else "ours,plain")
    loaders = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = set(loaders) - set(LOADERS)
    if unknown:
        raise ConfigError(f"--loaders: unknown {sorted(unknown)}; expected ours, plain, bucketed")
    if "bucketed" in loaders and buckets is None:
        raise ConfigError("--loaders bucketed needs --buckets (a data.buckets rule or list, e.g. '{step: 64}')")
    print(f"{len(urls)} shards, resolution {args.resolution}, batch {args.batch_size}, "
          f"{args.seconds:g} s x {args.repeats} per loader and worker count")
    if buckets is not None:
        bounds = bucket_bounds(buckets, args.resolution, args.batch_size)
        print(f"buckets {buckets}: {', '.join(bounds['bucket_sizes'])} (aspect {bounds['min_aspect']:g} to "
              f"{bounds['max_aspect']:g})")
    report = run(urls, args.resolution, args.batch_size, workers, args.seconds, args.repeats, loaders,
                 args.warmup_batches, buckets=buckets)
    print(table(report))
    if buckets is not None:
        print()
        print(bucket_table(report))
    if args.json:
        write_json(args.json, report)
    return report


def main(argv=None) -> int:
    bench(argv)
    return 0


if __name__ == "__main__":
    main()
