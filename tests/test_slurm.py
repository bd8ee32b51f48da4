"""The real slurm/ scripts against a real SLURM on this machine (tools/slurm_ci.sh starts it; .ci/run
does so before the tests). Jobs run the tiny config; the tests poll job states, never sleep blindly.

Proven: a 1-node x 2-rank training job completes (its losses are the reference); a job warned
before its time limit checkpoints, requeues itself and finishes with the per-step losses of that
uninterrupted run; a job hit by `scontrol requeue` resumes the same way; a signal before training
loses nothing; an array sampling job writes exactly what one process writes.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, losses, tiny_train_args

pytestmark = pytest.mark.slow
STEPS = 120  # with the time-limit test's pacing, long enough for a warning to land mid-training


def _slurm_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not _slurm_up():
        if os.environ.get("T2I_REQUIRE_SLURM") == "1":
            pytest.fail("SLURM is not running (start it with: bash tools/slurm_ci.sh start)")
        pytest.skip("no SLURM here; start one with: bash tools/slurm_ci.sh start")


def sbatch(script: str, out_dir: Path, *args, env=None, options=()) -> str:
    """Submit slurm/<script> from the repository root with CPU-sized resources; returns the job id."""
    full_env = dict(os.environ, T2I_ROOT=str(REPO), T2I_VENV=sys.prefix, DS_ACCELERATOR="cpu",
                    WANDB_MODE="disabled", T2I_MAX_RESTARTS="6")
    full_env.update(env or {})
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out_dir}/%x-%j.out",
           *options, str(REPO / "slurm" / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def job_states(job: str) -> list[dict]:
    """One dict per job (array task) from `scontrol show job -o` (no accounting database here)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for(job: str, final=("COMPLETED",), timeout=600, until=None) -> list[dict]:
    """Poll until every task of `job` is in a terminal state (or `until()` holds); fail on a bad one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = job_states(job)
        if until is not None and until():
            return states
        if states and all(s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                             "OUT_OF_MEMORY") for s in states):
            assert all(s["JobState"] in final for s in states), states
            return states
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout} s: {job_states(job)}")


def log_of(out_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out_dir.glob("*.out")))


def train_args(shards, out_dir, name):
    return tiny_train_args(shards, out_dir, name, **{"train.steps": STEPS, "train.ckpt_every": 40,
                                                     "train.log_every": 20})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import sample_members, write_tar
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(4):
        members = []
        for i in range(12):
            rgb = tuple(int(v) for v in np.random.default_rng([s, i]).integers(0, 256, 3))
            members += sample_members(f"s{s}_{i:03d}", rgb, f"caption {s} {i}")
        paths.append(str(write_tar(root / f"shard-{s:06d}.tar", members)))
    return "[" + ",".join(paths) + "]"


@pytest.fixture(scope="module")
def reference_job(shards, tmp_path_factory):
    """An uninterrupted 1-node x 2-rank training job through slurm/train.sbatch (the run folder)."""
    out = tmp_path_factory.mktemp("ref")
    job = sbatch("train.sbatch", out, *train_args(shards, out, "run"), options=["--ntasks-per-node=2"])
    wait_for(job)
    return out


@pytest.fixture(scope="module")
def reference(reference_job):
    """Its per-step losses: what every interrupted job must reproduce. (That the same run under torchrun
    gives them too is what tests/test_train_resume.py's resume-equality tests rest on.)"""
    return losses(reference_job / "run")


def test_a_two_rank_training_job_completes(reference_job, reference):
    text = log_of(reference_job)
    assert "2 task(s)" in text and "ranks exited with 0" in text and "requeueing" not in text
    assert len(reference) == STEPS and all(np.isfinite(reference))
    assert (reference_job / "run" / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"


def test_a_job_warned_before_its_time_limit_checkpoints_requeues_and_finishes_identically(shards, reference,
                                                                                          tmp_path):
    # --time=3 with the warning 90 s ahead: nominally 90 s after the start, up to 60 s earlier (Slurm
    # checks coarsely), so after start-up and during training; each restart is warned again until the
    # run is done. Steps are paced to >= 0.85 s (120 steps >= 100 s), as a bigger model's would be, so
    # that a fast machine cannot finish before the warning (CI once did, in 45 s).
    job = sbatch("train.sbatch", tmp_path, *train_args(shards, tmp_path, "run"),
                 options=["--ntasks-per-node=2", "--time=3", "--signal=B:USR1@90"],
                 env={"T2I_MAX_RESTARTS": "10", "T2I_TEST_MIN_STEP_SECONDS": "0.85"})
    (state,) = wait_for(job, timeout=1500)
    text = log_of(tmp_path)
    assert int(state["Restarts"]) >= 1, text[-3000:]
    assert "batch shell got SIGUSR1" in text and "requeueing" in text and "ranks exited with 99" in text
    assert "checkpointed at step" in text
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)


def test_scontrol_requeue_checkpoints_and_resumes_identically(shards, reference, tmp_path):
    job = sbatch("train.sbatch", tmp_path, *train_args(shards, tmp_path, "run"), options=["--ntasks-per-node=2"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(job, until=lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= STEPS // 2)
    subprocess.run(["scontrol", "requeue", job], check=True)
    (state,) = wait_for(job, timeout=600)
    text = log_of(tmp_path)
    assert state["Restarts"] == "1" and "SIGTERM" in text and "ranks exited with 99" in text
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)


def test_an_array_sampling_job_writes_what_one_process_writes(tmp_path):
    import torch
    from PIL import Image

    from t2i.eval import sample_folder as sample
    from t2i.eval import geneval
    from t2i.checkpoint import loading
    from t2i.models import build
    from t2i.config import load_config
    from t2i.eval.prompts import shapes_geneval, write_prompts

    cfg = load_config(None, ["data.resolution=16"])
    text, vae = build.build_frozen(cfg)
    build.build_for(cfg, text, vae).save_pretrained(tmp_path / "ckpt" / "transformer")
    entries = shapes_geneval(per_tag=2)
    prompts = write_prompts(entries, tmp_path / "prompts.jsonl")
    ckpt = tmp_path / "ckpt" / "transformer"
    args = ["--images-per-prompt", "2", "--steps", "3", "--seed", "5", "--batch-size", "4", "data.resolution=16"]
    job = sbatch("sample.sbatch", tmp_path, *args, options=["--array=0-2"],
                 env={"CKPT": str(ckpt), "PROMPTS": str(prompts), "OUT": str(tmp_path / "array")})
    states = wait_for(job)
    assert len(states) == 3

    torch.set_num_threads(1)
    loaded = loading.load_any(ckpt, cfg)
    sample.run(loaded, entries, tmp_path / "single", prompts_source=str(prompts), images_per_prompt=2, steps=3,
               guidance=cfg.sample.guidance, seed=5, batch_size=4, progress=False)

    def images(folder):
        return {(p, f.name): np.asarray(Image.open(f)) for p, (_, fs) in geneval.list_images(folder).items()
                for f in fs}
    a, b = images(tmp_path / "single"), images(tmp_path / "array")
    assert len(a) == 2 * len(entries) and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert log_of(tmp_path).count("ranks exited with 0") == 3


def test_a_signal_before_training_starts_loses_nothing(shards, reference, tmp_path):
    """USR1 to the batch shell the moment the job runs (ranks still importing or not yet started):
    nothing is saved or corrupted, the job requeues and then finishes identically."""
    job = sbatch("train.sbatch", tmp_path, *train_args(shards, tmp_path, "run"), options=["--ntasks-per-node=2"])
    # the batch script's first log line comes after its traps are installed; a signal sent when the job
    # is RUNNING but its script not yet started is dropped by Slurm (seen in CI)
    wait_for(job, until=lambda: "start on" in log_of(tmp_path))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (state,) = wait_for(job, timeout=600)
    text = log_of(tmp_path)
    assert int(state["Restarts"]) >= 1 and "batch shell got SIGUSR1" in text and "requeueing" in text
    assert "checkpointed at step" not in text.split("requeueing")[0]         # nothing saved before the requeue
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)



def _nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True).stdout.split()
    return sum(int(n) for n in out if n.isdigit())


def test_a_two_node_job_with_one_rank_per_node_gives_the_two_rank_losses(shards, reference, tmp_path):
    """2 nodes x 1 rank (MASTER_ADDR = the first node, ranks from SLURM_PROCID) = 1 node x 2 ranks."""
    if _nodes() < 2:
        pytest.skip("this SLURM has one node; tools/slurm_ci.sh starts two with SLURM_CI_NODES=2")
    job = sbatch("train.sbatch", tmp_path, *train_args(shards, tmp_path, "run"),
                 options=["--nodes=2", "--ntasks-per-node=1"])
    wait_for(job)
    text = log_of(tmp_path)
    assert "2 task(s)" in text and "ranks exited with 0" in text
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-6, abs=1e-7)
