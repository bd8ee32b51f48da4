"""Checkpoint size and reader memory against world size (issue 12): train a few steps of the tiny config
at each (ZeRO stage, world size), then report for the last tag

    bytes_per_param   sum of the tag's files (without universal/) / parameter count
    ema_rank_bytes    the EMA tensors in one rank's t2i/rankNNNNN.pt (rank 0)
    reader_rss_mb     peak RSS of `t2i ckpt consolidate --weights ema` in a fresh process (ru_maxrss of its child;
                      the smallest of --rss-repeats runs)
    base_rss_mb       the same process measure of `python -c "import t2i.cli, deepspeed, torch"` (imports only)

    python tests/ema_scale_measure.py OUT.json [--stages 1,2,3] [--worlds 2,4] [--width 64] [--layers 2]

Used by tests/test_ema_scale.py (small model) and for the numbers in docs/design/checkpoints.md §7.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
           PYTHONPATH=str(REPO))
RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def make_shards(folder: Path, n_shards=2, per_shard=8) -> list[str]:
    from conftest import write_sample_shards

    return write_sample_shards(folder, n_shards, per_shard)


def peak_rss_mb(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", RSS, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1]) / 1024


def ema_tensor_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state["ema"]["shadow"].values())


def measure(shards, runs: Path, stage: int, world: int, width: int, layers: int, steps: int = 2,
            rss_repeats: int = 1) -> dict:
    import torch

    from helpers import tiny_train_args
    from t2i.checkpoint import store

    name = f"z{stage}w{world}"
    kwargs = f"{{num_layers: {layers}, attention_head_dim: {width // 4}, num_attention_heads: 4, " \
             f"caption_projection_dim: {width}}}"
    args = tiny_train_args(shards, runs, name, **{"deepspeed.zero_stage": stage, "train.steps": steps,
                                                  "model.kwargs": kwargs, "train.micro_batch_size": 2})
    proc = subprocess.run([sys.executable, "-m", "t2i.cli", "train", "--nproc", str(world), *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"train {name} failed:\n{proc.stderr[-4000:]}")
    root, tag = store.resolve(runs / name)
    files = [p for p in (root / tag).rglob("*") if p.is_file() and store.UNIVERSAL not in p.parts]
    total = sum(p.stat().st_size for p in files)
    rank0 = torch.load(root / tag / "t2i" / "rank00000.pt", weights_only=False)
    model = torch.load(min((root / tag).glob("*model_states.pt")), weights_only=False)
    params = sum(s.numel() for group in model["param_shapes"] for s in group.values())
    # The imports alone vary by ~10 MB from one process to the next: the smallest of a few runs is the measure.
    rss = min(peak_rss_mb([sys.executable, "-m", "t2i.cli", "ckpt", "consolidate", str(runs / name), "--out",
                           str(runs / f"{name}-out{i}"), "--weights", "ema"]) for i in range(rss_repeats))
    return {"stage": stage, "world": world, "params": params, "tag_bytes": total, "bytes_per_param": total / params,
            "ema_rank_bytes": ema_tensor_bytes(rank0), "client_rank_bytes": (root / tag / "t2i" / "rank00000.pt")
            .stat().st_size, "reader_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rss-repeats", type=int, default=3)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ema-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work)
    base = peak_rss_mb([sys.executable, "-c", "import t2i.cli, deepspeed, torch, safetensors.torch"])
    rows = []
    for stage in map(int, a.stages.split(",")):
        for world in map(int, a.worlds.split(",")):
            row = measure(shards, work / "runs", stage, world, a.width, a.layers, rss_repeats=a.rss_repeats)
            row["base_rss_mb"] = base
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
