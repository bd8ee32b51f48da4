"""Prompt sets for sampling and evaluation: what `t2i sample` reads and what GenEval scores.

A prompt set is a list of metadata dicts, each with at least "prompt"; GenEval sets also carry
"tag", "include" and (counting) "exclude" (docs/design/evaluation.md §1.1). Sources:

  *.jsonl          a GenEval metadata file (one JSON object per line), e.g. GenEval's own
                   evaluation_metadata.jsonl (553 prompts) or one written by `write_shapes_geneval`
  *.txt            one prompt per line (blank lines skipped)
  shards           anything t2i.data.loader.expand_shards accepts (brace pattern, dir, list): the
                   captions in file order, with the GenEval clauses when the sample's json has them

Prompts get the training caption rule (invalid UTF-8 -> U+FFFD, cut to data.max_caption_bytes);
input problems are EvalErrors naming the flag (`--prompts`), file and line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from t2i.errors import DataError, EvalError

log = logging.getLogger(__name__)

GENEVAL_KEYS = ("tag", "include", "exclude", "prompt")  # key order of the official file


def load_prompts(source: str, limit: int | None = None, *, max_caption_bytes: int | None = None,
                 counts: dict | None = None, what: str = "--prompts") -> list[dict]:
    """Prompt metadata from a GenEval jsonl, a text file or shards; the first `limit` if given.

    Prompts go through the training caption rule (t2i.data.decode.clean_caption): invalid UTF-8 ->
    U+FFFD, cut to `max_caption_bytes` UTF-8 bytes (default: data.max_caption_bytes's default), both
    counted in `counts` (caption_invalid_utf8, caption_truncated) and logged. Every input problem
    (a missing file, a line that is not JSON, an entry without a prompt, unreadable shards) is an
    EvalError naming `what` (the flag or key that gave `source`) and the file / line.
    """
    from t2i.data.decode import CAPTION_NOTES, MAX_CAPTION_BYTES

    max_bytes = MAX_CAPTION_BYTES if max_caption_bytes is None else max_caption_bytes
    notes = {k: 0 for k in CAPTION_NOTES}
    path = Path(source)
    if path.suffix in (".jsonl", ".txt") and not path.is_dir():
        if not path.is_file():
            raise EvalError(f"{what}: prompt file not found: {source}")
        out = (_from_jsonl if path.suffix == ".jsonl" else _from_text)(path, max_bytes, notes, what)
    else:
        out = _from_shards(source, limit, max_bytes, notes, what)
    for i, m in enumerate(out):
        if not isinstance(m, dict) or not isinstance(m.get("prompt"), str):
            raise EvalError(f"{what}: {source}: entry {i} has no 'prompt' string: {m!r}")
    if any(notes.values()):
        log.warning("%s %s: %d prompt(s) with invalid UTF-8 (replaced by U+FFFD), %d cut to %d bytes "
                    "(data.max_caption_bytes)", what, source, notes["caption_invalid_utf8"],
                    notes["caption_truncated"], max_bytes)
    if counts is not None:
        for k, n in notes.items():
            counts[k] = counts.get(k, 0) + n
    return out[:limit] if limit else out


def _from_text(path: Path, max_bytes: int, notes: dict, what: str) -> list[dict]:
    """One prompt per line (blank lines skipped); read as bytes so invalid UTF-8 is replaced, not fatal."""
    from t2i.data.decode import clean_caption

    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            out.append({"prompt": clean_caption(line, max_bytes, notes)})
    return out


def _from_jsonl(path: Path, max_bytes: int, notes: dict, what: str) -> list[dict]:
    from t2i.data.decode import clean_caption

    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(clean_caption(line, None, notes))
        except ValueError as e:
            raise EvalError(f"{what}: {path} line {n} is not a JSON object ({e})") from None
        if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            entry["prompt"] = clean_caption(entry["prompt"], max_bytes, notes)
        out.append(entry)
    return out


def _from_shards(spec: str, limit: int | None, max_bytes: int, notes: dict, what: str) -> list[dict]:
    from t2i.data.decode import clean_caption
    from t2i.data.shards import expand_shards, manifest_counts, read_shards

    try:
        urls = expand_shards(spec, key=what)
    except DataError as e:
        raise EvalError(f"{e} (expected a .jsonl, a .txt or WebDataset shards)") from None
    out = []
    for sample in read_shards(urls, manifest_counts(urls)):
        if "__event__" in sample:  # a damaged or short shard: the prompt set would silently lose prompts
            raise EvalError(f"{what}: {sample['__detail__']}")
        caption = sample.get("txt")
        if caption is None:
            continue
        try:
            meta = json.loads(clean_caption(sample["json"], None)) if "json" in sample else {}
        except ValueError as e:
            raise EvalError(f"{what}: sample {sample['__key__']} of {sample['__url__']} has unreadable json "
                            f"({e})") from None
        meta = meta if isinstance(meta, dict) else {}
        entry = {k: meta[k] for k in GENEVAL_KEYS[:3] if k in meta}
        entry["prompt"] = clean_caption(caption, max_bytes, notes)
        out.append(entry)
        if limit and len(out) >= limit:
            break
    if not out:
        raise EvalError(f"{what}: no captions found in {spec!r} (expected .jsonl, .txt or WebDataset shards)")
    return out


def write_prompts(entries: list[dict], path: str | Path) -> Path:
    """A GenEval metadata jsonl (keys in the official order), written atomically."""
    from t2i.io import write_jsonl

    return write_jsonl(path, ({k: e[k] for k in GENEVAL_KEYS if k in e} for e in entries))


def shapes_geneval(per_tag: int = 16, seed: int = 2) -> list[dict]:
    """A GenEval-format prompt set for the synthetic shapes domain: up to `per_tag` distinct prompts for
    each of the six tags (GenEval de-duplicates too, so single_object has the 3 shapes and two_object
    the 6 ordered pairs, as GenEval has one per COCO class), grouped by tag in GenEval's file order, drawn from `t2i.data.shapes.make_sample`
    with its own seed (2; the demo trains on seed 0 and validates on seed 1). Classes are the shape
    names (circle, square, triangle), colours the six palette colours; the clauses are the same as
    GenEval's, except that counting and position prompts name colours (see t2i.data.shapes)."""
    from t2i.data.shapes import TAGS, make_sample

    by_tag: dict[str, list[dict]] = {t: [] for t in TAGS}
    seen = set()
    index = 0
    while any(len(v) < per_tag for v in by_tag.values()) and index < 500 * per_tag:
        _, caption, meta = make_sample(index, seed, size=32)
        index += 1
        entry = {k: meta[k] for k in ("tag", "include", "exclude") if meta.get(k) or k != "exclude"}
        entry["prompt"] = caption
        if caption not in seen and len(by_tag[meta["tag"]]) < per_tag:
            seen.add(caption)
            by_tag[meta["tag"]].append(entry)
    return [e for t in TAGS for e in by_tag[t]]


def write_shapes_geneval(out_dir: str | Path, per_tag: int = 16, seed: int = 2, tags=None) -> Path:
    """<out_dir>/evaluation_metadata.jsonl, generation_prompts.txt and object_names.txt, the files of
    GenEval's prompts/ folder, for the shapes domain; only the prompts of `tags` when given (ValueError
    for a name that is not one of GenEval's six tags). Returns the metadata path."""
    from t2i.data.shapes import SHAPES, TAGS

    unknown = sorted(set(tags or ()) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown GenEval tag(s) {unknown}; the tags are {list(TAGS)}")
    out_dir = Path(out_dir)
    entries = [e for e in shapes_geneval(per_tag, seed) if not tags or e["tag"] in tags]
    path = write_prompts(entries, out_dir / "evaluation_metadata.jsonl")
    (out_dir / "generation_prompts.txt").write_text("".join(e["prompt"] + "\n" for e in entries))
    (out_dir / "object_names.txt").write_text("".join(s + "\n" for s in SHAPES))
    return path
