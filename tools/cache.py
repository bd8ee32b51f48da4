"""Precompute the text encodings and VAE posteriors of every training shard (format: t2i/data/cache.py).

    t2i cache --config configs/tiny-cpu.yaml --out data/shapes-cache            # then train with
    t2i train data.cache=data/shapes-cache
    t2i cache --config my-sd35.yaml text.t5_padding=zero --out /cache/sd35 --nproc 8
    torchrun --nproc_per_node 8 -m t2i.cli cache --config my-sd35.yaml --out /cache/sd35   # ranks split the shards

Writes <out>/<shard name>.safetensors per shard of data.shards (temp file + atomic rename). A shard
whose cache file exists and matches the current encoders, VAE, resolution, t5_padding, store dtype and
shard size is skipped, so a killed run resumes where it stopped; a stale file is rewritten.
With data.buckets each image's posterior is stored at its bucket's size (the bucket set is part of the
identity), and the summary lists the images per bucket.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from t2i.cmdline import parser as make_parser


def parse_args(argv=None) -> argparse.Namespace:
    from t2i.cliargs import add_overrides_argument, parse_with_overrides

    p = make_parser("cache", __doc__.split("\n")[0], epilog=__doc__)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny-cpu.yaml)")
    p.add_argument("--out", required=True, help="cache folder (training: data.cache=<this folder>)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="storage dtype")
    p.add_argument("--batch-size", type=int, default=32, help="images / captions per encoder call")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to launch with torchrun (each takes "
                                                         "every nproc-th shard)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    add_overrides_argument(p)
    return parse_with_overrides(p, argv)


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "RANK" not in os.environ and args.nproc > 1:
        from t2i.runtime import relaunch
        return relaunch(args.nproc, ["cache", *argv])

    import torch
    from tqdm import tqdm

    from t2i.data import cache
    from t2i.config import load_config
    from t2i.data.shards import expand_shards
    from t2i.models.build import build_frozen

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(args.config, args.overrides)
    urls = expand_shards(cfg.data.shards, allow_pipe_in_lists=cfg.data.allow_pipe_in_lists)
    cache.check_unique_names(args.out, urls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    text, vae = build_frozen(cfg, device)
    ident = cache.identity(text, vae, cfg)
    mine = urls[rank::world]
    todo = []
    for url in mine:
        why = cache.problem(cache.cache_path(out, url), url, ident, store_dtype=args.dtype)
        if why is not None:
            todo.append(url)
            if why != "missing" and rank == 0:
                print(f"t2i cache: rewriting stale {cache.cache_path(out, url)}: {why}", flush=True)
    t5 = ("T5 stored trimmed to the real token count (text.t5_padding=zero)"
          if cfg.text.t5_padding == "zero" else
          f"T5 stored at the full max_t5_tokens={cfg.text.max_t5_tokens} (text.t5_padding=keep: the SD3 "
          f"pipeline's pad outputs are not zero; text.t5_padding=zero stores it trimmed)")
    if rank == 0:
        print(f"t2i cache: {len(urls)} shard(s) -> {out} ({world} rank(s)); rank 0 writes {len(todo)}, "
              f"{len(mine) - len(todo)} already valid; {args.dtype}; {t5}; identity "
              f"{cache.identity_hash(ident)[:12]}", flush=True)
    bar = tqdm(unit="sample", desc="cache", disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    t0, written, samples = time.perf_counter(), 0, [0]

    def progress(n: int) -> None:
        samples[0] += n
        bar.update(n)
    for i, url in enumerate(todo):
        bar.set_postfix_str(f"shard {i + 1}/{len(todo)}")
        cache.write_shard(url, out, text, vae, cfg, store_dtype=args.dtype, batch_size=args.batch_size,
                          device=device, progress=progress)
        written += 1
    bar.close()
    if rank == 0:
        print(f"t2i cache: rank 0 wrote {written} file(s), {samples[0]} samples in {time.perf_counter() - t0:.1f} s"
              f"{bucket_summary(out, mine, cfg)}; train with data.cache={out}", flush=True)
    return 0


def bucket_summary(out, urls, cfg) -> str:
    """With data.buckets: ', images per bucket in rank 0's N file(s): 24x40=3, 32x32=5, ...' (read from
    the files' metadata, the ones already valid included); '' without buckets."""
    import json

    from t2i.data import cache
    from t2i.buckets import bucket_set

    buckets = bucket_set(cfg.data.buckets, cfg.data.resolution)
    if buckets is None:
        return ""
    total = dict.fromkeys(buckets.names, 0)
    for url in urls:
        for name, n in json.loads(cache.read_meta(cache.cache_path(out, url)).get("buckets", "{}")).items():
            total[name] = total.get(name, 0) + int(n)
    per = ", ".join(f"{name}={n}" for name, n in total.items())
    return f"; images per bucket in rank 0's {len(urls)} file(s): {per}"


if __name__ == "__main__":
    raise SystemExit(main())
