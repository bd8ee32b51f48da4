"""Shard lists and raw tar samples: which shards a spec names, which a (rank, worker) slot reads.

A shard spec is a brace pattern (`data/x-{000000..000099}.tar`), a list, `::`-joined patterns, a
directory (its *.tar), a list file (one pattern per line, `#` comments) or a `pipe:` / URL.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset as wds

from t2i.errors import DataError


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


def raw_samples(urls: list[str], counts: dict) -> Iterator[dict]:
    """Undecoded samples (dict of bytes) from tar shards; read errors are counted, not raised."""
    def handler(exn):
        counts["read"] += 1
        return True
    for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
        yield sample
