"""The embedded default, end to end on a CPU: synthetic shapes shards -> 2-rank training of the
tiny MMDiT under DeepSpeed -> checkpoint -> labelled sample grid + loss curve -> two post-training arms of
equal length from the same parent (control: flow matching; MixFlow) -> Slow Flow v2 report -> evaluation of
the three checkpoints side by side (shapes GenEval with 95 % intervals and paired McNemar tests, FID/KID,
report + grid).

    t2i demo                  # what the README's main command runs
    t2i demo train.steps=50   # overrides go to the training config
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from t2i.config import Config

# 8 training shards and 2 held-out validation shards (another seed); the tiny config reads 32x32 crops.
SHAPES = {"shapes": dict(n=4000, samples_per_shard=500, size=64, seed=0),
          "shapes-val": dict(n=512, samples_per_shard=256, size=64, seed=1)}


def ensure_shapes_shards(root: Path) -> None:
    """Write the synthetic shapes shards once; reuse them when the manifest matches."""
    from t2i.data.writers import write_shapes_shards

    for prefix, spec in SHAPES.items():
        out = root / prefix
        manifest = out / "manifest.json"
        if manifest.exists():
            args = json.loads(manifest.read_text()).get("args", {})
            if all(args.get(k) == v for k, v in spec.items()):
                print(f"[demo] shards: reusing {out}", flush=True)
                continue
        print(f"[demo] shards: writing {spec['n']} captioned-shapes samples to {out}", flush=True)
        write_shapes_shards(out, prefix=prefix, overwrite=True, progress=False, **spec)


def _t2i(command: str, config_path: str | None, nproc: int | None, args: list[str]) -> int:
    """`t2i <command> [--config C] [--nproc N] <args>` in a subprocess; its exit code."""
    argv = [command, *(["--config", config_path] if config_path else []),
            *([f"--nproc={nproc}"] if nproc else []), *args]
    print(f"[demo] t2i {' '.join(argv)}", flush=True)
    return subprocess.call([sys.executable, "-m", "t2i.cli", *argv])


def post_train_args(out: Path, name: str, parent: Path, steps: int, overrides: list[str],
                    objective: list[str]) -> list[str]:
    """The overrides of one post-training arm from the parent's EMA weights; the arms differ in `objective`
    only. The arm draws its grid once, at the end (sample.every=0, and so no live GenEval: step 4 scores
    the arms); every cadence fits its length, so its own settings raise no warning (t2i.config_warnings)."""
    every = max(1, steps // 3)
    return [f"run.output_dir={out}", f"run.name={name}", *overrides, f"train.init_from={parent}",
            f"train.steps={steps}", "train.lr=2e-4", "train.schedule=constant",
            f"train.warmup_steps={min(10, steps - 1)}", f"train.ckpt_every={steps}", f"train.log_every={every}",
            f"validation.every={every}", "sample.every=0", "sample.geneval_per_tag=0", *objective]


def post_train(config_path, nproc, out: Path, name: str, parent: Path, steps: int, overrides: list[str],
               objective: list[str]) -> int:
    return _t2i("train", config_path, nproc, post_train_args(out, name, parent, steps, overrides, objective))


def main(cfg: Config, config_path: str | None, overrides: list[str], nproc: int = 2, mixflow_steps: int = 100) -> int:
    t0 = time.time()
    ensure_shapes_shards(Path("data"))
    out = Path(cfg.run.output_dir) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    pretrain, control, mixflow = out / "pretrain", out / "control", out / "mixflow"
    print(f"[demo] 1/4 pretrain the tiny MMDiT (flow matching) -> {pretrain}", flush=True)
    rc = _t2i("train", config_path, nproc, [f"run.output_dir={out}", "run.name=pretrain", *overrides])
    if rc == 0 and mixflow_steps > 0:
        # The paper's comparison: two arms of equal length from the same parent, differing in the objective only
        print(f"[demo] 2/4 post-train it twice for {mixflow_steps} steps: control (flow matching) -> {control}, "
              f"MixFlow (gamma {cfg.train.mixflow_gamma}) -> {mixflow}", flush=True)
        rc = post_train(config_path, nproc, out, "control", pretrain, mixflow_steps, overrides,
                        ["train.objective=flow_matching"])
        rc = rc or post_train(config_path, nproc, out, "mixflow", pretrain, mixflow_steps, overrides,
                              ["train.objective=mixflow"])
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}", file=sys.stderr)
        return rc
    report = None
    arms = [f"pretrain={pretrain}"] + ([f"control={control}", f"mixflow={mixflow}"] if mixflow_steps > 0 else [])
    if mixflow_steps > 0:
        print("[demo] 3/4 exposure bias (Slow Flow v2) of the three checkpoints", flush=True)
        # CFG 1 and the trained CFG, each against a 32-step reference of the same model: 8 images keep it cheap
        rc = _t2i("slowflow", None, None, [a for c in arms for a in ("--ckpt", c)]
                  + ["--steps", "4", "8", "--n", "8", "--ref-steps", "32", "--out", str(mixflow / "samples")])
        if rc != 0:
            print(f"[demo] Slow Flow report failed with exit code {rc}", file=sys.stderr)
            return rc
        report = mixflow / "samples" / "slowflow.png"

    evaluation = out / "eval"
    print(f"[demo] 4/4 evaluate: shapes GenEval + FID/KID against the held-out shards -> {evaluation}", flush=True)
    rc = _t2i("eval", config_path, nproc, [a for c in arms for a in ("--ckpt", c)]
               + ["--out", str(evaluation), "--fid-shards", str(Path("data") / "shapes-val")])
    if rc != 0:
        print(f"[demo] evaluation failed with exit code {rc}", file=sys.stderr)
        return rc

    from t2i.train.logger import read_metrics
    records = read_metrics(pretrain)
    head = sum(r["loss"] for r in records[:20]) / min(20, len(records))
    tail = sum(r["loss"] for r in records[-20:]) / min(20, len(records))
    print(f"[demo] done in {time.time() - t0:.0f} s: pretrain loss {head:.4f} (first 20 steps) -> {tail:.4f} (last 20)")
    print(f"[demo] runs:        {out}")
    for run in (pretrain, control, mixflow):
        grids = sorted((run / "samples").glob("step*.png"))
        if grids:
            print(f"[demo] samples:     {grids[-1]}")
    print(f"[demo] loss curve:  {pretrain / 'loss.png'}")
    if report:
        print(f"[demo] Slow Flow:   {report}")
    print(f"[demo] evaluation:  {evaluation / 'report.md'}  (grid: {evaluation / 'grid.png'}; the paired comparison "
          "there says which differences are larger than sampling noise)")
    return 0
