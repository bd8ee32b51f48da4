"""The model's speed keys: selective activation checkpointing (exactly the chosen blocks recompute, the
gradients equal the unchecked model's), whole-block torch.compile (one graph, no break), the SDPA kernel
probe and `model.attention_backend`, the compiled loss parts, the allocator default."""

import os

import pytest
import torch

from t2i.config import ModelConfig
from t2i.errors import ConfigError
from t2i.models import attention
from t2i.models.mmdit import OUTSIDE_BLOCKS, build_model, checkpointed_blocks, compile_model, velocity

SHAPES = dict(in_channels=3, sample_size=8, joint_attention_dim=16, pooled_projection_dim=8)


def tiny(**model_keys):
    return build_model(ModelConfig(preset="tiny", kwargs={"num_layers": 6}, **model_keys), seed=0, **SHAPES)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    cond = {"context": torch.randn(2, 5, 16, generator=g), "pooled": torch.randn(2, 8, generator=g)}
    return x, torch.tensor([250.0, 750.0]), cond


def forward_backward(model):
    """Per-block forward call counts (a recomputed block runs twice) and whether flash SDPA was enabled
    during each call, then the gradients."""
    calls = {i: [] for i in range(len(model.transformer_blocks))}
    # A pre-hook: the recomputation stops as soon as it has what backward needs (torch's early stop), so a
    # forward hook at the end of the block would not see it.
    hooks = [block.register_forward_pre_hook(lambda m, a, i=i: calls[i].append(torch.backends.cuda.flash_sdp_enabled()))
             for i, block in enumerate(model.transformer_blocks)]
    x, t, cond = batch()
    velocity(model, x, t, cond).square().mean().backward()
    for h in hooks:
        h.remove()
    return calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every,chosen", [(False, []), (0, []), (True, [0, 1, 2, 3, 4, 5]), (1, [0, 1, 2, 3, 4, 5]),
                                          (2, [0, 2, 4]), (3, [0, 3]), (4, [0, 4]), (7, [0])])
def test_checkpointed_blocks_are_every_kth_from_the_first(every, chosen):
    assert checkpointed_blocks(6, every) == chosen


@pytest.mark.parametrize("every,chosen", [(2, {0, 2, 4}), (3, {0, 3}), (True, {0, 1, 2, 3, 4, 5})])
def test_exactly_the_chosen_blocks_recompute_and_the_gradients_equal_the_unchecked_model(every, chosen):
    plain_calls, plain_grads = forward_backward(tiny())
    calls, grads = forward_backward(tiny(gradient_checkpointing=every))
    assert {i: len(c) for i, c in plain_calls.items()} == {i: 1 for i in range(6)}
    assert {i: len(c) for i, c in calls.items()} == {i: 2 if i in chosen else 1 for i in range(6)}
    assert grads.keys() == plain_grads.keys() and len(grads) > 50
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=0, atol=0, msg=n)


def test_a_forced_attention_backend_holds_in_forward_and_in_the_recomputation():
    calls, grads = forward_backward(tiny(gradient_checkpointing=2, attention_backend="math"))
    assert calls[0] == [False, False] and calls[1] == [False]  # flash off in forward and in block 0's recompute
    auto_calls, _ = forward_backward(tiny(gradient_checkpointing=2))
    assert auto_calls[0] == [True, True]
    math_plain_calls, math_grads = forward_backward(tiny(attention_backend="math"))
    for n in grads:
        torch.testing.assert_close(grads[n], math_grads[n], rtol=0, atol=0, msg=n)


def test_the_sdpa_probe_reports_the_usable_kernels_and_a_forced_one_that_cannot_run_is_refused():
    probed = attention.probe(heads=4, tokens=20, head_dim=32, dtype=torch.float32, device="cpu")
    assert probed["usable"]["math"] and probed["usable"]["flash"]          # torch's CPU flash kernel
    assert not probed["usable"]["cudnn"] and not probed["usable"]["efficient"]
    assert probed["auto"] == "flash" and probed["reasons"]["cudnn"]
    assert attention.resolve("auto", probed) == "flash" and attention.resolve("math", probed) == "math"
    with pytest.raises(ConfigError, match=r"model.attention_backend=cudnn cannot run here .*usable at these shapes: "
                                          r"flash, math"):
        attention.resolve("cudnn", probed)
    assert "SDPA math (4 heads x 20 tokens x 32, float32; usable: flash, math" in attention.describe(probed, "math")
    model = tiny()
    assert attention.model_shape(model.config, 8, 5) == {"heads": 4, "tokens": 4 + 5, "head_dim": 32}


@pytest.mark.parametrize("kwargs", [{}, {"dual_attention_layers": (0,)}])
def test_a_whole_block_compiles_as_one_graph_with_its_norms(kwargs):
    """adaLN-Zero modulation, layer norms, QK RMS-norm, joint attention and MLP: one Dynamo graph, no break
    (the first block, a dual-attention block, and the last block, whose text stream ends early)."""
    import torch._dynamo

    model = build_model(ModelConfig(preset="tiny", kwargs=kwargs), seed=0, **SHAPES)
    x, t, cond = batch()
    hidden = model.pos_embed(x)
    temb = model.time_text_embed(t, cond["pooled"])
    context = model.context_embedder(cond["context"])
    for block in (model.transformer_blocks[0], model.transformer_blocks[-1]):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(hidden, context, temb)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compile_covers_every_block_and_the_modules_outside_them():
    model = tiny()
    compile_model(model)
    compiled = {n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {f"transformer_blocks.{i}" for i in range(6)} | set(OUTSIDE_BLOCKS)
    assert set(model.state_dict()) == set(tiny().state_dict())  # the module tree (and DeepSpeed's view) unchanged


@pytest.mark.slow
def test_the_compiled_loss_parts_equal_the_eager_ones():
    from t2i import flow
    from t2i.train.step import loss_parts

    parts = loss_parts(True)
    g = torch.Generator().manual_seed(0)
    x, noise, pred = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    sigma = torch.rand(4, generator=g)
    torch.testing.assert_close(parts["interpolate_fn"](x, noise, sigma), flow.interpolate(x, noise, sigma))
    torch.testing.assert_close(parts["error_fn"](pred, x, noise), flow.squared_error(pred, x, noise))
    assert loss_parts(False) == {}


def test_expandable_segments_is_the_default_unless_the_user_set_the_allocator(monkeypatch):
    from t2i.runtime import set_allocator_default

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    set_allocator_default()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    set_allocator_default()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")
    set_allocator_default()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_a_bad_speed_key_is_refused_by_name():
    from t2i.config import load_config

    for override, message in [("model.gradient_checkpointing=-1", r"model.gradient_checkpointing must be true, false"),
                              ("model.attention_backend=flash3", r"model.attention_backend must be one of"),
                              ("optimizer.kind=lion", r"optimizer.kind must be one of"),
                              ("optimizer.implementation=fast", r"optimizer.implementation must be one of"),
                              ("deepspeed.reduce_bucket_size=0", r"deepspeed.reduce_bucket_size must be > 0"),
                              ("deepspeed.zero_hpz_partition_size=8", r"needs deepspeed.zero_stage=3, got 2"),
                              ("deepspeed.zero_quantized_gradients=true", r"needs deepspeed.zero_stage=3")]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[override])
    with pytest.raises(ConfigError, match=r"optimizer.implementation='foreach' chooses among torch's AdamW"):
        load_config(overrides=["optimizer.kind=cpu_adam", "optimizer.implementation=foreach"])
    assert load_config(overrides=["model.gradient_checkpointing=3"]).model.gradient_checkpointing == 3
