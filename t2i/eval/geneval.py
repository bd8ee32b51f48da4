"""GenEval scoring: the official per-image rules and summary (docs/design/evaluation.md §1.5–1.6), over pluggable
detectors and colour classifiers.

(Interface first; the rules follow below.)
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
from PIL import Image, ImageOps

from t2i.errors import EvalError
from t2i.geneval_spec import POSITION_THRESHOLD, TAGS, relations
from t2i.io import write_jsonl


@dataclass
class Detection:
    """One detected object. `box` is [x1, y1, x2, y2] in pixels of the image as given (mmdet's mask
    boxes: [x_min, y_min, x_max + 1, y_max + 1]); `mask` is a bool [H, W] array or None."""
    label: int                      # class index into the detector's `class_names`
    score: float
    box: tuple
    mask: Optional[np.ndarray] = None


class Detector(Protocol):
    name: str                       # how reports label the backend, e.g. "shapes-exact"
    class_names: list[str]          # index -> class name as prompts write it ("person", "circle", ...)

    def __call__(self, images: list[Image.Image]) -> list[list[Detection]]: ...


class ColorClassifier(Protocol):
    name: str
    colors: list[str]               # GenEval: red orange yellow green blue purple pink brown black white

    def __call__(self, image: Image.Image, objects: list[Detection], class_name: str) -> list[str]: ...


# ----------------------------------------------------------------------------------------------
# Official options (evaluate_images.py defaults)
# ----------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class Options:
    threshold: float = 0.3          # keep a detection iff score > threshold (strict) ...
    counting_threshold: float = 0.9  # ... or > this for every class of a `counting` prompt
    max_objects: int = 16           # per class, after thresholding
    max_overlap: float = 1.0        # greedy NMS IoU; 1.0 = off (the default)
    position_threshold: float = POSITION_THRESHOLD


DEFAULTS = Options()


# ----------------------------------------------------------------------------------------------
# Step A: keep detections
# ----------------------------------------------------------------------------------------------


def _iou(a, b) -> float:
    """IoU with GenEval's (mmdet's) "+1 pixel" convention."""
    area = lambda r: max(r[2] - r[0] + 1, 0) * max(r[3] - r[1] + 1, 0)
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def keep_objects(detections: list[Detection], class_names: list[str], tag: str,
                 opts: Options = DEFAULTS) -> dict[str, list[Detection]]:
    """class name -> its kept detections, best first (docs/design/evaluation.md §1.5 step A)."""
    threshold = opts.counting_threshold if tag == "counting" else opts.threshold
    kept: dict[str, list[Detection]] = {}
    for label, name in enumerate(class_names):
        objs = sorted((d for d in detections if d.label == label), key=lambda d: -d.score)
        objs = [d for d in objs if d.score > threshold][: opts.max_objects]
        if opts.max_overlap < 1.0:
            survivors = []
            while objs:
                best, objs = objs[0], objs[1:]
                survivors.append(best)
                objs = [d for d in objs if _iou(best.box, d.box) < opts.max_overlap]
            objs = survivors
        if objs:
            kept[name] = objs
    return kept


# ----------------------------------------------------------------------------------------------
# Step B: judge one image
# ----------------------------------------------------------------------------------------------


def judge(kept: dict[str, list[Detection]], metadata: dict, classify_colors=None,
          opts: Options = DEFAULTS) -> tuple[bool, str]:
    """(correct, reason) of one image against its prompt's include/exclude clauses (§1.5 step B).

    `classify_colors(objects, class_name) -> [colour per object]` is only called for clauses with a
    colour, on the clause's first `count` objects. Every failing clause adds a line to `reason`,
    worded as the official evaluator words it."""
    correct, reason, matched_groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = kept.get(name, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = list(classify_colors(found, name))
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reason.append(f"expected {req['color']} {name}>={count}, found "
                                  f"{colors.count(req['color'])} {req['color']}; and {seen}")
            if "position" in req and matched:
                rel, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {name} to be {rel}")
                else:
                    for a in found:
                        for b in matched_groups[target]:
                            true_rels = relations(a.box, b.box, opts.position_threshold)
                            if rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {name} {rel} target, found "
                                              f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(kept.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reason.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reason)


def evaluate_image(image: Image.Image, detections: list[Detection], metadata: dict, class_names: list[str],
                   color_classifier: Optional[ColorClassifier] = None, opts: Options = DEFAULTS,
                   filename: str = "", custom_tags: bool = False) -> dict:
    """One official results.jsonl record: filename, tag, prompt, correct, reason, metadata, details.

    A tag outside GenEval's six is refused unless `custom_tags`: such an image is judged with the
    include/exclude rules and the plain `threshold` (only `counting` uses the counting threshold), and
    `summarize` reports it under "custom_tags", never in the overall score."""
    check_tags([metadata], custom_tags)
    kept = keep_objects(detections, class_names, metadata["tag"], opts)

    def classify(objects, name):
        if color_classifier is None:
            raise ValueError(f"prompt {metadata['prompt']!r} asks for a colour but no colour classifier is set")
        return color_classifier(image, objects, name)

    correct, reason = judge(kept, metadata, classify, opts)
    details = {name: [[*map(float, d.box[:4]), float(d.score)] for d in objs] for name, objs in kept.items()}
    return {"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details)}


# ----------------------------------------------------------------------------------------------
# Aggregation (summary_scores.py)
# ----------------------------------------------------------------------------------------------


def is_tagged(meta: dict) -> bool:
    """A GenEval prompt: it carries a "tag" (a .txt prompt list or shard captions give none)."""
    return isinstance(meta, dict) and isinstance(meta.get("tag"), str) and bool(meta["tag"])


NEEDS_METADATA = ("GenEval needs metadata .jsonl lines with \"tag\" and \"include\" fields: `t2i geneval-prompts "
                  "--out DIR` writes the shapes-domain set and GenEval's evaluation_metadata.jsonl is the official "
                  "one; sample it with `t2i sample --prompts <that .jsonl>` (`t2i fid score` and `t2i clipscore` "
                  "need no tags)")


def check_includes(metas: list[dict], names: list[str] | None = None) -> None:
    """Every prompt has an "include" list: without one every image would be judged correct."""
    no_include = [i for i, m in enumerate(metas) if not isinstance(m.get("include"), list)]
    if no_include:
        i = no_include[0]
        where = names[i] if names else f"prompt {i}"
        raise EvalError(f"{len(no_include)} prompt(s) have no GenEval \"include\" list (first: {where}, "
                        f"{metas[i].get('prompt')!r}); every metadata line needs \"include\": the objects the image "
                        f"must show, e.g. [{{\"class\": \"circle\", \"count\": 1}}]")


def check_tags(metas: list[dict], custom_tags: bool = False, names: list[str] | None = None) -> list[str]:
    """The sorted custom (non-GenEval) tags among `metas`; refused (EvalError) unless `custom_tags`.

    Every prompt needs a string "tag"; prompts with no tag at all are not a GenEval set, and the error
    says what one is (NEEDS_METADATA). The error for unknown tags names each (with the
    closest valid one), how many prompts carry it and the first of them (`names[i]` labels metas[i], e.g.
    its folder)."""
    untagged = [i for i, m in enumerate(metas) if not is_tagged(m)]
    if untagged and len(untagged) == len(metas):
        where = names[0] if names else "prompt 0"
        raise EvalError(f"no GenEval metadata: none of the {len(metas)} prompt(s) has a \"tag\" (first: {where}, "
                        f"{metas[0].get('prompt')!r}), as when they come from a .txt prompt list or shard captions. "
                        + NEEDS_METADATA)
    if untagged:
        i = untagged[0]
        where = names[i] if names else f"prompt {i}"
        raise EvalError(f"{len(untagged)} prompt(s) have no GenEval tag (first: {where}, {metas[i].get('prompt')!r}); "
                        f"every metadata line needs \"tag\": one of {', '.join(TAGS)}")
    custom: dict[str, list[int]] = {}
    for i, m in enumerate(metas):
        if m["tag"] not in TAGS:
            custom.setdefault(m["tag"], []).append(i)
    if custom and not custom_tags:
        parts = []
        for tag, idx in sorted(custom.items()):
            close = difflib.get_close_matches(tag, TAGS, n=1)
            where = names[idx[0]] if names else f"prompt {idx[0]}"
            parts.append(f"{tag!r} ({len(idx)} prompt(s), first {where}"
                         + (f"; did you mean {close[0]!r}?" if close else "") + ")")
        raise EvalError(f"unknown GenEval tag(s): {', '.join(parts)}; the valid tags are {', '.join(TAGS)} "
                        f"(fix the metadata, or pass --custom-tags to score other tags separately, outside the "
                        f"overall score)")
    return sorted(custom)


def _tag_scores(records: list[dict]) -> dict:
    by_tag: dict[str, list[bool]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    return {t: {"score": sum(v) / len(v), "correct": sum(v), "images": len(v)} for t, v in by_tag.items()}


def _side_numbers(records: list[dict]) -> dict:
    by_prompt: dict[str, bool] = {}
    for r in records:
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
    return {"images": len(records), "prompts": len(by_prompt),
            "correct_images": sum(bool(r["correct"]) for r in records) / len(records) if records else None,
            "correct_prompts": sum(by_prompt.values()) / len(by_prompt) if by_prompt else None}


CUSTOM_NOTE = ("custom tags are not GenEval tags: judged with the include/exclude rules and the plain threshold, "
               "reported separately and never part of the overall score")


def summarize(records: list[dict], custom_tags: bool = False) -> dict:
    """Per-tag score = mean `correct` over that tag's images; overall = mean of the tag scores (the
    GenEval score). Also the official side numbers: % correct images and % correct prompts (a prompt
    is correct when any of its images is; prompts are grouped by their metadata string).

    Only GenEval's six tags enter "tags", "overall" and the side numbers. Records of other tags are
    refused (EvalError) unless `custom_tags`; then they are summarised in "custom_tags" ({"tags", "images",
    "prompts", "correct_images", "correct_prompts", "note"}) and "overall" is None when no official tag
    is present. "custom_tags" is {} when there are none."""
    if not records:
        raise EvalError("no results to summarise (no scorable images)")
    check_tags([{"tag": r["tag"], "prompt": r.get("prompt")} for r in records], custom_tags,
               names=[r.get("filename") or f"record {i}" for i, r in enumerate(records)])
    official = [r for r in records if r["tag"] in TAGS]
    custom = [r for r in records if r["tag"] not in TAGS]
    tags = _tag_scores(official)
    summary = {"overall": sum(t["score"] for t in tags.values()) / len(tags) if tags else None, "tags": tags,
               **_side_numbers(official), "custom_tags": {}}
    if custom:
        summary["custom_tags"] = {"tags": _tag_scores(custom), **_side_numbers(custom), "note": CUSTOM_NOTE}
    return summary


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def summary_table(summary: dict) -> str:
    """Markdown: the overall score and one row per tag, in GenEval's tag order; custom tags (if any) in a
    separate table below, outside the overall."""
    order = [t for t in TAGS if t in summary["tags"]] + [t for t in summary["tags"] if t not in TAGS]
    lines = ["| tag | score | correct / images |", "|---|---:|---:|"]
    for t in order:
        s = summary["tags"][t]
        lines.append(f"| {t} | {s['score']:.4f} | {s['correct']} / {s['images']} |")
    lines.append(f"| **overall (mean of tags)** | **{_fmt(summary['overall'], '.4f')}** | |")
    lines.append(f"\n{summary['images']} images, {summary['prompts']} prompts; correct images "
                 f"{_fmt(summary['correct_images'], '.2%')}, correct prompts {_fmt(summary['correct_prompts'], '.2%')}")
    custom = summary.get("custom_tags") or {}
    if custom:
        lines += ["", "Custom tags (not GenEval tags; NOT part of the overall score):", "",
                  "| custom tag | score | correct / images |", "|---|---:|---:|"]
        for t, s in sorted(custom["tags"].items()):
            lines.append(f"| {t} | {s['score']:.4f} | {s['correct']} / {s['images']} |")
        lines.append(f"\n{custom['images']} images, {custom['prompts']} prompts; {custom['note']}")
    skipped = summary.get("skipped_images") or []
    if skipped:
        lines.append(f"\n{len(skipped)} unreadable or oversized images skipped (--allow-incomplete): "
                     + ", ".join(s["file"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The image folder (GenEval layout) and its validation
# ----------------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> list[dict]:
    """A GenEval metadata jsonl (one prompt's metadata per line) -> list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"GenEval metadata file not found: {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(_json_line(line, f"{path}:{n}"))
    return out


def _json_line(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
        raise EvalError(f"{where}: expected a JSON object with a \"prompt\" string, got {text.strip()[:80]!r}")
    return value


def list_images(folder: str | Path) -> dict[int, tuple[dict, list[Path]]]:
    """prompt index -> (its metadata, its images), exactly as evaluate_images.py selects them: a
    sub-folder counts iff its name is all digits; a sample counts iff its name matches r"\\d+\\.png"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"image folder does not exist: {folder}")
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        if not meta_path.exists():
            raise EvalError(f"{meta_path} is missing (every prompt folder needs its metadata)")
        try:
            text = meta_path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"{meta_path} cannot be read ({e})") from None
        meta = _json_line(text, str(meta_path))
        samples = sub / "samples"
        images = sorted(p for p in samples.iterdir() if p.is_file() and re.match(r"\d+\.png", p.name)) \
            if samples.is_dir() else []
        out[int(sub.name)] = (meta, images)
    return out


# ----------------------------------------------------------------------------------------------
# Unreadable and oversized images
# ----------------------------------------------------------------------------------------------


MAX_PIXELS = 40_000_000  # width x height cap, checked from the header before decoding (--max-pixels)


class BadImage(Exception):
    """An image that cannot be scored: unreadable (truncated, not an image) or over the pixel cap."""


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Image.open (header only) + the pixel cap; PIL's own decompression-bomb error counts as oversized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise BadImage(f"oversized ({e})") from None
        except Exception as e:  # noqa: BLE001 - any failure to read the header means: not an image
            raise BadImage(f"unreadable ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadImage(f"oversized: {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel cap (--max-pixels)")
    return im


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if `path` looks scorable, else why not: the header and the pixel cap, then PIL's `verify`
    (chunk structure and CRCs, which catches a truncated PNG) without decoding the pixels."""
    try:
        im = _open_checked(Path(path), max_pixels)
    except BadImage as e:
        return str(e)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.verify()
    except Exception as e:  # noqa: BLE001
        return f"unreadable ({type(e).__name__}: {e})"
    finally:
        im.close()
    return None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The EXIF-transposed RGB image, decoded only after the header passed the pixel cap; BadImage if not."""
    im = _open_checked(Path(path), max_pixels)
    try:
        with im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder failure is a bad image, named by the caller
        raise BadImage(f"unreadable ({type(e).__name__}: {e})") from None


def bad_images(paths: list[Path], max_pixels: int = MAX_PIXELS) -> list[dict]:
    """[{"file", "reason"}] for every path `check_image` refuses, in order."""
    out = []
    for path in paths:
        reason = check_image(path, max_pixels)
        if reason is not None:
            out.append({"file": str(path), "reason": reason})
    return out


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> "00001-00003, 00007"."""
    out, start = [], None
    for i, x in enumerate(indices):
        start = x if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(f"{start:05d}" if start == x else f"{start:05d}-{x:05d}")
            start = None
    return ", ".join(out)


def validate(found: dict[int, tuple[dict, list[Path]]], expected: Optional[list[dict]] = None,
             images_per_prompt: Optional[int] = None) -> list[str]:
    """Problems of a folder against the prompt set and image count it should hold (empty = complete).

    Without `expected`, the prompts are taken as 0..max found index; without `images_per_prompt`, the
    most common count found. Each problem names the prompt folders (as ranges) and what is wrong."""
    if not found:
        return ["no prompt folders (<5-digit index>/metadata.jsonl + samples/<n>.png) found"]
    n_prompts = len(expected) if expected is not None else max(found) + 1
    counts = [len(imgs) for _, imgs in found.values()]
    n_images = images_per_prompt or max(set(counts), key=counts.count)
    problems = []
    missing = [i for i in range(n_prompts) if i not in found]
    if missing:
        problems.append(f"{len(missing)} of {n_prompts} prompt folders missing: {_ranges(missing)}")
    extra = sorted(i for i in found if i >= n_prompts)
    if extra:
        problems.append(f"{len(extra)} prompt folders beyond the {n_prompts} prompts: {_ranges(extra)}")
    short = sorted(i for i, (_, imgs) in found.items() if i < n_prompts and len(imgs) != n_images)
    if short:
        detail = ", ".join(f"{i:05d} ({len(found[i][1])})" for i in short[:20]) + (" ..." if len(short) > 20 else "")
        problems.append(f"{len(short)} prompt folders do not have {n_images} images: {detail}")
    if expected is not None:
        wrong = sorted(i for i, (meta, _) in found.items() if i < n_prompts and meta != expected[i])
        if wrong:
            i = wrong[0]
            problems.append(f"{len(wrong)} prompt folders' metadata differ from the prompt set: {_ranges(wrong)} "
                            f"(first: {found[i][0].get('prompt')!r} vs {expected[i].get('prompt')!r})")
    return problems


# ----------------------------------------------------------------------------------------------
# Scoring a folder
# ----------------------------------------------------------------------------------------------


def score_folder(folder: str | Path, detector: Detector, color_classifier: Optional[ColorClassifier] = None,
                 opts: Options = DEFAULTS, batch_size: int = 8, rank: int = 0, world: int = 1,
                 progress: bool = True, custom_tags: bool = False, max_pixels: int = MAX_PIXELS,
                 skip: Iterable = (), bad: list | None = None) -> list[dict]:
    """results.jsonl records for this rank's share (every `world`-th image) of the folder's images,
    in file order. Per-image results do not depend on the split; merge the shares and summarise once.

    Images in `skip` (paths) are left out. An image that fails to decode (or is over `max_pixels`) is
    appended to `bad` as {"file", "reason"} and left out; without a `bad` list it is an EvalError."""
    from tqdm import tqdm

    skip = {str(p) for p in skip}
    jobs = [(img, meta) for _, (meta, imgs) in sorted(list_images(folder).items()) for img in imgs
            if str(img) not in skip][rank::world]
    records = []
    bar = tqdm(total=len(jobs), desc="geneval", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        chunk, images = [], []
        for path, meta in jobs[start:start + batch_size]:
            try:
                images.append(load_image(path, max_pixels))
            except BadImage as e:
                if bad is None:
                    raise EvalError(f"{path}: {e} (re-sample it, or pass --allow-incomplete to skip it)") from None
                bad.append({"file": str(path), "reason": str(e)})
                continue
            chunk.append((path, meta))
        for (path, meta), image, dets in zip(chunk, images, detector(images) if images else [], strict=True):
            records.append(evaluate_image(image, dets, meta, detector.class_names, color_classifier, opts,
                                          filename=str(path), custom_tags=custom_tags))
        bar.update(len(jobs[start:start + batch_size]))
    bar.close()
    return records


def write_results(records: list[dict], path: str | Path) -> Path:
    """results.jsonl: the official fields, one image per line, sorted by filename (atomically)."""
    return write_jsonl(path, sorted(records, key=lambda r: r["filename"]))


def read_results(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
