"""Make WebDataset shards from the synthetic shapes domain or from a folder of captioned images.

    python -m tools.make_shards shapes --out data/shapes --n 4000 --per-shard 500 --size 64 --seed 0
    python -m tools.make_shards folder --src path/to/images --out data/mine --per-shard 1000

`folder` reads images (jpg/jpeg/png/webp, recursively) with same-name `.txt` captions; images
without a caption are skipped and counted. Both write `<out>/manifest.json` (with per-shard sample
counts, which the loader checks shards against). Each shard is written under a temporary name and
renamed when complete. An --out that already holds shards is refused unless --overwrite. Input
problems raise t2i.errors.DataError (one line from `t2i make-shards`). See t2i/data/writers.py.
"""

from __future__ import annotations

import argparse

from t2i.data.writers import write_folder_shards, write_shapes_shards


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.make_shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)

    shapes = sub.add_parser("shapes", help="synthetic captioned shapes (t2i.data.shapes)")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--n", type=int, required=True, help="number of samples")
    shapes.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--prefix", default="shapes", help="shard file-name prefix")

    folder = sub.add_parser("folder", help="a folder of images with same-name .txt captions")
    folder.add_argument("--src", required=True, help="source folder (searched recursively)")
    folder.add_argument("--out", required=True, help="output directory")
    folder.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    folder.add_argument("--prefix", default="images", help="shard file-name prefix")

    for p in (shapes, folder):
        p.add_argument("--overwrite", action="store_true",
                       help="replace the <prefix>-*.tar shards and manifest.json already in --out "
                            "(without it, an --out holding shards is refused)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    common = dict(samples_per_shard=args.per_shard, prefix=args.prefix, overwrite=args.overwrite,
                  progress=not args.no_progress)
    if args.source == "shapes":
        paths = write_shapes_shards(args.out, args.n, seed=args.seed, size=args.size, **common)
        print(f"shapes -> shards: {args.n} samples in {len(paths)} shards under {args.out}")
    else:
        paths = write_folder_shards(args.src, args.out, **common)
    return paths


if __name__ == "__main__":
    main()
