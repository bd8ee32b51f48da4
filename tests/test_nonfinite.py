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


OVERFLOW_SCRIPT = """
import json, sys, torch
from t2i.runtime import configure_environment
configure_environment()
from t2i.config import load_config
from t2i.models.mmdit import build_model
from t2i.train import engine as engine_lib
engine_lib.init_distributed()
cfg = load_config(None, ["model.kwargs={num_layers: 1}", "train.micro_batch_size=2", "deepspeed.precision=bf16",
                         f"deepspeed.overflow_check={sys.argv[1]}"])
model = build_model(cfg.model, in_channels=3, sample_size=8, joint_attention_dim=16, pooled_projection_dim=8).to(torch.bfloat16)
engine, opt = engine_lib.initialize(model, cfg)
calls = [0]
has_overflow = opt.has_overflow
def counted(*a, **k):
    calls[0] += 1
    return has_overflow(*a, **k)
opt.has_overflow = counted
out = []
for scale in (float("nan"), 1.0, float("inf")):
    before = [p.detach().clone() for p in engine.module.parameters()]
    y = engine(hidden_states=torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), timestep=torch.ones(2),
               encoder_hidden_states=torch.randn(2, 4, 16, dtype=torch.bfloat16),
               pooled_projections=torch.randn(2, 8, dtype=torch.bfloat16), return_dict=False)[0]
    engine.backward((y.float() - 1).square().mean() * scale)
    engine.step()
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))
    out.append([engine.was_step_applied(), moved])
print(json.dumps({"steps": out, "per_tensor_checks": calls[0]}))
"""


@pytest.mark.parametrize("mode,checks", [("grad_norm", 0), ("per_tensor", 3)])
def test_a_bf16_zero2_step_with_a_non_finite_gradient_is_skipped_by_the_norm_alone(tmp_path, mode, checks):
    """deepspeed.overflow_check=grad_norm (the default) drops DeepSpeed's per-tensor inf/NaN pass: a NaN or
    inf gradient still skips the step (weights unchanged, was_step_applied False) through the non-finite
    gradient norm, exactly as with the pass (per_tensor), and a finite step is applied."""
    out = subprocess.run([sys.executable, "-c", OVERFLOW_SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["steps"] == [[False, False], [True, True], [False, False]]
    assert got["per_tensor_checks"] == checks
