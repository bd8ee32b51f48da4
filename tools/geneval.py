"""GenEval: score a folder of samples with the official rules, or write a shapes-domain prompt set.

    t2i geneval samples/x                                   # shapes domain: exact detector + palette colours
    t2i geneval samples/x --prompts geneval/evaluation_metadata.jsonl --images-per-prompt 4 \\
        --detector mask2former:/weights/mask2former-swin-small-coco-instance \\
        --object-names geneval/object_names.txt --color clip:/weights/ViT-L-14-openai.pt
    t2i geneval-prompts --out prompts/shapes --per-tag 16

Writes <folder>/geneval/results.jsonl (one record per image, the official fields), summary.json and
summary.md (per-tag scores, the overall mean of the six tags, and the settings behind them). The
folder is validated first against the prompt set (from --prompts, else the folder's manifest): every
missing prompt folder and short prompt is listed, and scoring stops unless --allow-incomplete.
Under torchrun the images are split over ranks and the records gathered on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

from t2i import geneval


def _options(pairs: list[str]) -> geneval.Options:
    names = {f.name: f.type for f in fields(geneval.Options)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names:
            raise ValueError(f"--options {key}: unknown; valid keys: {', '.join(names)}")
        values[key] = int(value) if key == "max_objects" else float(value)
    return geneval.Options(**values)


def expected_prompts(folder: Path, prompts: str | None) -> tuple[list[dict] | None, int | None, dict]:
    """(prompt set, images per prompt, sampling settings) from --prompts or the folder's manifest."""
    manifest = folder / "manifest.json"
    settings = json.loads(manifest.read_text()) if manifest.exists() else {}
    source = prompts or settings.get("prompts")
    if not source:
        return None, settings.get("images_per_prompt"), settings
    from t2i.prompts import load_prompts
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
        raise geneval.GenEvalInputError(f"{folder} is incomplete:\n  " + "\n  ".join(problems)
                                        + "\n(finish sampling, or pass --allow-incomplete to score what is there)")
    metas = [m for m, _ in found.values()]
    classes = {c["class"] for m in metas for c in m.get("include", []) + m.get("exclude", [])}
    if detector is None:
        from t2i.data.shapes import SHAPES
        if not classes <= set(SHAPES):
            raise ValueError("these prompts name classes outside the shapes domain; pass "
                             "--detector mask2former:<local folder> (and --color clip:<file>)")
        detector = "shapes"
    names = Path(object_names).read_text().split("\n") if object_names else None
    det = geneval.build_detector(detector, device=device, class_names=[n for n in names if n] if names else None)
    unknown = classes - set(det.class_names)
    if unknown:
        raise ValueError(f"prompts name classes the detector {det.name} does not know: {sorted(unknown)}"
                         + ("" if object_names else "; pass --object-names (GenEval's object_names.txt)"))
    color = color or ("shapes" if detector == "shapes" else None)
    clf = geneval.build_color_classifier(color, device=device)
    if clf is None and any("color" in c for m in metas for c in m.get("include", [])):
        raise ValueError("these prompts ask for colours; pass --color clip:<local ViT-L-14 file> (or shapes)")

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
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"# GenEval: {folder}\n\ndetector {det.name}, colours "
                                    f"{summary['color_classifier']}\n\n{geneval.summary_table(summary)}\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i geneval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="samples in GenEval's layout (t2i sample writes it)")
    p.add_argument("--prompts", default=None, help="the prompt set the folder must cover (default: its manifest's)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: the manifest's (official: 4)")
    p.add_argument("--detector", default=None, help="shapes | mask2former:<local folder> (default: shapes when "
                                                    "every class is a shape)")
    p.add_argument("--object-names", default=None, help="class names in detector index order (object_names.txt)")
    p.add_argument("--color", default=None, help="shapes | clip:<local open_clip ViT-L-14 file>")
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="threshold, counting_threshold, max_objects, max_overlap, position_threshold")
    p.add_argument("--allow-incomplete", action="store_true", help="score what is there (the gaps are reported)")
    p.add_argument("--out", default=None, help="default: <folder>/geneval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    summary = score(a.folder, prompts=a.prompts, images_per_prompt=a.images_per_prompt, detector=a.detector,
                    color=a.color, object_names=a.object_names, options=_options(a.options),
                    allow_incomplete=a.allow_incomplete, device=a.device, batch_size=a.batch_size, out=a.out)
    if summary:
        print(geneval.summary_table(summary))
        print(f"\nresults: {Path(a.out or Path(a.folder) / 'geneval') / 'results.jsonl'}")
    return 0


def prompts_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i geneval-prompts",
                                description="Write GenEval's prompt files for the synthetic shapes domain.")
    p.add_argument("--out", required=True, help="folder for evaluation_metadata.jsonl, object_names.txt, ...")
    p.add_argument("--per-tag", type=int, default=16, help="at most this many distinct prompts per tag")
    p.add_argument("--seed", type=int, default=2, help="t2i.data.shapes seed (the demo trains on 0, validates on 1)")
    a = p.parse_args(argv)
    from t2i.prompts import write_shapes_geneval
    path = write_shapes_geneval(a.out, a.per_tag, a.seed)
    n = sum(1 for _ in open(path))
    print(f"{n} prompts -> {path}")
    return 0
