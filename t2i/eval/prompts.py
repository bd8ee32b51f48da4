"""Prompt sets for sampling and evaluation: what `t2i sample` reads and what GenEval scores.

A prompt set is a list of metadata dicts, each with at least "prompt"; GenEval sets also carry
"tag", "include" and (counting) "exclude" (docs/design/evaluation.md §1.1). Sources:

  *.jsonl          a GenEval metadata file (one JSON object per line), e.g. GenEval's own
                   evaluation_metadata.jsonl (553 prompts) or one written by `write_shapes_geneval`
  *.txt            one prompt per line (blank lines skipped)
  shards           anything t2i.data.loader.expand_shards accepts (brace pattern, dir, list): the
                   captions in file order, with the GenEval clauses when the sample's json has them
"""

from __future__ import annotations

import json
from pathlib import Path

GENEVAL_KEYS = ("tag", "include", "exclude", "prompt")  # key order of the official file


def load_prompts(source: str, limit: int | None = None) -> list[dict]:
    """Prompt metadata from a GenEval jsonl, a text file or shards; the first `limit` if given."""
    path = Path(source)
    if path.suffix == ".jsonl":
        if not path.exists():
            raise FileNotFoundError(f"prompt file not found: {source}")
        with open(path) as f:
            out = [json.loads(line) for line in f if line.strip()]
    elif path.suffix == ".txt" and path.exists():
        out = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    else:
        out = _from_shards(source, limit)
    for i, m in enumerate(out):
        if not isinstance(m, dict) or not isinstance(m.get("prompt"), str):
            raise ValueError(f"{source}: entry {i} has no 'prompt' string: {m!r}")
    return out[:limit] if limit else out


def _from_shards(spec: str, limit: int | None) -> list[dict]:
    import webdataset as wds

    from t2i.data.shards import expand_shards

    out = []
    for sample in wds.WebDataset(expand_shards(spec), shardshuffle=False, empty_check=False):
        caption = sample.get("txt")
        if caption is None:
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        entry = {k: meta[k] for k in GENEVAL_KEYS[:3] if k in meta}
        entry["prompt"] = caption.decode("utf-8").strip()
        out.append(entry)
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no captions found in {spec!r} (expected .jsonl, .txt or WebDataset shards)")
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


def write_shapes_geneval(out_dir: str | Path, per_tag: int = 16, seed: int = 2) -> Path:
    """<out_dir>/evaluation_metadata.jsonl, generation_prompts.txt and object_names.txt, the files of
    GenEval's prompts/ folder, for the shapes domain. Returns the metadata path."""
    from t2i.data.shapes import SHAPES

    out_dir = Path(out_dir)
    entries = shapes_geneval(per_tag, seed)
    path = write_prompts(entries, out_dir / "evaluation_metadata.jsonl")
    (out_dir / "generation_prompts.txt").write_text("".join(e["prompt"] + "\n" for e in entries))
    (out_dir / "object_names.txt").write_text("".join(s + "\n" for s in SHAPES))
    return path
