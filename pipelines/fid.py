"""FID/KID of generated images against reference statistics, offline (see t2i/eval/fid.py and t2i/eval/features.py).

    # reference statistics from held-out shards (centre-cropped to 64 as training sees them) or a folder
    t2i fid ref --shards data/shapes-val --resolution 64 --out runs/ref/shapes-val.npz
    t2i fid ref --shards 'data/digits/*.tar' --resolution 32 --out runs/ref/digits.npz     # a glob, or a list file
    t2i fid ref --folder coco/val2014 --resolution 256 --max 30000 \\
        --extractor inception:/models/inception-2015-12-05.pt --out runs/ref/coco256.npz
    # score a folder of images (GenEval layout <dir>/<00000>/samples/<0000>.png, or any PNG tree)
    t2i fid score --images runs/toy/geneval --ref runs/ref/shapes-val.npz --out fid.json

`score` uses the reference's extractor unless --extractor is given (a different one is refused) and
brings images to the reference's resolution unless --resolution is given; a --resolution other than
the reference's is refused, naming both, unless --allow-resolution-mismatch. --resolution is a square's
side (short side resize + centre crop) or WIDTHxHEIGHT (e.g. 1216x832: cover resize + centre crop), for
samples made at a non-square size; sizes compare as (width, height) (docs/design/evaluation.md §5.7). Exit status 2 on a
missing file, an extractor or resolution mismatch, a missing Inception file or too few images.
"""

from __future__ import annotations

import argparse
import sys

from t2i.cliargs import resolution_arg
from t2i.cmdline import HelpFormatter, parser as make_parser
from t2i.errors import EvalError
from t2i.io import write_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser("fid", __doc__.split("\n")[0], epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref", help="reference statistics (mu, sigma, features) -> .npz",
                         formatter_class=HelpFormatter)
    src = ref.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="WebDataset shards: a brace pattern, a glob (*, ?, [..]), a folder of .tar, a "
                                      "list file (one path or pattern per line) or '::'-joined specs")
    src.add_argument("--folder", help="folder of images (png/jpg/jpeg/webp, recursive)")
    ref.add_argument("--resolution", type=resolution_arg, metavar="N|WxH",
                     help="N: short side resize + centre crop to N x N; WxH: cover resize + centre crop to W x H "
                          "(required with --shards)")
    ref.add_argument("--out", required=True, help="output .npz")
    ref.add_argument("--max", type=int, help="use only the first N images (files / tar samples)")
    ref.add_argument("--extractor", default="random-conv", help="random-conv | inception:PATH (default: random-conv)")

    score = sub.add_parser("score", help="FID/KID of a folder of images against a reference .npz",
                           formatter_class=HelpFormatter)
    score.add_argument("--images", required=True, help="folder of generated images (recursive)")
    score.add_argument("--ref", required=True, help="reference .npz from `ref`")
    score.add_argument("--extractor", help="default: the one recorded in the reference")
    score.add_argument("--resolution", type=resolution_arg, metavar="N|WxH",
                       help="N or WIDTHxHEIGHT; default: the reference's resolution")
    score.add_argument("--max", type=int, help="use only the first N images")
    score.add_argument("--kid-subsets", type=int, default=100)
    score.add_argument("--kid-subset-size", type=int, default=1000)
    score.add_argument("--seed", type=int, default=0, help="KID subset sampling seed")
    score.add_argument("--out", help="write the result as JSON here")
    score.add_argument("--allow-resolution-mismatch", action="store_true",
                       help="score at a --resolution other than the reference's (noted in the result's warnings)")

    for p in (ref, score):
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
        p.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from t2i.eval import fid as F
    from t2i.eval.features import build_extractor
    from t2i.eval.image_source import ImageSource

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    for flag, value in (("--max", args.max), ("--resolution", args.resolution if isinstance(args.resolution, int)
                                                               else None), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1, got {value}")
    if args.command == "ref":
        if args.shards and not args.resolution:
            raise EvalError("--shards needs --resolution (images are centre-cropped to it as in training)")
        source = ImageSource(folder=args.folder, shards=args.shards, resolution=args.resolution,
                             max_images=args.max)
        extractor = build_extractor(args.extractor, device)
        stats = F.make_reference(source, extractor, args.out, args.batch_size, device, not args.no_progress)
        print(table([("reference", args.out), ("source", stats.meta["source"]), ("images", stats.n),
                     ("bad", {k: v for k, v in stats.meta["counts"].items() if k != "good"}),
                     ("resolution", stats.meta["resolution"] or "native"), ("extractor", extractor.name)]))
        for note in F.sample_notes(stats.n, stats.n, extractor.dim):
            print(f"note: {note}")
        return 0

    result = F.score_folder(args.images, args.ref, args.extractor, batch_size=args.batch_size, device=device,
                            resolution=args.resolution, max_images=args.max, kid_subsets=args.kid_subsets,
                            kid_subset_size=args.kid_subset_size, seed=args.seed,
                            progress=not args.no_progress,
                            allow_resolution_mismatch=args.allow_resolution_mismatch)
    print(table([("FID", _fmt(result["fid"])), ("KID", _fmt(result["kid"])),
                 ("images", f"{result['n_images']} (bad {result['bad_images']})"),
                 ("reference", f"{result['n_reference']} ({result['reference'].get('source')})"),
                 ("resolution", result["resolution"] or "native"), ("extractor", result["extractor"])]))
    for note in result["warnings"]:
        print(f"note: {note}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
