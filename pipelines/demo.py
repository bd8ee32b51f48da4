"""The embedded default, end to end on a CPU: synthetic shapes shards -> 2-rank training of the
tiny MMDiT under DeepSpeed -> checkpoint -> labelled sample grid + loss curve.

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


def main(cfg: Config, config_path: str | None, overrides: list[str], nproc: int = 2) -> int:
    t0 = time.time()
    ensure_shapes_shards(Path("data"))
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["train", f"--nproc={nproc}", f"run.name={name}", *overrides]
    if config_path:
        argv[1:1] = ["--config", config_path]
    print(f"[demo] training: t2i {' '.join(argv)}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "t2i.cli", *argv])
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}", file=sys.stderr)
        return rc
    run_dir = Path(cfg.run.output_dir) / name
    from t2i.logger import read_metrics
    records = read_metrics(run_dir)
    head = sum(r["loss"] for r in records[:20]) / min(20, len(records))
    tail = sum(r["loss"] for r in records[-20:]) / min(20, len(records))
    grids = sorted((run_dir / "samples").glob("*.png"))
    print(f"[demo] done in {time.time() - t0:.0f} s: loss {head:.4f} (first 20 steps) -> {tail:.4f} (last 20)")
    print(f"[demo] run folder: {run_dir}")
    print(f"[demo] samples:    {grids[-1] if grids else 'none'}")
    print(f"[demo] loss curve: {run_dir / 'loss.png'}")
    return 0
