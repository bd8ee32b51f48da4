"""The fair MixFlow experiment (docs/experiments/mixflow-fair.md), one command, every stage resumable:

    python -m tools.mixflow_fair --out runs/fair                    # CPU, 2 cores, 2-hour budget
    python -m tools.mixflow_fair --out runs/fair --plan             # the stages, cells and time estimate only
    bash tools/mixflow_fair_gpu.sh runs/fair-gpu                    # the larger version on one GPU

1. data: captioned-shapes training shards, a fixed-σ validation set, the evaluation prompts (held-out
   captions with their GenEval clauses) and a held-out FID reference set, each from its own seed;
2. base: flow matching with logit-normal σ, `--base-steps` with the learning rate decayed (cosine, to 0.1 × the
   peak); converged if the EMA's fixed-σ validation loss changes by less than `--converged` (1 %) over the last
   20 % of its steps (`--base-schedule constant`: a constant rate, extended in 25 % steps up to
   `--max-base-steps` until converged, as in the first CPU run);
3. arms, each `--arm-fraction` of the base's steps from the base EMA, `--seeds` seeds each:
   control (flow matching, logit-normal σ) · gamma0 (MixFlow's Beta(2,1) timesteps, standard input) ·
   mixflow-g0.8 · mixflow-g0.4;
4. paired evaluation: every model samples the same prompts from the same initial noises at every cell
   (Euler steps N × CFG scale); per image: GenEval correctness (exact shapes detector), off-palette
   pixel fraction and random-conv features (FID / KID against the held-out set); Slow Flow v2 on a subset;
   With `--auto-gamma` (amendment 4), a fifth arm mixflow-auto, trained only when the base's Slow Flow v2
   at the trained CFG and N ∈ {2, 4, 8} shows a stable lag band, with γ derived from it
   (t2i.eval.auto_gamma, docs/design/flow.md §6.6); added to a finished run, it is trained and evaluated
   in the cells already planned;
5. analysis: accuracy per arm with McNemar's exact test against control and against gamma0 (pooled over
   seeds), FID / KID, off-palette fraction, Slow Flow excess, and the pre-registered verdicts.

Cells that do not fit `--budget-min` are cut in the pre-registered order (CFG 1 first, then the trained-CFG
cells from the most expensive down: N = 32, 16, 8, 4), never seeds or images; N = 2 at the trained CFG is
always evaluated, and the plan says by how much it overruns the budget. `<out>/results.json` and `results.md`
are rewritten after every stage and every evaluated model, so an interrupted run still reports what it
finished; rerunning continues it. The arms, the analysis, the results table and the verdicts live in
`tools/mixflow_fair_report.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tools.mixflow_fair_report import AUTO_ARM, FEW_STEPS, analyse, arms_of, cell_name, job_path, report, save

CUT_ORDER_STEPS = (32, 16, 8, 4)  # dropped after the CFG-1 cells when the budget is short: dearest first, and
                                 # the primary family (FEW_STEPS) last
EVAL_SEED = 777                # image i of every model starts from noise seeded EVAL_SEED + i


def log(msg: str) -> None:
    print(f"[fair {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.mixflow_fair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fair")
    p.add_argument("--config", default=None, help="training config (default: configs/tiny-cpu.yaml)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override for every run (repeat), e.g. model.kwargs=...")
    p.add_argument("--nproc", type=int, default=2, help="training ranks")
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--max-base-steps", type=int, default=6000)
    p.add_argument("--converged", type=float, default=0.01,
                   help="relative change of the EMA validation loss over the last 20 %% of the base's steps")
    p.add_argument("--base-lr", type=float, default=3e-3, help="peak (amendment 3; the first CPU run: 1e-3)")
    p.add_argument("--base-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: one run of --base-steps decaying to 0.1 x the peak (amendment 3); constant: "
                        "extended by 25 %% until converged, up to --max-base-steps (the first CPU run)")
    p.add_argument("--arm-fraction", type=float, default=0.3, help="arm steps / base steps")
    p.add_argument("--arm-lr", type=float, default=3e-4,
                   help="constant; the base's final rate (amendment 3; the first CPU run: 1e-4)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--auto-gamma", action="store_true",
                   help="add the arm mixflow-auto when the base shows a stable lag band (amendment 4)")
    p.add_argument("--auto-gamma-images", type=int, default=64,
                   help="prompts for the base's Slow Flow v2 that auto-γ is derived from")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--images", type=int, default=2000, help="images per cell (one per held-out prompt)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="Euler steps N")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="CFG scales (default: 1 and the config's sample.guidance)")
    p.add_argument("--slowflow-images", type=int, default=16)
    p.add_argument("--ref-steps", type=int, default=128, help="Slow Flow v2 reference trajectory steps")
    p.add_argument("--budget-min", type=float, default=120.0, help="cut evaluation cells to fit this wall time")
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (one thread each)")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plan", action="store_true", help="print the plan and exit")
    p.add_argument("--worker", default=None, metavar="I/N", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data

def data_specs(args) -> dict:
    """Shard sets, each from its own seed so no evaluation image or prompt was trained on."""
    return {"train": dict(n=args.train_samples, samples_per_shard=500, size=64, seed=0),
            "val": dict(n=256, samples_per_shard=256, size=64, seed=1),
            "prompts": dict(n=args.images, samples_per_shard=1000, size=64, seed=2),
            "ref": dict(n=max(args.images, 2000), samples_per_shard=1000, size=64, seed=3)}


def pattern(out: Path, name: str, spec: dict) -> str:
    count = -(-spec["n"] // spec["samples_per_shard"])
    return str(out / "data" / name / f"{name}-{{000000..{count - 1:06d}}}.tar")


def ensure_data(out: Path, args) -> dict:
    from t2i.data.writers import write_shapes_shards

    patterns = {}
    for name, spec in data_specs(args).items():
        folder = out / "data" / name
        manifest = folder / "manifest.json"
        if not (manifest.exists() and all(json.loads(manifest.read_text())["args"].get(k) == v
                                          for k, v in spec.items())):
            log(f"data: {spec['n']} {name} samples (seed {spec['seed']})")
            write_shapes_shards(folder, prefix=name, overwrite=True, progress=False, **spec)
        patterns[name] = pattern(out, name, spec)
    return patterns


def records(shards: str, n: int) -> list[dict]:
    """Caption and GenEval clauses of the first n samples, in order."""
    from t2i.data.shards import expand_shards, raw_samples

    out = []
    for s in raw_samples(expand_shards(shards, key="prompts"), counts={}):
        meta = json.loads(s["json"])
        out.append({"caption": s["txt"].decode(), "include": meta["include"], "exclude": meta.get("exclude", [])})
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------ training

def finished_step(run: Path) -> int:
    from t2i.checkpoint import store
    from t2i.errors import CheckpointError

    try:
        tag = store.latest_tag(run / "checkpoints")
    except CheckpointError:
        return 0
    return store.read_meta(run / "checkpoints", tag)["step"] if tag else 0


def train(args, run: Path, steps: int, overrides: list[str]) -> float:
    """`t2i train` for `steps` steps in `run` (resumed if it has a checkpoint); wall seconds."""
    if finished_step(run) >= steps:
        return 0.0
    resume = ["--resume"] if finished_step(run) > 0 else []
    cmd = [sys.executable, "-m", "t2i.cli", "train", *(["--config", args.config] if args.config else []),
           "--nproc", str(args.nproc), *resume, f"run.output_dir={run.parent}", f"run.name={run.name}",
           f"train.steps={steps}", "sample.every=0", "sample.geneval_per_tag=0", *args.override, *overrides]
    log(f"train {run.name}: {' '.join(cmd[3:])}")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def ema_validation(run: Path, val_shards: str, device: str = "cpu") -> dict[int, float]:
    """Fixed-σ validation loss of the EMA weights of every complete checkpoint of `run`, by step."""
    import torch

    from t2i.checkpoint import loading, store
    from t2i.train.diagnostics import FixedSigmaValidation

    root = run / "checkpoints"
    loaded, validation = None, None
    out = {}
    for tag in store.complete_tags(root):
        loaded = loading.load(root / tag, ema=True, device=device, text=loaded and loaded.text,
                              vae=loaded and loaded.vae)
        if validation is None:
            cfg = loaded.cfg
            cfg.validation.shards = val_shards
            validation = FixedSigmaValidation(cfg.validation, cfg.data, loaded.text, loaded.vae, torch.device(device))
        out[store.read_meta(root, tag)["step"]] = validation(loaded.model)["val_loss"]
    return out


def converged(curve: dict[int, float], tol: float) -> tuple[bool, float]:
    """Relative change of the loss between 80 % and 100 % of the last step (checkpoints every 10 %)."""
    last = max(curve)
    before = min(curve, key=lambda s: abs(s - 0.8 * last))
    change = abs(curve[last] - curve[before]) / curve[last]
    return change < tol, change


def train_base(out: Path, args, data: dict, results: dict) -> Path:
    run = out / "base"
    steps = args.base_steps
    every = max(1, steps // 10)
    decayed = args.base_schedule == "cosine"
    common = [f"data.shards={data['train']}", f"validation.shards={data['val']}", "validation.every=0",
              f"train.lr={args.base_lr}", f"train.schedule={args.base_schedule}", "train.min_lr_ratio=0.1",
              "train.warmup_steps=100", f"train.ckpt_every={every}", "train.keep_last=0",
              f"train.log_every={max(1, every // 2)}"]
    t0, trained = time.time(), 0.0
    while True:
        wall = train(args, run, steps, common)
        trained += wall
        results["time_s"]["base"] = results["time_s"].get("base", 0.0) + wall
        curve = ema_validation(run, data["val"], args.device)
        ok, change = converged(curve, args.converged)
        steps = max(curve)  # a rerun may find more steps than asked for (an earlier, longer run)
        results["base"] = {"steps": steps, "val_loss_ema": curve, "change_last_20pct": change, "converged": ok,
                           "schedule": args.base_schedule}
        log(f"base: {steps} steps, EMA val loss {curve[steps]:.5f}, change over the last 20 % {change:.2%}")
        if ok or decayed or steps >= args.max_base_steps:  # a decayed schedule has a fixed length: no extension
            break
        steps = min(args.max_base_steps, int(steps * 1.25) // every * every)
    results["time_s"]["base_eval"] = results["time_s"].get("base_eval", 0.0) + time.time() - t0 - trained
    return run


def derive_auto_gamma(out: Path, args, data: dict, base: Path, results: dict) -> None:
    """Auto-γ from the base's Slow Flow v2 at the trained CFG and N ∈ FEW_STEPS (measured once, then read from
    eval/base/auto-gamma.json); results["auto_gamma"] holds the derivation, its gamma None without a stable band."""
    from t2i.eval.auto_gamma import auto_gamma

    path = out / "eval" / "base" / "auto-gamma.json"
    if path.exists():
        summaries = json.loads(path.read_text())["summaries"]
    else:
        from t2i.checkpoint import loading
        from t2i.io import write_json

        t0 = time.time()
        loaded = loading.load(base, ema=True, device=args.device)
        guidance = loaded.cfg.sample.guidance
        prompts = records(data["prompts"], args.auto_gamma_images)
        summaries = {str(n): v for n, v in slowflow_job(loaded, prompts, list(FEW_STEPS), guidance, args).items()}
        write_json(path, {"summaries": summaries, "guidance": guidance, "images": len(prompts)})
        results["time_s"]["auto_gamma"] = time.time() - t0
    derived = auto_gamma(summaries)
    derived["lags"] = [{k: round(v, 5) if isinstance(v, float) else v for k, v in p.items()} for p in derived["lags"]]
    results["auto_gamma"] = derived
    log(f"auto-γ: {derived['reason']}" + ("" if derived["gamma"] is None else f"; arm {AUTO_ARM} added"))


def train_arms(out: Path, args, data: dict, base: Path, results: dict) -> dict[str, Path]:
    steps = max(1, round(args.arm_fraction * results["base"]["steps"]))
    runs = {}
    for seed in range(args.seeds):
        for arm, overrides in arms_of(results).items():
            run = out / f"{arm}-s{seed}"
            wall = train(args, run, steps, [
                f"data.shards={data['train']}", f"validation.shards={data['val']}", "validation.every=0",
                f"train.init_from={base}", "train.init_weights=ema", f"train.lr={args.arm_lr}",
                "train.schedule=constant", "train.warmup_steps=20", f"train.ckpt_every={steps}",
                f"train.log_every={max(1, steps // 10)}", f"run.seed={seed}", *overrides])
            results["time_s"][f"arm:{run.name}"] = wall or results["time_s"].get(f"arm:{run.name}", 0.0)
            runs[run.name] = run
    results["arm_steps"] = steps
    return runs


# -------------------------------------------------------------------------------------------- cells

def cells(args, trained_guidance: float) -> list[tuple[int, float]]:
    guidance = args.guidance or sorted({1.0, trained_guidance})
    return [(n, g) for g in guidance for n in args.steps]


def nfe(cell: tuple[int, float]) -> int:
    n, g = cell
    return n * (1 if g == 1.0 else 2)


def fit_budget(all_cells: list[tuple[int, float]], seconds_per_nfe_image: float, images: int, models: int,
               budget_s: float, slowflow_nfe: dict[float, int] | None = None) -> tuple[list, list]:
    """Cut cells in the pre-registered order until the evaluation fits: CFG 1 first, then the trained-CFG cells
    from the most expensive down (CUT_ORDER_STEPS). The cheapest trained-CFG cell is never cut, so there is
    always a result. `slowflow_nfe`: NFE per model of the Slow Flow v2 job of each CFG scale, paid while a
    cell at that scale is kept."""
    slowflow_nfe = slowflow_nfe or {}

    def cost(cs):
        nfes = sum(nfe(c) for c in cs) * images + sum(slowflow_nfe.get(g, 0) for g in {c[1] for c in cs})
        return nfes * models * seconds_per_nfe_image

    kept = list(all_cells)
    order = [c for c in kept if c[1] == 1.0] + [c for n in CUT_ORDER_STEPS for c in kept if c[0] == n and c[1] != 1.0]
    dropped = []
    for c in order:
        if cost(kept) <= budget_s or len(kept) == 1:
            break
        kept.remove(c)
        dropped.append(c)
    return kept, dropped


# --------------------------------------------------------------------------------------- evaluation

def evaluate_cell(loaded, prompts: list[dict], cell, args, extractor) -> dict[str, np.ndarray]:
    """Per-image correctness, off-palette fraction and features of one model at one cell."""
    from t2i.eval.sampling import generate
    from t2i.eval.shapes_detector import detect, judge, off_palette_fraction

    n, g = cell
    images = generate(loaded.model, loaded.text, loaded.vae, [r["caption"] for r in prompts],
                      resolution=loaded.cfg.data.resolution, steps=n, guidance=g, seed=EVAL_SEED,
                      batch_size=args.batch_size)
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    correct = np.array([judge(detect(a), r["include"], r["exclude"]) for a, r in zip(arrays, prompts)])
    from t2i.eval.features import compute_features
    return {"correct": correct, "off_palette": off_palette_fraction(arrays),
            "features": compute_features(list(arrays), extractor)}


def jobs(out: Path, models: dict[str, Path], kept: list, slowflow: bool) -> list[tuple[str, tuple]]:
    """(model, cell) for every kept cell, plus (model, ("slowflow", g)) per CFG scale: Slow Flow v2 at the
    kept step counts of that scale."""
    extra = [("slowflow", g) for g in sorted({c[1] for c in kept})] if slowflow else []
    return [(label, cell) for label in models for cell in [*kept, *extra]
            if not job_path(out, label, cell).exists()]


def slowflow_job(loaded, prompts: list[dict], steps: list[int], guidance: float, args) -> dict:
    """Slow Flow v2 (t2i.eval.slowflow) of one model at one CFG scale: per N, the per-step summary."""
    from t2i.eval.background_sigma import shapes_background
    from t2i.eval.slowflow import measure_steps

    param = next(loaded.model.parameters())
    background = shapes_background(param.device) if loaded.cfg.vae.kind == "identity" else None
    return measure_steps(loaded.model, loaded.text, loaded.latent_shape, [r["caption"] for r in prompts], steps,
                         guidance=guidance, seed=EVAL_SEED, batch_size=args.batch_size, ref_steps=args.ref_steps,
                         background=background)


def run_worker(out: Path, args, share: str) -> None:
    import torch

    from t2i.checkpoint import loading
    from t2i.eval.features import RandomConvExtractor

    torch.set_num_threads(1)
    i, n = map(int, share.split("/"))
    plan = json.loads((out / "eval" / "plan.json").read_text())
    prompts = records(plan["prompts"], plan["images"])
    extractor = RandomConvExtractor()
    loaded, current = None, None
    for k, (label, cell) in enumerate(plan["jobs"]):
        if k % n != i:
            continue
        cell = tuple(cell)
        path = job_path(out, label, cell)
        if path.exists():
            continue
        if current != label:
            loaded = loading.load(plan["models"][label], ema=True, device=args.device, text=loaded and loaded.text,
                                  vae=loaded and loaded.vae)
            current = label
        t0 = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        if cell[0] == "slowflow":
            steps = sorted({int(c[0]) for c in plan["cells"] if c[1] == cell[1]})
            summary = slowflow_job(loaded, prompts[: plan["slowflow_images"]], steps, cell[1], args)
            from t2i.io import write_json
            write_json(path, {str(n): v for n, v in summary.items()})
            log(f"worker {i}: {label} Slow Flow v2 at CFG {cell[1]:g} ({time.time() - t0:.0f} s)")
            continue
        result = evaluate_cell(loaded, prompts, cell, args, extractor)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
        np.savez(tmp, seconds=time.time() - t0, **result)
        os.replace(tmp, path)
        log(f"worker {i}: {label} {cell_name(cell)}: accuracy {result['correct'].mean():.3f} "
            f"({time.time() - t0:.0f} s)")


def calibrate(models: dict[str, Path], prompts: list[dict], args) -> float:
    """Seconds per model evaluation of one image (one worker), from one timed batch at N = 4, CFG 1."""
    import torch

    from t2i.checkpoint import loading
    from t2i.eval.sampling import generate

    torch.set_num_threads(1)
    loaded = loading.load(models["base"], ema=True, device=args.device)
    batch = [r["caption"] for r in prompts[: min(len(prompts), args.batch_size)]]
    t0 = time.time()
    generate(loaded.model, loaded.text, loaded.vae, batch, resolution=loaded.cfg.data.resolution, steps=4,
             guidance=1.0, seed=EVAL_SEED, batch_size=args.batch_size)
    return (time.time() - t0) / (4 * len(batch))


def evaluate(out: Path, args, data: dict, models: dict[str, Path], results: dict) -> None:
    """Plan the cells (once: calibrated, cut to the budget), then run the workers; results every minute."""
    from t2i.config import load_config

    trained = load_config(args.config, list(args.override)).sample.guidance
    all_cells = cells(args, trained)
    plan_path = out / "eval" / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        new = {k: str(v) for k, v in models.items() if k not in plan["models"]}
        if new:  # an arm added to a finished plan (--auto-gamma): evaluated in the cells already kept, not re-cut
            plan["models"].update(new)
            plan["jobs"] += jobs(out, {k: Path(v) for k, v in new.items()}, [tuple(c) for c in plan["cells"]],
                                 plan["slowflow_images"] > 0)
            plan_path.write_text(json.dumps(plan, indent=1))
            log(f"evaluation: {sorted(new)} added to the plan's {len(plan['cells'])} cells")
    else:
        prompts = records(data["prompts"], args.images)
        per_nfe = calibrate(models, prompts, args) / max(1, args.workers)
        spent = time.time() - results["started"]
        left = max(0.0, args.budget_min * 60 - spent)
        # Slow Flow v2 per model and kept scale: one reference run of ref_steps plus a run at each step count
        # (all of them: an upper bound, since the job runs only the kept ones)
        slow = {g: (args.ref_steps + sum(args.steps)) * (1 if g == 1.0 else 2) * args.slowflow_images
                for g in {c[1] for c in all_cells}} if args.slowflow_images > 0 else {}
        kept, dropped = fit_budget(all_cells, per_nfe, args.images, len(models), left, slow)
        from t2i.checkpoint import loading
        resolution = loading.load(models["base"], ema=True).cfg.data.resolution
        plan = {"prompts": data["prompts"], "images": args.images, "resolution": resolution, "models": {k: str(v) for k, v in models.items()},
                "cells": kept, "dropped": dropped, "seconds_per_nfe_image": per_nfe, "trained_guidance": trained,
                "slowflow_images": args.slowflow_images, "ref_steps": args.ref_steps,
                "estimate_s": (sum(nfe(c) for c in kept) * args.images
                               + sum(slow.get(g, 0) for g in {c[1] for c in kept})) * len(models) * per_nfe,
                "budget_left_s": left}
        plan["jobs"] = jobs(out, models, [tuple(c) for c in kept], args.slowflow_images > 0)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan, indent=1))
        log(f"evaluation: {len(kept)} cells × {len(models)} models × {args.images} images, estimated "
            f"{plan['estimate_s'] / 60:.0f} min of {left / 60:.0f} left in the budget; cut for the budget: "
            f"{[cell_name(c) for c in dropped] or 'none'}")
    results["cells"], results["dropped_cells"] = plan["cells"], plan["dropped"]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "tools.mixflow_fair", "--out", str(out), "--worker",
                               f"{i}/{args.workers}", "--batch-size", str(args.batch_size), "--device", args.device,
                               "--ref-steps", str(args.ref_steps)])
             for i in range(args.workers)]
    while any(p.poll() is None for p in procs):  # partial results while the workers run
        time.sleep(60)
        analyse(out, results, data)
        save(out, results)
    codes = [p.wait() for p in procs]
    results["time_s"]["evaluation"] = results["time_s"].get("evaluation", 0.0) + time.time() - t0
    if any(codes):
        raise SystemExit(f"an evaluation worker failed: exit codes {codes}")


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    if args.worker:
        run_worker(out, args, args.worker)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"args": vars(args), "seeds": args.seeds, "converged_tol": args.converged})
    results.setdefault("time_s", {})
    results["started"] = time.time() - sum(results["time_s"].values())
    results.setdefault("started_at", time.strftime("%Y-%m-%d %H:%M"))
    if args.plan:
        from t2i.config import load_config
        trained = load_config(args.config, list(args.override)).sample.guidance
        arm_steps = round(args.arm_fraction * args.base_steps)
        length = ("cosine decay" if args.base_schedule == "cosine"
                  else f"constant lr, up to {args.max_base_steps} until converged")
        print(f"base: {args.base_steps} steps ({length}); arms: {len(arms_of(results))} × {args.seeds} seeds × "
              f"{arm_steps} steps; cells: {[cell_name(c) for c in cells(args, trained)]}; "
              f"{args.images} images per cell; budget {args.budget_min:.0f} min"
              + (f"; + {AUTO_ARM} if the base shows a stable lag band" if args.auto_gamma else ""))
        return 0
    t0 = time.time()
    data = ensure_data(out, args)
    results["time_s"]["data"] = results["time_s"].get("data", 0.0) + time.time() - t0
    save(out, results)
    base = train_base(out, args, data, results)
    save(out, results)
    if args.auto_gamma:
        derive_auto_gamma(out, args, data, base, results)
        save(out, results)
    models = {"base": base, **train_arms(out, args, data, base, results)}
    save(out, results)
    evaluate(out, args, data, models, results)
    analyse(out, results, data)
    save(out, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
