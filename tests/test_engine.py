"""LR schedule and the generated DeepSpeed config."""

import math
import os

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
                                 "deepspeed.extra={zero_optimization: {round_robin_gradients: true}}"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "contiguous_gradients": False,  # CPU
                                       "reduce_bucket_size": 50_000_000, "zero_hpz_partition_size": 1,
                                       "zero_quantized_weights": False, "zero_quantized_gradients": False,
                                       "round_robin_gradients": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (8, 4, 0.5)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert "optimizer" not in ds and "zero_allow_untested_optimizer" not in ds


def test_the_communication_keys_reach_deepspeeds_zero_section(monkeypatch):
    zero2 = deepspeed_config(load_config(overrides=[
        "deepspeed.overlap_comm=false", "deepspeed.contiguous_gradients=false", "deepspeed.reduce_bucket_size=5e6",
        "deepspeed.allgather_bucket_size=2e7"]))["zero_optimization"]
    assert zero2 == {"stage": 2, "overlap_comm": False, "contiguous_gradients": False, "reduce_bucket_size": 5_000_000,
                     "allgather_bucket_size": 20_000_000}
    zero3 = deepspeed_config(load_config(overrides=[
        "deepspeed.zero_stage=3", "deepspeed.zero_hpz_partition_size=8", "deepspeed.zero_quantized_weights=true",
        "deepspeed.zero_quantized_gradients=true"]))["zero_optimization"]
    assert (zero3["zero_hpz_partition_size"], zero3["zero_quantized_weights"], zero3["zero_quantized_gradients"]) == \
        (8, True, True)
    assert "allgather_bucket_size" not in zero3  # ZeRO-3 gathers by prefetch buckets, not this key
    import torch
    for setting, cuda, want in [("null", True, True), ("null", False, False), ("true", False, True),
                                ("false", True, False)]:  # null follows the device: on with CUDA, off on a CPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        got = deepspeed_config(load_config(overrides=[f"deepspeed.contiguous_gradients={setting}"]))
        assert got["zero_optimization"]["contiguous_gradients"] is want
    offload = deepspeed_config(load_config(overrides=["optimizer.kind=cpu_adam", "optimizer.offload_pin_memory=false"]))
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert deepspeed_config(load_config(overrides=["optimizer.kind=adamw_8bit"]))["zero_allow_untested_optimizer"]


@pytest.mark.parametrize("extra,message", [
    ("{optimizer: {type: AdamW, params: {lr: 0.001}}}",
     r"deepspeed.extra.optimizer is set by t2i; use the optimizer section \(optimizer.kind"),
    ("{scheduler: {type: WarmupLR}}", r"deepspeed.extra.scheduler is set by t2i; use train.schedule"),
    ("{zero_optimization: {overlap_comm: false}}",
     r"deepspeed.extra.zero_optimization.overlap_comm is set by t2i; use deepspeed.overlap_comm instead"),
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}", r"use optimizer.kind=cpu_adam"),
    ("{gradient_clipping: 0.5}", r"use train.grad_clip"),
    ("{bf16: {enabled: true}}", r"deepspeed.extra.bf16.enabled is set by t2i; use deepspeed.precision"),
    ("{zero_optimization: {mics_shard_size: 8}}", r"MiCS is not offered: DeepSpeed 0.19 removed"),
    ("{zero_optimization: {reduce_bucket_sise: 8}}",
     r"reduce_bucket_sise looks like zero_optimization.reduce_bucket_size, which t2i sets; use deepspeed.reduce_bucket_size"),
])
def test_an_extra_key_that_t2i_sets_is_refused_naming_the_key_to_use(extra, message):
    from t2i.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"deepspeed.extra={extra}"])


def test_extra_keys_t2i_does_not_set_pass_through():
    cfg = load_config(overrides=["deepspeed.extra={bf16: {check_grad_overflow: false}, "
                                 "zero_optimization: {round_robin_gradients: true}}"])
    ds = deepspeed_config(cfg)
    assert ds["bf16"]["check_grad_overflow"] is False and ds["zero_optimization"]["round_robin_gradients"] is True


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


def test_deepspeeds_cpu_shared_memory_allreduce_is_skipped_without_being_built(monkeypatch):
    """After skip_shm_allreduce, DeepSpeed's own set-up path (`build_shm_op`) gives None without loading the
    op, and without probing the other ops' builds (the table holds the one mark)."""
    import importlib

    import deepspeed.ops
    from deepspeed.ops.op_builder.builder import OpBuilder

    from t2i.train.engine import skip_shm_allreduce

    monkeypatch.delitem(vars(deepspeed.ops), "__compatible_ops__", raising=False)
    loads = []
    monkeypatch.setattr(OpBuilder, "load", lambda self, verbose=True: loads.append(self.NAME))
    skip_shm_allreduce()
    assert vars(deepspeed.ops)["__compatible_ops__"] == {"deepspeed_shm_comm": False}
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None and loads == []


def test_the_environments_ninja_comes_first_on_path(tmp_path, monkeypatch):
    """DeepSpeed's JIT builds run the first `ninja` on PATH: the environment's own, whether or not it is
    activated (two ninjas took each other's builds for stale); PATH is left alone where bin/ has none."""
    from t2i.runtime import put_environment_tools_first

    bindir, other = tmp_path / "venv" / "bin", tmp_path / "usr-bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr("sys.executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", f"{other}:{bindir}:/bin")
    put_environment_tools_first()
    assert os.environ["PATH"] == f"{other}:{bindir}:/bin"  # no ninja there: unchanged
    (bindir / "ninja").write_text("")
    put_environment_tools_first()
    assert os.environ["PATH"] == f"{bindir}:{other}:/bin"  # first, and once
    put_environment_tools_first()
    assert os.environ["PATH"] == f"{bindir}:{other}:/bin"
