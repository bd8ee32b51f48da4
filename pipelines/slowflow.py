"""Exposure-bias ("Slow Flow") report for one or several checkpoints.

    python -m pipelines.slowflow --ckpt base=runs/toy/pretrain --ckpt mixflow=runs/toy/mixflow-g0.8 \\
        --steps 4 8 16 32 --n 64 --out runs/toy/slowflow          # or: t2i slowflow ...

For each checkpoint and step count it runs the Euler sampler (with the checkpoint's CFG scale
unless --guidance is given) and, at every step, σ̂ = t2i.flow.slowed_sigma(x̂_σ, x̂, ε). Writes
slowflow.json, slowflow.md (σ, mean σ̂ − σ and its 10/50/90% quantiles per step) and slowflow.png
(σ on x, the σ̂ band on y, the diagonal), checkpoints overlaid.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tqdm import tqdm

from t2i.cmdline import parser as make_parser
from t2i.errors import EvalError


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of a --prompts text file; EvalError naming the file when it is missing,
    unreadable or has no prompt."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise EvalError(f"--prompts {path}: {what} (expected a text file, one prompt per line)")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--prompts {path}: cannot be read as text ({e})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise EvalError(f"--prompts {path}: holds no prompt (expected one prompt per line)")
    return lines


def prompts_from(args, cfg) -> list[str]:
    if args.prompts:
        lines = read_prompt_file(args.prompts)
    else:  # captions of the held-out shards (or the training shards) of the first checkpoint
        from t2i.config import DataConfig
        from t2i.data.shards import expand_shards
        from t2i.data.loader import slot_stream
        spec = args.shards or cfg.validation.shards or cfg.data.shards
        urls = expand_shards(spec, allow_pipe_in_lists=cfg.data.allow_pipe_in_lists,
                             key="--shards" if args.shards else
                             "validation.shards" if cfg.validation.shards else "data.shards")
        stream = slot_stream(urls, DataConfig(shards=urls, resolution=8, shuffle_buffer=1), 0, 0, 1)
        lines = [s["caption"] for s in itertools.islice(stream, args.n)]
    return (lines * (args.n // max(1, len(lines)) + 1))[: args.n]


def main(argv=None) -> dict:
    parser = make_parser("slowflow", __doc__)
    parser.add_argument("--ckpt", action="append", required=True, metavar="LABEL=PATH",
                        help="a run folder, checkpoints/ folder or tag folder; repeat to overlay")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--n", type=int, default=64, help="images per step count")
    parser.add_argument("--prompts", help="a text file, one prompt per line (default: held-out captions)")
    parser.add_argument("--shards", help="take the prompts from these shards' captions")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint's sample.guidance)")
    parser.add_argument("--shift", type=float, help="sampling shift (default: the checkpoint's sample.shift)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.prompts:
        read_prompt_file(args.prompts)  # before any checkpoint is loaded
    if args.n < 1 or any(n < 1 for n in args.steps):
        raise EvalError(f"--n and --steps must be >= 1, got --n {args.n} --steps {' '.join(map(str, args.steps))}")

    from t2i.checkpoint import loading
    from t2i.eval.slowflow import measure, summary_table, write_report

    results, prompts = {}, None
    for spec in args.ckpt:
        label, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "=", spec)
        loaded = loading.load(path, ema=not args.raw)
        prompts = prompts or prompts_from(args, loaded.cfg)
        guidance = args.guidance if args.guidance is not None else loaded.cfg.sample.guidance
        shift = args.shift if args.shift is not None else loaded.cfg.sample.shift
        results[label] = {}
        for steps in tqdm(args.steps, desc=f"slowflow {label}", unit="step count"):
            results[label][steps] = measure(loaded.model, loaded.text, loaded.latent_shape, prompts, steps,
                                            guidance=guidance, shift=shift, seed=args.seed)
    files = write_report(results, Path(args.out))
    print(summary_table(results))
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return results


if __name__ == "__main__":
    main()
