"""Make WebDataset shards from a folder of captioned images or from the synthetic shapes domain.

    t2i make-shards folder --src my_images/ --out data/mine --per-shard 1000
    t2i make-shards folder --src my_images/ --out data/mine512 --square 512
    t2i make-shards shapes --out data/shapes --n 4000 --per-shard 500 --size 64 --seed 0
    t2i make-shards shapes --out data/shapes-ar --n 4000 --aspects 64x64,96x64,64x96

Shards are named after the --out folder unless --prefix says otherwise (`--out data/mine` writes
data/mine/mine-000000.tar, ...), and the last line printed is the `data.shards=...` setting to train on
them. `folder` reads images (jpg/jpeg/png/webp, recursively) with same-name `.txt` captions; images
without a caption are skipped and counted. `folder` keeps each image's aspect ratio: the image bytes are
copied as they are and the json records its width and height, for bucketed (multi-aspect) training
(data.buckets); --square SIZE instead writes every image resized and centre-cropped to SIZE x SIZE.
`shapes` writes square images unless --aspects gives sizes (WIDTHxHEIGHT, taken in turn), on which the
square rendering is centred on background padding. Both write `<out>/manifest.json` (with per-shard sample
counts, which the loader checks shards against). Each shard is written under a temporary name and
renamed when complete. An --out that already holds shards is refused unless --overwrite, which replaces
them. Input problems raise t2i.errors.DataError (one line from `t2i make-shards`). See t2i/data/writers.py.
"""

from __future__ import annotations

import argparse

from t2i.cmdline import parser as make_parser
from t2i.data.writers import default_prefix, parse_aspects, shard_pattern, write_folder_shards, write_shapes_shards

PREFIX_HELP = ("shard file-name prefix (default: the --out folder's name, so --out data/mine writes "
               "data/mine/mine-000000.tar, ...)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser("make-shards", __doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True, metavar="{folder,shapes}")

    folder = sub.add_parser("folder", help="a folder of images with same-name .txt captions",
                            description="Shards from a folder of images with same-name .txt captions. Each "
                                        "image keeps its aspect ratio (its bytes are copied as they are) and "
                                        "the json records its width and height, for bucketed (multi-aspect) "
                                        "training; --square SIZE makes square images instead.",
                            formatter_class=parser.formatter_class)
    folder.add_argument("--src", required=True, help="source folder (searched recursively)")
    folder.add_argument("--out", required=True, help="output folder (created if missing)")
    folder.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    folder.add_argument("--square", type=int, default=None, metavar="SIZE",
                        help="instead of keeping the aspect ratio, write each image short-side resized "
                             "(bicubic) and centre-cropped to SIZE x SIZE, re-encoded in its own format (PNG; "
                             "JPEG or WebP at quality 95, WebP lossless if the source is); json width/height = "
                             "SIZE (default: keep each image as it is)")

    shapes = sub.add_parser("shapes", help="synthetic captioned shapes (t2i.data.shapes)",
                            description="Shards of the synthetic captioned-shapes domain: square images, "
                                        "or with --aspects other sizes in turn (the square rendering centred "
                                        "on background padding, json width/height and boxes to match).",
                            formatter_class=parser.formatter_class)
    shapes.add_argument("--out", required=True, help="output folder (created if missing)")
    shapes.add_argument("--n", type=int, required=True, help="number of samples")
    shapes.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0, help="sample i is drawn from (seed, i)")
    shapes.add_argument("--aspects", default=None, metavar="WxH,...",
                        help="sizes (width x height, e.g. 64x64,96x64,64x96; each side >= 32) taken in turn: "
                             "sample i is rendered on a square of side min(W, H) and centred on a W x H "
                             "background canvas (boxes shifted, json width/height = W, H); replaces --size "
                             "(default: square --size images)")

    for p in (folder, shapes):
        p.add_argument("--prefix", default=None, help=PREFIX_HELP)
        p.add_argument("--overwrite", action="store_true",
                       help="replace the shards and manifest.json already in --out (without it, an --out "
                            "holding shards is refused)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    prefix = args.prefix or default_prefix(args.out)
    common = dict(samples_per_shard=args.per_shard, prefix=prefix, overwrite=args.overwrite,
                  progress=not args.no_progress)
    if args.source == "shapes":
        aspects = None if args.aspects is None else parse_aspects(args.aspects)
        paths = write_shapes_shards(args.out, args.n, seed=args.seed, size=args.size, aspects=aspects, **common)
        print(f"shapes -> shards: {args.n} samples in {len(paths)} shards under {args.out}")
    else:
        paths = write_folder_shards(args.src, args.out, square=args.square, **common)
    if paths:
        print(f"train on them with: data.shards='{shard_pattern(args.out, prefix, len(paths))}'")
    return paths


if __name__ == "__main__":
    main()
