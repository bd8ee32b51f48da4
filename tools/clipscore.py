"""CLIPScore of a GenEval-layout image folder, from a local open_clip checkpoint.

    python -m tools.clipscore --images runs/geneval/images --model ViT-L-14-quickgelu \\
        --pretrained /models/clip-vit-l-14-openai/open_clip_pytorch_model.bin --device cuda --out clipscore.json

Reads every `<images>/<digits>/metadata.jsonl` (one JSON object with a "prompt") and every
`samples/<digits>*.png` next to it (GenEval's acceptance rules, EVALUATORS.md §1.3), scores each image
against its prompt with t2i.clipscore.ClipScorer (max(100·cos, 0)), prints mean / std (population,
over images) / n and writes {"mean", "std", "n", "model", "pretrained", "per_prompt"} where
per_prompt maps the folder name to {"prompt", "scores": {file: score}, "mean"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm


def geneval_samples(root: str | Path) -> list[tuple[str, str, Path]]:
    """(folder name, prompt, image path) for every sample GenEval's evaluator would read, sorted."""
    from t2i.geneval import list_images

    return [(path.parent.parent.name, meta["prompt"], path)
            for _, (meta, paths) in sorted(list_images(root).items()) for path in paths]


def score_folder(images: str | Path, model: str, pretrained: str | Path, device: str = "cpu",
                 batch_size: int = 32, progress: bool = True) -> dict:
    """{"mean", "std", "n", "model", "pretrained", "per_prompt"} for a GenEval-layout folder."""
    from t2i.clipscore import ClipScorer

    items = geneval_samples(images)
    if not items:
        raise FileNotFoundError(f"no <digits>/samples/<digits>.png images under {images}")
    scorer = ClipScorer(model, pretrained, device, batch_size)
    scores = []
    with tqdm(total=len(items), desc=scorer.name, unit="img", disable=not progress) as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            pics = [ImageOps.exif_transpose(Image.open(path)).convert("RGB") for _, _, path in chunk]
            scores.extend(scorer.score(pics, [prompt for _, prompt, _ in chunk]).tolist())
            bar.update(len(chunk))

    per_prompt: dict[str, dict] = {}
    for (folder, prompt, path), score in zip(items, scores, strict=True):
        per_prompt.setdefault(folder, {"prompt": prompt, "scores": {}})["scores"][path.name] = score
    for entry in per_prompt.values():
        entry["mean"] = float(np.mean(list(entry["scores"].values())))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "n": len(scores),
            "model": scorer.name, "pretrained": str(pretrained), "per_prompt": per_prompt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipscore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="GenEval-layout folder: <images>/00000/samples/0000.png")
    parser.add_argument("--model", default="ViT-L-14-quickgelu", help="open_clip model name")
    parser.add_argument("--pretrained", required=True, help="local checkpoint file (never downloaded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)

    try:
        report = score_folder(args.images, args.model, args.pretrained, args.device, args.batch_size)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(f"{report['model']}: mean {report['mean']:.4f}  std {report['std']:.4f}  n {report['n']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
