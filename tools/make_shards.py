"""Make WebDataset shards from a folder of captioned images or from the synthetic shapes domain.

    t2i make-shards folder --src my_images/ --out data/mine --per-shard 1000
    t2i make-shards shapes --out data/shapes --n 4000 --per-shard 500 --size 64 --seed 0

Shards are named after the --out folder unless --prefix says otherwise (`--out data/mine` writes
data/mine/mine-000000.tar, ...), and the last line printed is the `data.shards=...` setting to train on
them. `folder` reads images (jpg/jpeg/png/webp, recursively) with same-name `.txt` captions; images
without a caption are skipped and counted. Both write `<out>/manifest.json` (with per-shard sample
counts, which the loader checks shards against). Each shard is written under a temporary name and
renamed when complete. An --out that already holds shards is refused unless --overwrite, which replaces
them. Input problems raise t2i.errors.DataError (one line from `t2i make-shards`). See t2i/data/writers.py.
"""

from __future__ import annotations

import argparse

from t2i.cmdline import parser as make_parser
from t2i.data.writers import default_prefix, shard_pattern, write_folder_shards, write_shapes_shards

PREFIX_HELP = ("shard file-name prefix (default: the --out folder's name, so --out data/mine writes "
               "data/mine/mine-000000.tar, ...)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser("make-shards", __doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True, metavar="{folder,shapes}")

    folder = sub.add_parser("folder", help="a folder of images with same-name .txt captions",
                            description="Shards from a folder of images with same-name .txt captions.",
                            formatter_class=parser.formatter_class)
    folder.add_argument("--src", required=True, help="source folder (searched recursively)")
    folder.add_argument("--out", required=True, help="output folder (created if missing)")
    folder.add_argument("--per-shard", type=int, default=1000, help="samples per shard")

    shapes = sub.add_parser("shapes", help="synthetic captioned shapes (t2i.data.shapes)",
                            description="Shards of the synthetic captioned-shapes domain.",
                            formatter_class=parser.formatter_class)
    shapes.add_argument("--out", required=True, help="output folder (created if missing)")
    shapes.add_argument("--n", type=int, required=True, help="number of samples")
    shapes.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0, help="sample i is drawn from (seed, i)")

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
        paths = write_shapes_shards(args.out, args.n, seed=args.seed, size=args.size, **common)
        print(f"shapes -> shards: {args.n} samples in {len(paths)} shards under {args.out}")
    else:
        paths = write_folder_shards(args.src, args.out, **common)
    if paths:
        print(f"train on them with: data.shards='{shard_pattern(args.out, prefix, len(paths))}'")
    return paths


if __name__ == "__main__":
    main()
