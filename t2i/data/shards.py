"""Shard lists and raw tar samples: which shards a spec names, which a (rank, worker) slot reads.

A shard spec is a brace pattern (`data/x-{000000..000099}.tar`), a glob (`data/*.tar`,
`x-0000[67].tar`), a list, `::`-joined patterns, a directory (its *.tar), a list file (one path or
pattern per line, relative to the list file's folder, `#` comments) or a `pipe:` / URL. Every command
that takes shards (data.shards, validation.shards, --shards, --fid-shards, --prompts, t2i cache,
bench-loader) goes through `expand_shards`, and its errors name the key or flag that held the spec.

`pipe:` commands are shell commands. One given directly (the config, the command line) runs; one
found in a list FILE (data, read at run time) is refused unless `allow_pipe_in_lists` is set
(`data.allow_pipe_in_lists`), so a shard list from elsewhere cannot run commands.

Tar shards are read here (not by webdataset's reader) so that a damaged shard is counted once and
its tail is never lost silently. Per shard read, at most one event:

* ``read``: the reader failed (data cut inside a member, a corrupt header, a `pipe:` command that
  failed, a file that cannot be opened); the sample being read is dropped.
* ``short_shard``: the tar ends without error but early: no end-of-archive marker (cut at a header
  boundary; the last, possibly incomplete, sample is dropped), or fewer samples than the shard's
  entry in the `manifest.json` that `t2i make-shards` writes next to its shards.
"""

from __future__ import annotations

import glob
import json
import logging
import lzma
import os
import random
import re
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import braceexpand

from t2i.errors import DataError

log = logging.getLogger(__name__)

SHARD_EVENTS = ("read", "short_shard")  # what reading a shard can report (at most one per shard read)
MANIFEST = "manifest.json"              # written by t2i make-shards next to its shards
TAR_SUFFIXES = (".tar", ".tgz", ".gz")   # a file with another suffix is a list file
# What reading a damaged / unreachable shard raises (open, pipe exit status, tar, gzip / xz streams);
# anything else is a bug and keeps its traceback.
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error, lzma.LZMAError)


def is_pipe(url: str) -> bool:
    return url[:5].lower() == "pipe:"  # gopen parses the scheme case-insensitively


def is_remote(url: str) -> bool:
    """A `pipe:` command or a URL: nothing on the local disk to check."""
    return is_pipe(url) or "://" in url


# ----------------------------------------------------------------------------------------------
# Specs -> shard list
# ----------------------------------------------------------------------------------------------


SPEC_FORMS = ("a brace range (data/x-{000000..000009}.tar), a glob (data/*.tar, x-0000[67].tar), a folder "
              "of .tar shards, a list file (one path or pattern per line, relative to the list file), "
              "or several of these joined with '::'")


def expand_shards(spec, *, allow_pipe_in_lists: bool = False, key: str = "data.shards") -> list[str]:
    """Brace patterns, globs (`*`, `?`, `[..]`), lists, `::`-joined lists, directories (*.tar), list files,
    `pipe:` URLs, in the order given (a glob or a folder sorted by name).

    `key` names where the spec came from (a config key such as `validation.shards`, or a flag such as
    `--shards`) in every error message. A `pipe:` line of a list file raises DataError unless
    `allow_pipe_in_lists`; so do unbalanced braces, a glob that matches no shard, a list file that is not
    text, missing and empty (0-byte) shards. Relative paths in a list file are relative to its folder.
    """
    urls = _expand(spec, key, allow_pipe_in_lists, origin=None)
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{key}: {len(missing)} shard(s) not found: {missing[:3]}{more}; {key} takes "
                        f"{SPEC_FORMS}")
    empty = [u for u in local if os.path.isfile(u) and os.path.getsize(u) == 0]
    if empty:
        more = f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""
        raise DataError(f"{key}: {len(empty)} shard(s) are empty files (0 bytes, e.g. from a killed copy or "
                        f"write): {empty[:3]}{more}; re-create them or leave them out of {key}")
    if not urls:
        raise DataError(f"{key}={spec!r} names no shards")
    return urls


def _where(origin: Optional[tuple[Path, int]]) -> str:
    return f" (line {origin[1]} of list file {origin[0]})" if origin else ""


def _braces(item: str, key: str, origin) -> list[str]:
    try:
        return list(braceexpand.braceexpand(item))
    except braceexpand.UnbalancedBracesError:
        raise DataError(f"{key}: unbalanced braces in shard pattern {item!r}{_where(origin)}; "
                        f"a range reads e.g. data/x-{{000000..000009}}.tar") from None


GLOB_CHARS = re.compile(r"[*?[]")


def _expand(spec, key: str, allow_pipe: bool, origin) -> list[str]:
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls: list[str] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        found: list[str] = []
        for one in _braces(item, key, origin):
            if is_remote(one):
                found.append(one)
                continue
            if origin is not None and not os.path.isabs(one):  # a list file's paths are relative to it
                one = os.path.join(os.path.dirname(str(origin[0])), one)
            found += _local(one, key, allow_pipe, origin)
        if origin is not None and not allow_pipe:
            pipes = [u for u in found if is_pipe(u)]
            if pipes:
                raise DataError(f"{key}: line {origin[1]} of list file {origin[0]} is a `pipe:` command "
                                f"({pipes[0]!r}); commands in a list file are not run unless "
                                f"data.allow_pipe_in_lists=true (a `pipe:` given directly in {key} runs)")
        urls += found
    return urls


def _local(item: str, key: str, allow_pipe: bool, origin) -> list[str]:
    """One local path after brace expansion: a folder's shards, a list file's, a glob's matches, or itself
    (a missing file is reported by expand_shards with the others)."""
    path = Path(item)
    if path.is_dir():
        # os.path.join keeps the folder prefix ("./x.tar", not "x.tar"), so no file name can
        # read as a URL scheme (a file called "pipe:...tar" in ".")
        found = [os.path.join(item, p.name) for p in sorted(path.glob("*.tar"))]
        if not found:
            raise DataError(f"{key}: directory {item}{_where(origin)} holds no .tar shards")
        return found
    if path.is_file() and path.suffix not in TAR_SUFFIXES:
        found = []
        for n, line in enumerate(_list_lines(path, key, origin), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                found += _expand([line], key, allow_pipe, origin=(path, n))
        return found
    if not path.exists() and GLOB_CHARS.search(item):
        matches = sorted(glob.glob(item))
        shards = [m for m in matches if os.path.isfile(m) and m.endswith(TAR_SUFFIXES)]
        if not shards:
            what = (f"only {len(matches)} non-shard path(s), e.g. {matches[0]!r}" if matches else "nothing")
            raise DataError(f"{key}: the glob {item!r}{_where(origin)} matches {what}; a glob must match "
                            f"shard files ({', '.join(TAR_SUFFIXES)})")
        # same folder prefix rule as above: "./pipe:x.tar", never "pipe:x.tar"
        return [m if os.path.dirname(m) else os.path.join(".", m) for m in shards]
    return [item]


def _list_lines(path: Path, key: str, origin) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{key}: {path}{_where(origin)} is neither a tar shard ({', '.join(TAR_SUFFIXES)}) "
                        f"nor a text file listing shards (it is not UTF-8 text)") from None


# ----------------------------------------------------------------------------------------------
# Manifests (t2i make-shards) -> expected sample counts
# ----------------------------------------------------------------------------------------------


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """{url: samples} for the local shards listed in a `manifest.json` next to them (t2i make-shards).
    A manifest.json of another schema is ignored (with a warning): the counts are a check, not data."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for u in urls:
        if not is_remote(u):
            by_dir[os.path.dirname(u) or "."].append(u)
    out: dict[str, int] = {}
    for folder, members in by_dir.items():
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                listed = {e["name"]: int(e["samples"]) for e in json.load(f)["shards"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s is not a t2i make-shards manifest (%s: %s); its shards' sample counts are not "
                        "checked", path, type(e).__name__, e)
            continue
        for u in members:
            if os.path.basename(u) in listed:
                out[u] = listed[os.path.basename(u)]
    return out


# ----------------------------------------------------------------------------------------------
# Slots
# ----------------------------------------------------------------------------------------------


def slot_plan(urls: list[str], epoch: int, seed: int, slot: int, n_slots: int) -> tuple[list[str], int, int]:
    """(shards, stride, offset) of one slot in one epoch: keep samples i with i % stride == offset."""
    order = list(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= n_slots:
        return order[slot::n_slots], 1, 0
    return order, n_slots, slot


# ----------------------------------------------------------------------------------------------
# Tar shards -> raw samples (+ one event per damaged shard)
# ----------------------------------------------------------------------------------------------


class _TarInfo(tarfile.TarInfo):
    """Records on the TarFile how the last header read ended: the archive's end-of-archive marker (a
    zero block), or data that ran out / is corrupt (tarfile itself ends silently on those)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.t2i_end = "marker"
            raise
        except tarfile.HeaderError as e:  # empty / truncated / invalid header
            tar.t2i_end = type(e).__name__
            raise


def _key_ext(name: str) -> tuple[Optional[str], Optional[str]]:
    """webdataset's grouping rule: key = the path up to the first dot of the file name."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _skipped(name: str) -> bool:
    """Members webdataset skips: `__meta__` style names (and `__x__/...` folders)."""
    return bool(re.match(r"__[^/]*__($|/)", name)) or ("/" not in name and name.startswith("__")
                                                      and name.endswith("__"))


def _event(reason: str, url: str, detail: str) -> dict:
    return {"__event__": reason, "__url__": url, "__detail__": detail}


def shard_items(url: str, expected: Optional[int] = None) -> Iterator[dict]:
    """The complete samples of one tar shard in file order ({"__key__", "__url__", ext: bytes}), then at
    most one event dict ({"__event__": "read" | "short_shard", "__url__", "__detail__"}) if the shard
    could not be read to its end-of-archive marker or holds fewer samples than `expected`."""
    from webdataset.gopen import gopen  # local paths, pipe: commands, URLs

    n = 0
    event = None
    stream = None
    try:
        stream = gopen(url, "rb")
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
        tar.t2i_end = None
        current: Optional[dict] = None
        for info in tar:
            name = info.name
            if not info.isreg() or _skipped(name):
                continue
            key, ext = _key_ext(name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                if not current.get("__bad__"):
                    n += 1
                    yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            data = tar.extractfile(info).read()  # data cut inside a member: raises here
            tar.members = []
            ext = ext.lower()
            if ext in current:  # the same member twice: the sample is not what was written
                current["__bad__"] = True
            current[ext] = data
        end = tar.t2i_end
        if end == "marker":
            if current is not None and not current.get("__bad__"):
                n += 1
                yield current
            if expected is not None and n < expected:
                event = _event("short_shard", url, f"shard {url} ended after {n} samples, but {MANIFEST} "
                                                   f"lists {expected} for it (rewritten, or a stale manifest?)")
            elif expected is not None and n > expected:
                log.warning("shard %s holds %d samples, more than the %d its %s lists (a stale manifest?)",
                            url, n, expected, MANIFEST)
        elif end == "InvalidHeaderError":
            event = _event("read", url, f"shard {url}: corrupt tar header after {n} samples; the rest of "
                                        f"the shard is skipped")
        else:  # EmptyHeaderError / TruncatedHeaderError: the data just stops
            of = f" of the {expected} its {MANIFEST} lists" if expected is not None else ""
            event = _event("short_shard", url, f"shard {url} ends without the tar end-of-archive marker (cut "
                                               f"short?) after {n} complete samples{of}; the last, possibly "
                                               f"incomplete, sample is dropped")
    except READ_ERRORS as e:  # a shard that cannot be read on is one counted event, not a crash
        event = _event("read", url, f"shard {url} could not be read past sample {n}: {type(e).__name__}: {e}")
    finally:
        if stream is not None:
            try:
                stream.close()  # a pipe: command that exited with an error raises here
            except READ_ERRORS as e:
                if event is None:
                    event = _event("read", url, f"shard {url}: {type(e).__name__}: {e}")
    if event is not None:
        yield event


def read_shards(urls: list[str], expected: Optional[dict] = None) -> Iterator[dict]:
    """`shard_items` of each url in turn (samples and events); `expected`: {url: samples} (manifest_counts)."""
    expected = expected or {}
    for url in urls:
        yield from shard_items(url, expected.get(url))


def raw_samples(urls: list[str], counts: dict, expected: Optional[dict] = None) -> Iterator[dict]:
    """Undecoded samples (dict of bytes) from tar shards; a damaged shard is counted once in `counts`
    (under its SHARD_EVENTS reason) and logged, not raised."""
    for item in read_shards(urls, expected):
        reason = item.get("__event__")
        if reason is None:
            yield item
            continue
        counts[reason] = counts.get(reason, 0) + 1
        log.warning(item["__detail__"])
