"""Running the real `t2i` command in subprocesses (torchrun + DeepSpeed with gloo ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_t2i(*args, timeout=600, check=True, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONPATH": str(REPO), **(env or {})}  # `env` may replace any of them, PYTHONPATH included
    proc = subprocess.run([sys.executable, "-m", "t2i.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"t2i {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_train_args(shards, out_dir, name, **overrides) -> list[str]:
    """Overrides for a fast tiny run on the given shards."""
    base = {"run.output_dir": out_dir, "run.name": name, "data.shards": shards, "data.resolution": 16,
            "data.shuffle_buffer": 16, "train.micro_batch_size": 4, "train.warmup_steps": 2,
            "train.log_every": 1, "train.ckpt_every": 1000, "logging.wandb": "disabled",
            "sample.steps": 2, "sample.prompts": "[a photo of a red square]", "validation.shards": "null"}
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


def sample_keys(run_dir, rank) -> list[list[str]]:
    lines = (Path(run_dir) / f"sample_keys.rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["keys"] for line in lines if line.strip()]
