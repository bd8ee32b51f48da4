"""LR schedule and the generated DeepSpeed config."""

import math

import pytest

from t2i.config import load_config
from t2i.train.engine import deepspeed_config, lr_at


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    t = load_config(overrides=["train.lr=1.0", "train.warmup_steps=10", "train.steps=110",
                               "train.min_lr_ratio=0.1", "train.schedule=cosine"]).train
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, t) == pytest.approx(0.1)


def test_constant_schedule_stays_at_lr_after_warmup():
    t = load_config(overrides=["train.lr=0.5", "train.warmup_steps=2", "train.schedule=constant"]).train
    assert [lr_at(s, t) for s in (0, 1, 2, 500)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_deepspeed_config_reflects_ours_and_extra_is_merged_deeply():
    cfg = load_config(overrides=["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "train.grad_accum=4",
                                 "train.micro_batch_size=8", "train.grad_clip=0.5",
                                 "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (8, 4, 0.5)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
