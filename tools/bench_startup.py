"""What a `t2i` process costs before its first step and after its last: the launching process of a
multi-rank run, and the interpreter's exit with the model libraries loaded. Each row runs fresh Python
processes (median of --repeats, interleaved) for what t2i does and for the baseline it replaced.

    python -m tools.bench_startup                 # table; --json out.json for the numbers
    python -m tools.bench_startup --repeats 5

Rows:

* **plan a run**: the process a user starts for `t2i train --nproc N` plans the run (config, geometry,
  data, resume; t2i.train.plan) and then starts torchrun. Baseline: the same process importing the model
  stack (t2i.checkpoint.loading: diffusers, open_clip, transformers), which planning used to pull in.
* **exit with the stack loaded**: from the end of a command to the end of the process, with the stack
  and DeepSpeed imported. t2i: `gc.freeze()` first (t2i.cli.main); baseline: a plain exit, whose
  collector passes walk every library object. Measured as (process wall time) − (the same process
  ending with `os._exit`, which skips exit entirely).
* **a 2-rank run** (`--train`, about 15 s each): `t2i train --nproc 2`, 6 steps of the tiny config at
  16 px with the final samples, wall time from command to exit. No baseline: the old code is gone;
  compare against the number in docs/performance.md §9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACK = "import t2i.checkpoint.loading, deepspeed"
PLAN = ("from t2i.train.plan import plan_training; "
        "plan_training(None, ['data.shards={shards}', 'run.output_dir={out}', 'run.name=r'])")


def wall(code: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def write_shards(folder: Path) -> Path:
    from t2i.data.writers import write_shapes_shards

    write_shapes_shards(folder, n=8, samples_per_shard=4, size=32, progress=False)
    return folder


def measure(repeats: int, train: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp = Path(tmp)
        shards = write_shards(tmp / "shapes")
        plan = PLAN.format(shards=shards, out=tmp / "runs")
        rows = [{"case": "plan a run (the launching process)", "t2i": wall(plan, repeats),
                 "baseline": wall(f"{STACK}; {plan}", repeats)}]
        hard = wall(f"{STACK}; import os; os._exit(0)", repeats)
        frozen = wall(f"{STACK}; import gc; gc.freeze()", repeats)
        plain = wall(STACK, repeats)
        rows.append({"case": "exit with the stack loaded", "t2i": [f - h for f, h in zip(frozen, hard)],
                     "baseline": [p - h for p, h in zip(plain, hard)]})
        if train:
            shard_glob = str(shards / "shapes-{000000..000001}.tar")
            args = [sys.executable, "-m", "t2i.cli", "train", "--nproc", "2", f"data.shards={shard_glob}",
                    f"run.output_dir={tmp / 'runs'}", "data.resolution=16", "train.micro_batch_size=4",
                    "train.warmup_steps=1", "train.steps=6", "sample.steps=2", "logging.wandb=disabled",
                    "validation.shards=null"]
            times = []
            for i in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([*args, f"run.name=train{i}"], cwd=REPO, check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            rows.append({"case": "a 2-rank run, 6 steps (command to exit)", "t2i": times, "baseline": None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | t2i s (median, range) | baseline s | t2i / baseline |", "|---|---:|---:|---:|"]
    for r in rows:
        ours = statistics.median(r["t2i"])
        spread = f"{ours:.2f} ({min(r['t2i']):.2f}-{max(r['t2i']):.2f})"
        if r["baseline"] is None:
            lines.append(f"| {r['case']} | {spread} | - | - |")
            continue
        base = statistics.median(r["baseline"])
        lines.append(f"| {r['case']} | {spread} | {base:.2f} ({min(r['baseline']):.2f}-{max(r['baseline']):.2f}) "
                     f"| {ours / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="also time a 2-rank tiny training run")
    ap.add_argument("--json", default=None, help="write the raw times here")
    a = ap.parse_args(argv)
    rows = measure(a.repeats, a.train)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
