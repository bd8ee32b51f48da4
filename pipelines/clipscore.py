"""CLIPScore of a GenEval-layout image folder, from a local open_clip checkpoint.

    t2i clipscore --images runs/geneval/images --model ViT-L-14-quickgelu \\
        --pretrained /models/clip-vit-l-14-openai/open_clip_pytorch_model.bin --device cuda --out clipscore.json

Reads every `<images>/<digits>/metadata.jsonl` (one JSON object with a "prompt") and every
`samples/<digits>*.png` next to it (GenEval's acceptance rules, docs/design/evaluation.md §1.3), scores each image
against its prompt with t2i.eval.clipscore.ClipScorer (max(100·cos, 0)), prints mean / std (population,
over images) / n and writes {"mean", "std", "n", "model", "pretrained", "per_prompt"} where
per_prompt maps the folder name to {"prompt", "scores": {file: score}, "mean"}.
"""

from __future__ import annotations


from t2i.cmdline import parser as make_parser
from t2i.eval.clipscore import score_folder
from t2i.io import write_json


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("clipscore", __doc__)
    parser.add_argument("--images", required=True, help="GenEval-layout folder: <images>/00000/samples/0000.png")
    parser.add_argument("--model", default="ViT-L-14-quickgelu", help="open_clip model name")
    parser.add_argument("--pretrained", required=True, help="local checkpoint file (never downloaded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)

    report = score_folder(args.images, args.model, args.pretrained, args.device, args.batch_size)
    print(f"{report['model']}: mean {report['mean']:.4f}  std {report['std']:.4f}  n {report['n']}")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
