"""GenEval on a folder of samples: validate it against the prompt set, pick the backends, score the
images (split over torchrun ranks, gathered on rank 0), write results.jsonl, summary.json and
summary.md. The rules themselves are t2i.eval.geneval's; docs/design/evaluation.md §1 has the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from t2i.data.shapes import SHAPES
from t2i.errors import EvalError
from t2i.eval import geneval
from t2i.eval.backends import build_color_classifier, build_detector
from t2i.eval.prompts import load_prompts
from t2i.io import write_json, write_text


def parse_options(pairs: list[str]) -> geneval.Options:
    names = {f.name: f.type for f in fields(geneval.Options)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names:
            raise EvalError(f"--options {key}: unknown; valid keys: {', '.join(names)}")
        try:
            values[key] = int(value) if key == "max_objects" else float(value)
        except ValueError:
            raise EvalError(f"--options {pair}: expected {key}=<{'integer' if key == 'max_objects' else 'number'}>")\
                from None
    return geneval.Options(**values)


def load_prompt_set(source: str, limit: int | None, what: str) -> list[dict]:
    """load_prompts with its input errors as EvalError (a missing file, an entry without a prompt)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".txt") and not path.is_file():
        raise EvalError(f"{what}: prompt file not found: {source}")
    try:
        return load_prompts(source, limit=limit, what=what)
    except EvalError:
        raise  # already names the file
    except (ValueError, FileNotFoundError) as e:  # json.JSONDecodeError is a ValueError
        raise EvalError(f"{what}: {source}: {e}") from None


def expected_prompts(folder: Path, prompts: str | None) -> tuple[list[dict] | None, int | None, dict]:
    """(prompt set, images per prompt, sampling settings) from --prompts or the folder's manifest."""
    manifest = folder / "manifest.json"
    try:
        settings = json.loads(manifest.read_text()) if manifest.exists() else {}
    except (OSError, ValueError) as e:
        raise EvalError(f"{manifest} cannot be read ({e}); re-run t2i sample, or delete it and pass --prompts") \
            from None
    source = prompts or settings.get("prompts")
    if not source:
        return None, settings.get("images_per_prompt"), settings
    limit = None if prompts else settings.get("num_prompts")  # t2i sample --limit N took the first N
    what = "--prompts" if prompts else f"{manifest} 'prompts'"
    return load_prompt_set(source, limit, what), settings.get("images_per_prompt"), settings


def _gather(obj, world: int) -> list:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def score(folder: str | Path, *, prompts: str | None = None, images_per_prompt: int | None = None,
          detector: str | None = None, color: str | None = None, object_names: str | None = None,
          options: geneval.Options = geneval.DEFAULTS, allow_incomplete: bool = False, device: str = "cpu",
          batch_size: int = 8, out: str | Path | None = None, progress: bool = True,
          custom_tags: bool = False, max_pixels: int = geneval.MAX_PIXELS) -> dict:
    """Validate, score and summarise a GenEval-layout folder; returns the summary (rank 0).

    Refused (EvalError) before any scoring: an incomplete folder, tags outside GenEval's six (unless
    `custom_tags`: then scored into summary["custom_tags"] and custom_results.jsonl, never into "overall"
    or results.jsonl), and unreadable or oversized (> `max_pixels`) images. With `allow_incomplete`,
    gaps and bad images are skipped, each bad image named on stderr, and all listed in the summary."""
    folder = Path(folder)
    out = Path(out) if out else folder / "geneval"
    if max_pixels < 1:
        raise EvalError(f"--max-pixels must be >= 1, got {max_pixels}")
    expected, n_images, settings = expected_prompts(folder, prompts)
    found = geneval.list_images(folder)
    if found and not any(geneval.is_tagged(m) for m, _ in found.values()):  # before completeness: not GenEval
        first = min(found)
        raise EvalError(f"{folder} has no GenEval metadata: its {len(found)} prompt folder(s) carry no \"tag\" "
                        f"(first: {first:05d}/metadata.jsonl, {found[first][0].get('prompt')!r}), as when sampled "
                        f"from a .txt prompt list or shard captions. {geneval.NEEDS_METADATA}")
    problems = geneval.validate(found, expected, images_per_prompt or n_images)
    if problems and not allow_incomplete:
        raise EvalError(f"{folder} is incomplete:\n  " + "\n  ".join(problems)
                                        + "\n(finish sampling, or pass --allow-incomplete to score what is there)")
    metas = [m for m, _ in found.values()]
    labels = [f"{i:05d}/metadata.jsonl" for i in found]
    custom = geneval.check_tags(metas, custom_tags, names=labels)
    geneval.check_includes(metas, labels)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # Every rank checks every header (cheap, no decoding), so all ranks take the same decision.
    bad = geneval.bad_images([p for _, imgs in found.values() for p in imgs], max_pixels)
    if bad and not allow_incomplete:
        raise EvalError(_bad_message(folder, bad, sum(len(i) for _, i in found.values())))
    classes = {c["class"] for m in metas for c in m.get("include", []) + m.get("exclude", [])}
    if detector is None:
        if not classes <= set(SHAPES):
            raise EvalError("these prompts name classes outside the shapes domain; pass "
                             "--detector mask2former:<local folder> (and --color clip:<file>)")
        detector = "shapes"
    names = None
    if object_names:
        if not Path(object_names).is_file():
            raise EvalError(f"--object-names: file not found: {object_names}")
        names = Path(object_names).read_text().split("\n")
    det = build_detector(detector, device=device, class_names=[n for n in names if n] if names else None)
    unknown = classes - set(det.class_names)
    if unknown:
        raise EvalError(f"prompts name classes the detector {det.name} does not know: {sorted(unknown)}"
                         + ("" if object_names else "; pass --object-names (GenEval's object_names.txt)"))
    color = color or ("shapes" if detector == "shapes" else None)
    clf = build_color_classifier(color, device=device)
    if clf is None and any("color" in c for m in metas for c in m.get("include", [])):
        raise EvalError("these prompts ask for colours; pass --color clip:<local ViT-L-14 file> (or shapes)")

    t0 = time.time()
    late_bad: list[dict] = []  # passed the header check but failed to decode
    records = geneval.score_folder(folder, det, clf, options, batch_size=batch_size, rank=rank, world=world,
                                   progress=progress, custom_tags=custom_tags, max_pixels=max_pixels,
                                   skip=[b["file"] for b in bad], bad=late_bad)
    if world > 1:
        gathered = _gather((records, late_bad), world)
        records = [r for part, _ in gathered for r in part]
        late_bad = [b for _, part in gathered for b in part]
        if rank != 0:
            return {}
    if late_bad and not allow_incomplete:
        raise EvalError(_bad_message(folder, late_bad, sum(len(i) for _, i in found.values())))
    bad = sorted(bad + late_bad, key=lambda b: b["file"])
    for b in bad:  # one line each, on stderr: the run goes on without them
        print(f"geneval: skipped {b['file']}: {b['reason']}", file=sys.stderr, flush=True)
    if bad:
        problems = [*problems, f"{len(bad)} unreadable or oversized images skipped"]
    summary = geneval.summarize(records, custom_tags=custom_tags)
    summary.update(detector=det.name, color_classifier=clf.name if clf else None, options=asdict(options),
                   sampling={k: settings[k] for k in ("checkpoint", "weights", "steps", "guidance", "shift",
                                                     "resolution", "width", "height", "seed", "images_per_prompt")
                             if k in settings},
                   prompt_set=prompts or settings.get("prompts"), folder=str(folder), problems=problems,
                   skipped_images=bad, max_pixels=max_pixels, seconds=round(time.time() - t0, 2))
    official = [r for r in records if r["tag"] in geneval.TAGS]
    geneval.write_results(official, out / "results.jsonl")
    if custom:
        geneval.write_results([r for r in records if r["tag"] not in geneval.TAGS], out / "custom_results.jsonl")
    else:
        (out / "custom_results.jsonl").unlink(missing_ok=True)  # not a leftover of an earlier --custom-tags run
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", f"# GenEval: {folder}\n\ndetector {det.name}, colours "
                                   f"{summary['color_classifier']}\n\n{geneval.summary_table(summary)}\n")
    return summary


def _bad_message(folder: Path, bad: list[dict], total: int) -> str:
    lines = [f"{b['file']}: {b['reason']}" for b in bad]
    return (f"{len(bad)} of {total} images in {folder} cannot be scored:\n  " + "\n  ".join(lines)
            + "\n(re-sample them, or pass --allow-incomplete to skip them; they are counted in the summary)")
