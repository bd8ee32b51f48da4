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


def test_the_training_timestep_reaches_a_bf16_model_in_fp32():
    import torch

    from t2i.config import load_config
    from t2i.train.step import loss_on_latents

    seen = {}

    class Model(torch.nn.Module):  # records what the SD3 forward receives
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
            seen.update(x=hidden_states.dtype, t=timestep.dtype, t_values=timestep.clone())
            return (hidden_states * 0,)

    cfg = load_config(None, [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    cond = {"context": torch.zeros(4, 5, 8, dtype=torch.bfloat16), "pooled": torch.zeros(4, 8, dtype=torch.bfloat16)}
    _, stats = loss_on_latents(Model(), x, cond, g, cfg, "cpu", torch.bfloat16)
    assert seen["x"] == torch.bfloat16 and seen["t"] == torch.float32
    torch.testing.assert_close(seen["t_values"], 1000 * stats["sigma"].float(), rtol=0, atol=0)  # no bf16 rounding


def test_each_rank_picks_a_visible_gpu(monkeypatch):
    import torch

    from t2i.train.engine import local_device_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound per task
    for local in range(4):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert local_device_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_device_index() == 5
