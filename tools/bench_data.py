"""The shards `t2i bench` and `t2i bench-loader` measure when the user names none.

Why: both default to the embedded config's `data/shapes/...` shards, which only `make demo` writes, so
on a fresh checkout (or in another working folder) they used to end in a traceback. Now, in order:

1. the shards the user names (`--shards`, or `data.shards` in --config / an override), checked first so
   a wrong spec is one line naming its flag or key;
2. the embedded default's shards when they exist;
3. else a small captioned-shapes set made once in a cache folder ($T2I_CACHE, else
   $XDG_CACHE_HOME/t2i, else ~/.cache/t2i) and reused, announced with one log line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from t2i.errors import DataError

# Enough for the tiny config's 2 ranks x 2 workers to read disjoint shards and a few batches of 32 each.
N_SAMPLES, N_SHARDS, SIZE, SEED = 1024, 8, 64, 0


def cache_root() -> Path:
    if os.environ.get("T2I_CACHE"):
        return Path(os.environ["T2I_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2i"


def fallback_shapes(log=print) -> str:
    """A brace pattern of N_SHARDS shapes shards in the cache folder, written on first use (atomically:
    into a temporary folder renamed into place, so concurrent first uses never read a partial set)."""
    from t2i.data.shards import expand_shards
    from t2i.data.writers import shard_pattern, write_shapes_shards

    folder = cache_root() / f"bench-shapes-{N_SAMPLES}x{SIZE}-seed{SEED}"
    pattern = shard_pattern(folder, "shapes", N_SHARDS)
    if (folder / "manifest.json").is_file():
        try:
            expand_shards(pattern)
            return pattern
        except DataError:
            shutil.rmtree(folder, ignore_errors=True)  # damaged: make it again
    log(f"[bench] no shards given and the default data/shapes/ is missing (`make demo` writes it): writing "
        f"{N_SAMPLES} synthetic shapes samples to {folder} (once; reused by later runs)")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shapes_shards(tmp, N_SAMPLES, samples_per_shard=N_SAMPLES // N_SHARDS, seed=SEED, size=SIZE,
                        prefix="shapes", progress=False)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return pattern


def choose_shards(given: str | None, configured, *, flag: str = "--shards", key: str = "data.shards",
                  default=None, log=print) -> tuple[str | list, list[str]]:
    """(shard spec, its expanded list) to benchmark: `given` (the flag), else `configured` (the config's
    data.shards) unless it is the untouched `default` whose files are missing: then `fallback_shapes()`.
    A spec the user gave that names no shards raises DataError naming `flag` or `key`."""
    from t2i.data.shards import expand_shards

    if given:
        return given, expand_shards(given, key=flag)
    try:
        return configured, expand_shards(configured, key=key)
    except DataError:
        if configured != default:
            raise
    spec = fallback_shapes(log)
    return spec, expand_shards(spec, key=key)
