"""The README's main command, shortened: shards -> 2-rank training -> grid + loss curve."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO


@pytest.mark.slow
def test_demo_writes_shards_trains_on_two_ranks_and_draws_samples(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "t2i.cli", "demo", "--mixflow-steps=6", "train.steps=60", "train.warmup_steps=5", "train.log_every=10",
           "train.micro_batch_size=16", "sample.steps=4", "validation.num_samples=16"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(list((tmp_path / "data" / "shapes").glob("shapes-*.tar"))) == 8

    (demo,) = (tmp_path / "runs").iterdir()
    run = demo / "pretrain"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    assert sum(r["loss"] for r in records[-5:]) < 0.7 * sum(r["loss"] for r in records[:5])
    assert all(r["bad"] == {} and r["skipped_nonfinite"] == 0 for r in records)
    grid = Image.open(run / "samples" / "step00000060.png")
    assert grid.size == (4 * 160, 4 * (160 + 44))          # 8 prompts x 2 seeds, 4 columns
    assert Image.open(run / "loss.png").size[0] > 300
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "step00000060"
    assert "step 60/60" in proc.stderr and "[demo] done" in proc.stdout
    assert any((run / "wandb").iterdir())

    mixflow = demo / "mixflow"
    parent = json.loads((mixflow / "parent.json").read_text())
    assert (parent["tag"], parent["weights"], parent["step"]) == ("step00000060", "ema", 60)
    post = [json.loads(line) for line in (mixflow / "metrics.jsonl").read_text().splitlines()]
    assert post[0]["step"] == 0 and "val_loss" in post[0]              # the parent's validation loss
    assert [r["step"] for r in post[1:]] == list(range(1, 7))
    assert all(r["sigma_gap"]["mean"] > 0.1 for r in post if "sigma_gap" in r)   # MixFlow's slowed inputs
    control = json.loads((demo / "control" / "parent.json").read_text())
    assert control == parent                                           # both arms start from the same weights
    control_post = [json.loads(line) for line in (demo / "control" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in control_post[1:]] == list(range(1, 7))  # equal length
    assert all(r["sigma_gap"]["mean"] == 0 for r in control_post if "sigma_gap" in r)   # standard inputs
    report = json.loads((mixflow / "samples" / "slowflow.json").read_text())
    assert set(report) == {"pretrain", "control", "mixflow"} and set(report["mixflow"]) == {"4", "8"}
    assert Image.open(mixflow / "samples" / "slowflow.png").size[0] > 600
    assert "stage mixflow" in proc.stderr

    evaluation = json.loads((demo / "eval" / "report.json").read_text())
    assert set(evaluation["checkpoints"]) == {"pretrain", "control", "mixflow"}
    pairs = {(t["a"], t["b"]): t for t in evaluation["paired"]["pairs"]}
    assert set(pairs) == {("pretrain", "control"), ("pretrain", "mixflow"), ("control", "mixflow")}
    for label, acc in evaluation["paired"]["accuracy"].items():
        assert acc["images"] == 73 * 4 and acc["ci95"][0] <= acc["correct"] / acc["images"] <= acc["ci95"][1]
    for row in evaluation["checkpoints"].values():
        assert 0 <= row["geneval"]["overall"] <= 1 and row["geneval"]["images"] == 73 * 4
        assert row["fid"]["n_reference"] == 512 and row["fid"]["fid"] > 0
    assert evaluation["settings"]["steps"] == 4 and evaluation["settings"]["images_per_prompt"] == 4
    text = (demo / "eval" / "report.md").read_text()
    assert "| pretrain |" in text and "| control vs mixflow |" in text and "95 % interval" in text
    assert Image.open(demo / "eval" / "grid.png").size[0] == 8 * 160

    # shards are written once: a second demo reuses them (checked on the function, not a second demo run)
    from pipelines.demo import ensure_shapes_shards
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.tar")}
    ensure_shapes_shards(tmp_path / "data")
    assert capsys.readouterr().out.count("reusing") == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.tar")} == mtimes


def test_the_demos_own_settings_raise_no_warning(tmp_path):
    """`make demo` as shipped (the tiny default, 100-step arms): no stage logs an odd-value warning; the
    arms' cadences fit their length (a grid at the end only, so no live GenEval)."""
    from pipelines.demo import post_train_args
    from t2i.config import load_config
    from t2i.config_warnings import odd_values

    assert odd_values(load_config(None, [])) == []  # the pretraining stage: the embedded default
    for objective in ("flow_matching", "mixflow"):
        args = post_train_args(tmp_path, objective, tmp_path / "pretrain", 100, [], [f"train.objective={objective}"])
        cfg = load_config(None, args)
        assert odd_values(cfg) == [], odd_values(cfg)
        assert (cfg.train.steps, cfg.sample.every, cfg.sample.geneval_per_tag) == (100, 0, 0)
        assert (cfg.train.ckpt_every, cfg.train.log_every, cfg.validation.every) == (100, 33, 33)
