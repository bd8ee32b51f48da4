"""GenEval on a folder of samples: validate it against the prompt set, pick the backends, score the
images (split over torchrun ranks, gathered on rank 0), write results.jsonl, summary.json and
summary.md. The rules themselves are t2i.eval.geneval's; docs/design/evaluation.md §1 has the protocol.
"""

from __future__ import annotations

import json
import os
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
        values[key] = int(value) if key == "max_objects" else float(value)
    return geneval.Options(**values)


def expected_prompts(folder: Path, prompts: str | None) -> tuple[list[dict] | None, int | None, dict]:
    """(prompt set, images per prompt, sampling settings) from --prompts or the folder's manifest."""
    manifest = folder / "manifest.json"
    settings = json.loads(manifest.read_text()) if manifest.exists() else {}
    source = prompts or settings.get("prompts")
    if not source:
        return None, settings.get("images_per_prompt"), settings
    limit = None if prompts else settings.get("num_prompts")  # t2i sample --limit N took the first N
    return load_prompts(source, limit=limit), settings.get("images_per_prompt"), settings


def score(folder: str | Path, *, prompts: str | None = None, images_per_prompt: int | None = None,
          detector: str | None = None, color: str | None = None, object_names: str | None = None,
          options: geneval.Options = geneval.DEFAULTS, allow_incomplete: bool = False, device: str = "cpu",
          batch_size: int = 8, out: str | Path | None = None, progress: bool = True) -> dict:
    """Validate, score and summarise a GenEval-layout folder; returns the summary (rank 0)."""
    folder = Path(folder)
    out = Path(out) if out else folder / "geneval"
    expected, n_images, settings = expected_prompts(folder, prompts)
    found = geneval.list_images(folder)
    problems = geneval.validate(found, expected, images_per_prompt or n_images)
    if problems and not allow_incomplete:
        raise EvalError(f"{folder} is incomplete:\n  " + "\n  ".join(problems)
                                        + "\n(finish sampling, or pass --allow-incomplete to score what is there)")
    metas = [m for m, _ in found.values()]
    classes = {c["class"] for m in metas for c in m.get("include", []) + m.get("exclude", [])}
    if detector is None:
        if not classes <= set(SHAPES):
            raise EvalError("these prompts name classes outside the shapes domain; pass "
                             "--detector mask2former:<local folder> (and --color clip:<file>)")
        detector = "shapes"
    names = Path(object_names).read_text().split("\n") if object_names else None
    det = build_detector(detector, device=device, class_names=[n for n in names if n] if names else None)
    unknown = classes - set(det.class_names)
    if unknown:
        raise EvalError(f"prompts name classes the detector {det.name} does not know: {sorted(unknown)}"
                         + ("" if object_names else "; pass --object-names (GenEval's object_names.txt)"))
    color = color or ("shapes" if detector == "shapes" else None)
    clf = build_color_classifier(color, device=device)
    if clf is None and any("color" in c for m in metas for c in m.get("include", [])):
        raise EvalError("these prompts ask for colours; pass --color clip:<local ViT-L-14 file> (or shapes)")

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    t0 = time.time()
    records = geneval.score_folder(folder, det, clf, options, batch_size=batch_size, rank=rank, world=world,
                                   progress=progress)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
        if rank != 0:
            return {}
    summary = geneval.summarize(records)
    summary.update(detector=det.name, color_classifier=clf.name if clf else None, options=asdict(options),
                   sampling={k: settings[k] for k in ("checkpoint", "weights", "steps", "guidance", "shift",
                                                     "resolution", "seed", "images_per_prompt") if k in settings},
                   prompt_set=prompts or settings.get("prompts"), folder=str(folder), problems=problems,
                   seconds=round(time.time() - t0, 2))
    geneval.write_results(records, out / "results.jsonl")
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", f"# GenEval: {folder}\n\ndetector {det.name}, colours "
                                   f"{summary['color_classifier']}\n\n{geneval.summary_table(summary)}\n")
    return summary
