"""The embedded default, end to end on a CPU: synthetic shapes shards -> 2-rank training of the
tiny MMDiT under DeepSpeed -> checkpoint -> labelled sample grid + loss curve -> MixFlow post-training
-> Slow Flow report -> evaluation of both checkpoints (shapes GenEval, FID/KID, report + grid).

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


def main(cfg: Config, config_path: str | None, overrides: list[str], nproc: int = 2, mixflow_steps: int = 100) -> int:
    t0 = time.time()
    ensure_shapes_shards(Path("data"))
    out = Path(cfg.run.output_dir) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    pretrain, mixflow = out / "pretrain", out / "mixflow"
    print(f"[demo] 1/3 pretrain the tiny MMDiT (flow matching) -> {pretrain}", flush=True)
    rc = _t2i("train", config_path, nproc, [f"run.output_dir={out}", "run.name=pretrain", *overrides])
    if rc == 0 and mixflow_steps > 0:
        print(f"[demo] 2/3 post-train it with MixFlow (gamma {cfg.train.mixflow_gamma}) -> {mixflow}", flush=True)
        rc = _t2i("train", config_path, nproc, [f"run.output_dir={out}", "run.name=mixflow", *overrides,
                                         f"train.init_from={pretrain}", "train.objective=mixflow",
                                         f"train.steps={mixflow_steps}", "train.lr=2e-4", "train.schedule=constant",
                                         "train.warmup_steps=10", f"train.ckpt_every={mixflow_steps}",
                                         f"train.log_every={max(1, mixflow_steps // 3)}",
                                         f"validation.every={max(1, mixflow_steps // 3)}"])
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}", file=sys.stderr)
        return rc
    report = None
    if mixflow_steps > 0:
        print("[demo] 3/4 exposure bias (Slow Flow) of both checkpoints", flush=True)
        # CFG 1 and the trained CFG, each with a 64-step reference: 8 images keep the cost of the former
        # single-CFG, reference-free report of 32 images
        rc = _t2i("slowflow", None, None, ["--ckpt", f"pretrain={pretrain}", "--ckpt", f"mixflow={mixflow}",
                                           "--steps", "4", "8", "16", "--n", "8", "--ref-steps", "64",
                                           "--out", str(mixflow / "samples")])
        if rc != 0:
            print(f"[demo] Slow Flow report failed with exit code {rc}", file=sys.stderr)
            return rc
        report = mixflow / "samples" / "slowflow.png"

    evaluation = out / "eval"
    print(f"[demo] 4/4 evaluate: shapes GenEval + FID/KID against the held-out shards -> {evaluation}", flush=True)
    checkpoints = [f"pretrain={pretrain}"] + ([f"mixflow={mixflow}"] if mixflow_steps > 0 else [])
    rc = _t2i("eval", config_path, nproc, [a for c in checkpoints for a in ("--ckpt", c)]
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
    for run in (pretrain, mixflow):
        grids = sorted((run / "samples").glob("step*.png"))
        if grids:
            print(f"[demo] samples:     {grids[-1]}")
    print(f"[demo] loss curve:  {pretrain / 'loss.png'}")
    if report:
        print(f"[demo] Slow Flow:   {report}")
    print(f"[demo] evaluation:  {evaluation / 'report.md'}  (grid: {evaluation / 'grid.png'})")
    return 0
