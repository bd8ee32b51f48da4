"""One run per run folder: a second start fails at once naming the holder, a dead holder's lock is
taken over, another host's lock is respected, and a refused start leaves the run name usable."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, run_t2i, tiny_train_args
from t2i.errors import ConfigError
from t2i.train.lock import LOCK_NAME, RunLock


def write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "2026-01-01 00:00:00",
                                                  "slurm_job": None, **holder}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_holder_is_named(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_lock(tmp_path / "run", pid=sleeper.pid)
        with pytest.raises(ConfigError) as err:
            RunLock(tmp_path / "run").acquire()
        message = str(err.value)
        assert f"process {sleeper.pid} on {socket.gethostname()}, started 2026-01-01 00:00:00" in message
        assert "\n" not in message
    finally:
        sleeper.kill()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    write_lock(tmp_path / "run", pid=dead_pid())
    with RunLock(tmp_path / "run") as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert list((tmp_path / "run").iterdir()) == []  # the stale lock moved aside and removed


def test_another_hosts_lock_is_respected(tmp_path):
    write_lock(tmp_path / "run", host="node-that-is-not-here", pid=dead_pid())
    with pytest.raises(ConfigError, match=r"node-that-is-not-here.*if that job is gone, remove .*\.lock"):
        RunLock(tmp_path / "run").acquire()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(tmp_path / "run", host="node-that-is-not-here", pid=1, slurm_job="4242")
    with RunLock(tmp_path / "run") as lock:
        assert lock.holder()["slurm_job"] == "4242" and lock.holder()["pid"] == os.getpid()


def read_holder(path, timeout=30.0):
    """The lock's JSON once written: the holder creates the file (O_EXCL) before it writes to it."""
    deadline = time.time() + timeout
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if time.time() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.slow
def test_two_starts_on_one_name_run_once_and_a_refused_start_leaves_the_name_usable(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=16)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "one"

    refused = run_t2i("train", *tiny_train_args(str(tmp_path / "missing-{0..1}.tar"), runs, "one"), check=False)
    assert refused.returncode == 2 and "not found" in refused.stderr
    assert not (run / "config.yaml").exists() and not (run / LOCK_NAME).exists()

    args = tiny_train_args(f"{shards[0]}::{shards[1]}", runs, "one", **{"train.steps": 100_000})
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "t2i.cli", "train", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        holder = read_holder(run / LOCK_NAME)
        t0 = time.time()
        second = run_t2i("train", *args, check=False)
        assert second.returncode == 2 and time.time() - t0 < 60
        assert f"is in use by process {holder['pid']}" in second.stderr
        # The first run is long so that it still holds the name however slow the second start is; once it
        # trains, a preemption signal ends it the way SLURM would (checkpoint, exit 99), which frees the name.
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and first.poll() is None \
                and time.time() < deadline + 120:
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 99, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run / LOCK_NAME).exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps and steps == list(range(1, len(steps) + 1))  # one run's steps, once each
