"""Exposure-bias ("Slow Flow") report for one or several checkpoints (docs/design/flow.md §6).

    python -m pipelines.slowflow --ckpt base=runs/toy/pretrain --ckpt mixflow=runs/toy/mixflow-g0.8 \\
        --steps 4 8 16 32 --n 64 --out runs/toy/slowflow          # or: t2i slowflow ...

For each checkpoint, CFG scale (--guidance; default 1 and the checkpoint's sample.guidance, reported
separately) and step count it runs the Euler sampler on t2i's grid and, at every step, records

  σ̂ − σ        the raw chord statistic σ̂ = t2i.flow.slowed_sigma(x̂_σ, x̂, ε) against the step's σ;
  excess       σ̂_N − σ̂_ref, over a reference run of the same model, noise, prompts and CFG with
               --ref-steps steps (or finer) whose grid contains every step count's σ's (0: no reference);
  σ_est − σ    the noise level read off the background pixels of the shapes domain, model-free
               (--sigma-est: auto = on for pixel-space checkpoints, vae.kind identity).

Writes slowflow.json, slowflow.md (per step: σ, the mean and 10/50/90 % quantiles of each, and the
means over the inner steps per step count) and slowflow.png (σ̂ against the diagonal, then each gap
against σ), checkpoints and CFG scales overlaid.
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
    parser.add_argument("--guidance", nargs="+", default=["1", "config"], metavar="S",
                        help="CFG scales, each reported separately; 'config' = the checkpoint's sample.guidance "
                             "(default: 1 config)")
    parser.add_argument("--shift", type=float, help="sampling shift (default: the checkpoint's sample.shift)")
    parser.add_argument("--ref-steps", type=int,
                        help="reference run: at least this many Euler steps (default 256, "
                             "t2i.eval.slowflow.DEFAULT_REF_STEPS; 0 = no reference)")
    parser.add_argument("--sigma-est", choices=["auto", "on", "off"], default="auto",
                        help="background-pixel noise level (shapes domain, pixel space only); auto = on for "
                             "vae.kind identity")
    parser.add_argument("--bg-tol", type=float, default=0.5,
                        help="a pixel is background where the 3x3 mean of both final samples (N-step and "
                             "reference) is within this RGB distance of the background colour, and so are its "
                             "8 neighbours (pixel values in [-1, 1]; default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.prompts:
        read_prompt_file(args.prompts)  # before any checkpoint is loaded
    if args.n < 1 or any(n < 1 for n in args.steps):
        raise EvalError(f"--n and --steps must be >= 1, got --n {args.n} --steps {' '.join(map(str, args.steps))}")
    if args.ref_steps is not None and args.ref_steps < 0:
        raise EvalError(f"--ref-steps must be >= 0 (0: no reference run), got {args.ref_steps}")
    guidance_scales(args.guidance, None)  # the spelling, before any checkpoint is loaded

    import torch

    from t2i.checkpoint import loading
    from t2i.eval.slowflow import DEFAULT_REF_STEPS, measure_steps
    from t2i.eval.slowflow_report import auto_gamma_table, present, summary_table, write_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results, prompts = {}, None
    for spec in args.ckpt:
        label, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "=", spec)
        loaded = loading.load(path, ema=not args.raw, device=device)
        prompts = prompts or prompts_from(args, loaded.cfg)
        shift = args.shift if args.shift is not None else loaded.cfg.sample.shift
        background = background_for(args.sigma_est, loaded.cfg.vae.kind, label)
        results[label] = {n: {} for n in args.steps}
        for guidance in tqdm(guidance_scales(args.guidance, loaded.cfg.sample.guidance),
                             desc=f"slowflow {label}", unit="CFG scale"):
            by_steps = measure_steps(loaded.model, loaded.text, loaded.latent_shape, prompts, args.steps,
                                     guidance=guidance, shift=shift, seed=args.seed,
                                     ref_steps=DEFAULT_REF_STEPS if args.ref_steps is None else args.ref_steps,
                                     background=background, tol=args.bg_tol)
            for n, summary in by_steps.items():
                results[label][n][f"{guidance:g}"] = summary
    files = write_report(results, Path(args.out))
    for key, what, _ in present(results):
        print(f"mean {what}, over the inner steps:\n" + summary_table(results, key))
    gammas = auto_gamma_table(results)
    if gammas:
        print("MixFlow's gamma matched to the measured lag (auto-gamma):\n" + gammas)
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return results


def guidance_scales(values: list[str], config_guidance) -> list[float]:
    """--guidance values as floats, 'config' standing for the checkpoint's sample.guidance, duplicates
    dropped in order; EvalError naming a value that is neither."""
    out = []
    for v in values:
        if v == "config":
            g = config_guidance
        else:
            try:
                g = float(v)
            except ValueError:
                raise EvalError(f"--guidance {v}: expected a number or 'config'") from None
            if not g >= 0:
                raise EvalError(f"--guidance {v}: a CFG scale must be >= 0")
        if g is not None and float(g) not in out:
            out.append(float(g))
    return out


def background_for(mode: str, vae_kind: str, label: str):
    """The shapes background colour in pixel space when σ_est is on, else None. σ_est needs the flow to
    run in pixel space: a latent VAE's latents of a flat colour are no known constant."""
    if mode == "off" or (mode == "auto" and vae_kind != "identity"):
        return None
    if vae_kind != "identity":
        raise EvalError(f"--sigma-est on: checkpoint {label} has vae.kind={vae_kind}, so its states are latents, "
                        f"not pixels; the background-pixel noise level needs vae.kind identity (use --sigma-est off)")
    from t2i.eval.background_sigma import shapes_background
    return shapes_background()


if __name__ == "__main__":
    main()
