"""Non-finite losses: the step is skipped (no update) and counted; several in a row stop the run
with a clear message and the last good checkpoint stays loadable."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, tiny_train_args
from t2i.checkpoint import store

SCRIPT = """
import sys
import pipelines.train as train
from t2i.cli import main
poison = {int(c) for c in sys.argv[1].split(",")}
real, calls = train.compute_loss, [0]
def poisoned(*a, **k):
    calls[0] += 1
    loss, stats = real(*a, **k)
    return (loss * float("nan") if calls[0] in poison else loss), stats
train.compute_loss = poisoned
sys.exit(main(sys.argv[2:]))
"""


def run_poisoned(poison: str, *args):
    return subprocess.run([sys.executable, "-c", SCRIPT, poison, "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_stop_the_run(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=8)
    args = tiny_train_args(shards, tmp_path / "runs", "nan", **{"train.steps": 10, "train.ckpt_every": 1,
                                                                 "train.max_consecutive_nonfinite": 3})
    root = tmp_path / "runs" / "nan" / "checkpoints"
    first = run_poisoned("3", "--stop-at", "3", *args)          # one NaN step, then a checkpoint at the stop
    assert first.returncode == 0, first.stderr[-3000:]
    before, skipped = (store.load_weights(root, store.tag_for(s), ema=False) for s in (2, 3))
    assert all(torch.equal(before[n], skipped[n]) for n in before)           # step 3 did not move the weights
    assert store.read_client_states(root, "step00000003")[0]["ema"]["updates"] == 2

    second = run_poisoned("3,4,5", "--resume", *args)           # steps 6, 7, 8 are NaN
    assert second.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient (last at step 8)" in second.stderr
    assert "The last good checkpoint is 'step00000005'" in second.stderr
    records = [json.loads(line) for line in (root.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert store.latest_tag(root) == "step00000005"
    after = store.load_weights(root, "step00000005", ema=False)
    assert any(not torch.equal(skipped[n], after[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in after.values())
