"""model.compile with aspect-ratio buckets (`compile_model(model, n_shapes)`): static graphs, one per latent
shape and kind of module, none for a repeated shape; Dynamo's recompile limit raised so that no bucket falls
back to eager; the first batch of each shape noted for the log (`ShapeWatch`).

The compiles use the "aot_eager" / "eager" backends: the recompiles are Dynamo's, whatever the backend, and
inductor on this CPU takes ~40 s per new shape from a cold cache."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.config as dynamo_config
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from t2i.config import ModelConfig
from t2i.models import mmdit
from t2i.models.mmdit import (OUTSIDE_BLOCKS, ShapeWatch, build_model, compile_model, compiled_graphs, max_kinds,
                              raise_recompile_limits, recompile_budget, velocity)

# sample_size 32 with the tiny preset's 4-pixel patches: latents up to 32x32 (8x8 tokens).
SHAPES = dict(in_channels=3, sample_size=32, joint_attention_dim=16, pooled_projection_dim=8)


def tiny(num_layers, **keys):
    return build_model(ModelConfig(preset="tiny", kwargs={"num_layers": num_layers}), seed=0, **SHAPES, **keys)


def inputs(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, height, width, generator=g)
    cond = {"context": torch.randn(2, 5, 16, generator=g), "pooled": torch.randn(2, 8, generator=g)}
    return x, torch.tensor([250.0, 750.0]), cond


def compiled_modules(model):
    return [*model.transformer_blocks, *(getattr(model, name) for name in OUTSIDE_BLOCKS)]


def cache_entries(module) -> int:
    """Dynamo's compiled graphs for the module's forward code object (shared by every module of its class)."""
    return len(_debug_get_cache_entry_list(type(module).forward.__code__))


@pytest.fixture
def limits():
    """Dynamo's limits at their defaults during the test and restored after it (compile_model raises them
    process-wide; pytest's monkeypatch cannot set a torch config module's entries)."""
    names = ("recompile_limit", "accumulated_recompile_limit")
    saved = {name: getattr(dynamo_config, name) for name in names}
    dynamo_config.recompile_limit, dynamo_config.accumulated_recompile_limit = 8, 256
    yield
    for name, value in saved.items():
        setattr(dynamo_config, name, value)


@pytest.fixture
def fresh_dynamo(limits):
    """Empty compile caches (blocks share their compiled graphs with any other test's model of their class)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_first_batch_of_each_latent_shape_is_logged_once():
    watch = ShapeWatch(2)
    assert watch.see(torch.Size([4, 16, 128, 96])) == ("model.compile: first batch at latent 128x96 (bucket 1 of 2): "
                                                       "compiling for it")
    assert watch.see((4, 16, 128, 96)) is None and watch.see((8, 16, 128, 96)) is None   # batch size aside
    assert watch.see((96, 128), "bucket 1024x768") == ("model.compile: first batch at bucket 1024x768, latent 96x128 "
                                                        "(height x width) (bucket 2 of 2): compiling for it")
    assert watch.see((4, 16, 96, 128)) is None
    assert watch.see((4, 16, 64, 64)).startswith("model.compile: first batch at latent 64x64 (shape 3, more than "
                                                 "the 2 buckets expected)")
    assert watch.see((64, 64)) is None


def test_the_recompile_limits_are_raised_per_kind_of_block_and_never_lowered(limits):
    assert recompile_budget(9) == 20 and recompile_budget(9, kinds=3) == 60
    raise_recompile_limits(60)
    assert (dynamo_config.recompile_limit, dynamo_config.cache_size_limit) == (60, 60)
    assert dynamo_config.accumulated_recompile_limit == 256
    raise_recompile_limits(4)
    assert dynamo_config.recompile_limit == 60
    raise_recompile_limits(300)
    assert dynamo_config.accumulated_recompile_limit == 300
    # Kinds sharing JointTransformerBlock.forward: plain, dual-attention, last (its text stream ends early).
    kwargs = {"num_layers": 6, "dual_attention_layers": (0, 1)}
    model = build_model(ModelConfig(preset="tiny", kwargs=kwargs), seed=0, **SHAPES)
    assert max_kinds(compiled_modules(model)) == 3
    assert max_kinds(compiled_modules(tiny(4))) == 2 and max_kinds(compiled_modules(tiny(1))) == 1


def test_one_shape_compiles_as_before(monkeypatch, limits):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append((type(self).__name__, a, k)))
    model = tiny(2)
    compile_model(model)
    assert calls == [("JointTransformerBlock", (), {})] * 2 + [("PatchEmbed", (), {}), ("AdaLayerNormContinuous", (), {})]
    assert dynamo_config.recompile_limit == 8
    calls.clear()
    build_model(ModelConfig(preset="tiny", kwargs={"num_layers": 2}, compile=True), seed=0, **SHAPES, n_shapes=9)
    assert [k for _, _, k in calls] == [{"dynamic": False}] * 4 and dynamo_config.recompile_limit == 40


def test_each_shape_compiles_once_per_module_and_the_outputs_equal_eager(fresh_dynamo):
    """Training steps (forward and backward) at 3 latent shapes, twice each: 3 graphs per compiled module (one
    block, the position embedding, the final adaLN), none for the repeats; outputs and gradients as eager's."""
    model, eager = tiny(1), tiny(1)
    compile_model(model, n_shapes=3, backend="aot_eager")
    watch, logged, start = ShapeWatch(3), [], compiled_graphs()
    for _ in range(2):
        for height, width in [(16, 16), (16, 24), (32, 24)]:   # 16, 24, 48 tokens
            x, t, cond = inputs(height, width)
            logged.append(watch.see(x.shape))
            outs = []
            for m in (model, eager):
                m.zero_grad()
                out = velocity(m, x, t, cond)
                out.square().mean().backward()
                outs.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
            (out, grads), (want, want_grads) = outs
            torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
            for n in want_grads:
                torch.testing.assert_close(grads[n], want_grads[n], rtol=0, atol=1e-5, msg=n)
    assert [cache_entries(m) for m in compiled_modules(model)] == [3, 3, 3]
    assert compiled_graphs() - start == 9
    assert logged[:3] == [f"model.compile: first batch at latent {s} (bucket {k} of 3): compiling for it"
                          for k, s in enumerate(["16x16", "16x24", "32x24"], 1)]
    assert logged[3:] == [None] * 3


# The control (limit not raised: the blocks stop compiling at 8 graphs) is only in the full suite.
@pytest.mark.parametrize("raised", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_more_graphs_than_the_default_limit_still_compile(fresh_dynamo, monkeypatch, raised):
    """Two kinds of block (plain, last) x 5 token counts: 10 graphs on JointTransformerBlock.forward, past the
    default limit of 8, which without the raise sends the 5th shape's blocks to eager. A transposed shape
    (16x8 after 8x16) has the same tokens: only the position embedding compiles for it."""
    if not raised:
        monkeypatch.setattr(mmdit, "raise_recompile_limits", lambda limit: None)
    model = tiny(2)
    compile_model(model, n_shapes=6, backend="eager")
    start = compiled_graphs()
    with torch.no_grad():
        for height, width in [(8, 8), (8, 16), (16, 8), (16, 16), (16, 24), (24, 24)]:
            velocity(model, *inputs(height, width))
    block, _, pos_embed, norm_out = compiled_modules(model)
    assert (cache_entries(pos_embed), cache_entries(norm_out)) == (6, 5)
    assert cache_entries(block) == (10 if raised else 8)
    assert compiled_graphs() - start == (21 if raised else 19)
