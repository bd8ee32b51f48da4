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
Unreadable (truncated, not an image) and oversized (> --max-pixels, read from the header before
decoding) images are named one per line; scoring stops unless --allow-incomplete, which skips them
and lists them in the summary. Tags outside GenEval's six (e.g. a misspelled "couting") are refused
unless --custom-tags: then they are scored into custom_results.jsonl and a separate "custom_tags"
section of the summary, never into results.jsonl or the overall score.
Under torchrun the images are split over ranks and the records gathered on rank 0.
"""

from __future__ import annotations

from pathlib import Path

from t2i.cmdline import parser as make_parser
from t2i.eval import geneval
from t2i.eval.geneval_folder import parse_options, score


def main(argv: list[str] | None = None) -> int:
    p = make_parser("geneval", __doc__)
    p.add_argument("folder", help="samples in GenEval's layout (t2i sample writes it)")
    p.add_argument("--prompts", default=None, help="the prompt set the folder must cover (default: its manifest's)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: the manifest's (official: 4)")
    p.add_argument("--detector", default=None, help="shapes | mask2former:<local folder> (default: shapes when "
                                                    "every class is a shape)")
    p.add_argument("--object-names", default=None, help="class names in detector index order (object_names.txt)")
    p.add_argument("--color", default=None, help="shapes | clip:<local open_clip ViT-L-14 file>")
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="threshold, counting_threshold, max_objects, max_overlap, position_threshold")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="score what is there: missing prompts/images and unreadable or oversized images are "
                        "skipped and reported")
    p.add_argument("--custom-tags", action="store_true",
                   help="accept tags outside GenEval's six; they are scored and reported separately (summary "
                        "'custom_tags', custom_results.jsonl), never in the overall score")
    p.add_argument("--max-pixels", type=int, default=geneval.MAX_PIXELS,
                   help=f"refuse images over this many pixels, from the header (default {geneval.MAX_PIXELS})")
    p.add_argument("--out", default=None, help="default: <folder>/geneval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    summary = score(a.folder, prompts=a.prompts, images_per_prompt=a.images_per_prompt, detector=a.detector,
                    color=a.color, object_names=a.object_names, options=parse_options(a.options),
                    allow_incomplete=a.allow_incomplete, device=a.device, batch_size=a.batch_size, out=a.out,
                    custom_tags=a.custom_tags, max_pixels=a.max_pixels)
    if summary:
        print(geneval.summary_table(summary))
        print(f"\nresults: {Path(a.out or Path(a.folder) / 'geneval') / 'results.jsonl'}")
    return 0


def prompts_main(argv: list[str] | None = None) -> int:
    p = make_parser("geneval-prompts", "Write GenEval's prompt files for the synthetic shapes domain.")
    p.add_argument("--out", required=True, help="folder for evaluation_metadata.jsonl, object_names.txt, ...")
    p.add_argument("--per-tag", type=int, default=16, help="at most this many distinct prompts per tag")
    p.add_argument("--seed", type=int, default=2, help="t2i.data.shapes seed (the demo trains on 0, validates on 1)")
    p.add_argument("--tags", nargs="+", default=None, metavar="TAG",
                   help="only these tags, e.g. single_object (default: all six)")
    a = p.parse_args(argv)
    from t2i.eval.prompts import write_shapes_geneval
    try:
        path = write_shapes_geneval(a.out, a.per_tag, a.seed, a.tags)
    except ValueError as e:
        p.error(str(e))
    n = sum(1 for _ in open(path))
    print(f"{n} prompts -> {path}")
    return 0
