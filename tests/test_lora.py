"""LoRA on the MMDiT (t2i/models/lora.py): the default targets on every preset, only the adapters train, a
zero-B adapter is the base model exactly, merge() gives the plain model with the adapted outputs, and the
adapter weights round-trip; the config errors name their key."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from t2i.config import ModelConfig
from t2i.errors import ConfigError
from t2i.models import lora
from t2i.models.mmdit import build_model, preset_kwargs, velocity
from t2i.models.presets import PRESETS

TINY = dict(in_channels=3, sample_size=16, joint_attention_dim=64, pooled_projection_dim=64)


def tiny(seed=0) -> SD3Transformer2DModel:
    """The tiny preset as build_model makes it, with the zero-initialised (adaLN-Zero) modulations and output
    projection made random, so every attention projection changes the output."""
    model = build_model(ModelConfig(), seed=seed, **TINY).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    cond = {"context": torch.randn(2, 8, 64, generator=gen), "pooled": torch.randn(2, 64, generator=gen)}
    return x, torch.tensor([250.0, 750.0]), cond


def out(model):
    with torch.no_grad():
        return velocity(model, *inputs())


def on_meta(preset: str) -> SD3Transformer2DModel:
    kwargs = preset_kwargs(ModelConfig(preset=preset), in_channels=16, sample_size=128,
                           joint_attention_dim=4096, pooled_projection_dim=2048)
    with torch.device("meta"):
        return SD3Transformer2DModel(**kwargs)


def expected_modules(preset: str) -> int:
    """8 projections a block (4 image, 4 text), the last block without the text output projection
    (context_pre_only), and 4 more in each block with a second attention."""
    p = PRESETS[preset]
    return 8 * p["num_layers"] - 1 + 4 * len(p.get("dual_attention_layers", ()))


def test_default_targets_are_every_attention_projection_of_each_preset():
    names = lora.target_names(tiny(), lora.DEFAULT_TARGETS)
    assert len(names) == expected_modules("tiny") == 31
    assert set(names[:8]) == {f"transformer_blocks.0.{t}" for t in lora.DEFAULT_TARGETS[:8]}
    assert "transformer_blocks.3.attn.to_add_out" not in names and "transformer_blocks.3.attn.add_q_proj" in names
    for preset, n in [("sd3.5-medium", 243), ("sd3.5-large", 303)]:
        names = lora.target_names(on_meta(preset))
        assert len(names) == expected_modules(preset) == n
    names = lora.target_names(on_meta("sd3.5-medium"))
    assert {int(n.split(".")[1]) for n in names if ".attn2." in n} == set(range(13))
    assert lora.target_names(tiny(), ["attn*.to_q"], blocks=[1, 3]) == [
        "transformer_blocks.1.attn.to_q", "transformer_blocks.3.attn.to_q"]


@pytest.mark.parametrize("preset,modules,params", [("sd3.5-medium", 243, 11_943_936), ("sd3.5-large", 303, 23_580_672)])
def test_parameter_count_is_rank_times_in_plus_out_of_the_adapted_layers(preset, modules, params):
    assert lora.parameter_count(preset, rank=16) == (modules, params)
    model = on_meta(preset)  # independently: every adapted layer is width x width, width = heads x head dim
    width = PRESETS[preset]["num_attention_heads"] * PRESETS[preset]["attention_head_dim"]
    shapes = {tuple(model.get_submodule(n).weight.shape) for n in lora.target_names(model)}
    assert shapes == {(width, width)} and modules * 16 * 2 * width == params
    if preset == "sd3.5-medium":  # and what peft actually adds (on the meta device: no memory; 0.5 s)
        lora.apply(model, rank=16)
        assert sum(p.numel() for p in lora.adapter_parameters(model)) == params


def test_apply_trains_only_the_adapters_and_a_zero_b_adapter_is_the_base_model():
    model = tiny()
    base_out, base_state = out(model), {k: v.clone() for k, v in model.state_dict().items()}
    names = lora.apply(model, rank=4, alpha=8)
    assert len(names) == 31 and all(isinstance(model.get_submodule(n).base_layer, torch.nn.Linear) for n in names)
    layer = model.get_submodule(names[0])
    assert layer.scaling["default"] == 2.0 and layer.lora_A["default"].weight.shape == (4, 128)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 62 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in lora.adapter_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(not p.any() for n, p in model.named_parameters() if ".lora_B." in n)  # gaussian init: B = 0
    assert torch.equal(out(model), base_out)
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)

    velocity(model, *inputs()).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable) and any(p.grad.any() for n, p in model.named_parameters() if ".lora_B." in n)


def randomise_b(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_merge_gives_the_plain_model_with_the_adapted_outputs():
    plain_keys = list(tiny().state_dict())
    model = tiny()
    base_out = out(model)
    lora.apply(model, rank=4)
    randomise_b(model)
    adapted = out(model)
    assert (adapted - base_out).abs().max() > 1e-3
    merged = lora.merge(model)
    assert len(merged) == 31 and not lora.has_adapter(model) and not hasattr(model, "peft_config")
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert list(model.state_dict()) == plain_keys
    torch.testing.assert_close(out(model), adapted, atol=1e-5, rtol=1e-5)
    assert lora.apply(model, rank=2)  # a merged model takes a new adapter


def test_adapter_weights_round_trip_and_other_layouts_are_refused():
    model = tiny()
    lora.apply(model, rank=4)
    randomise_b(model)
    state = lora.adapter_state_dict(model)
    assert len(state) == 62 and "transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert "transformer_blocks.0.attn2.to_q.lora_A.weight" not in state
    fresh = tiny()
    lora.apply(fresh, rank=4)
    assert not torch.allclose(out(fresh), out(model))
    assert lora.load_adapter(fresh, {k: v.clone() for k, v in state.items()}) == 62
    assert torch.equal(out(fresh), out(model))

    missing = dict(state)
    del missing["transformer_blocks.2.attn.to_v.lora_B.weight"]
    with pytest.raises(ConfigError, match=r"1 missing \['transformer_blocks.2.attn.to_v.lora_B.weight'\]"):
        lora.load_adapter(fresh, missing)
    with pytest.raises(ConfigError, match="1 unexpected"):
        lora.load_adapter(fresh, {**state, "transformer_blocks.0.ff.net.2.lora_A.weight": torch.zeros(4, 512)})
    other_rank = tiny()
    lora.apply(other_rank, rank=8)
    with pytest.raises(ConfigError, match="lora.rank"):
        lora.load_adapter(other_rank, state)


def test_bf16_base_gives_bf16_adapters():
    model = build_model(ModelConfig(), seed=0, **TINY).to(torch.bfloat16)
    lora.apply(model, rank=4)
    assert {p.dtype for p in lora.adapter_parameters(model)} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=["attn.to_qq"]), r"lora.targets: 'attn.to_qq' matches no Linear .* closest: attn.to_q, "),
    (dict(targets=["attn2.to_q"]), r"lora.targets: 'attn2.to_q' matches no Linear .*closest: attn.to_q"),
    (dict(targets=["proj_out"]), r"lora.targets: 'proj_out' matches no Linear"),
    (dict(targets=["attn.to_q"], blocks=[4]), r"lora.blocks: \[4\] out of range; the model has 4 transformer blocks"),
    (dict(targets=["attn.to_q"], blocks=[]), r"lora.blocks is empty"),
    (dict(targets=["text_encoder.*"]), "the text encoders and the VAE are frozen; LoRA trains the MMDiT only"),
    (dict(targets=["vae.decoder*"]), "the text encoders and the VAE are frozen"),
    (dict(targets=[]), "lora.targets must be a non-empty list"),
])
def test_check_targets_names_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        lora.check_targets(tiny(), **kwargs)


def test_rank_alpha_dropout_and_init_are_checked():
    lora.check_rank(16)
    lora.check_rank(4, alpha=2.5)
    for rank in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigError, match="lora.rank must be a positive integer"):
            lora.check_rank(rank)
    with pytest.raises(ConfigError, match="lora.alpha must be a positive number"):
        lora.check_rank(16, alpha=0)
    with pytest.raises(ConfigError, match="stage.rank"):
        lora.check_rank(0, key="stage.rank")
    model = tiny()
    for bad, match in [(dict(rank=0), "lora.rank"), (dict(rank=4, alpha=-1), "lora.alpha"),
                       (dict(rank=4, dropout=1.0), "lora.dropout"), (dict(rank=4, init="pissa"), "lora.init")]:
        with pytest.raises(ConfigError, match=match):
            lora.apply(model, **bad)
    assert not lora.has_adapter(model)
    lora.apply(model, rank=4, init=True)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        lora.apply(model, rank=4)


def test_eval_lora_flags_name_a_checkpoint_label_and_are_checked_before_sampling():
    from types import SimpleNamespace

    from pipelines.evaluate import adapters_by_label
    from t2i.errors import EvalError

    args = SimpleNamespace(ckpt=["base=/w/sd35", "mix=/w/sd35"], lora=["mix=runs/x/lora"])
    assert adapters_by_label(args) == {"mix": "runs/x/lora"}
    for lora, message in ((["other=f"], r"no --ckpt is labelled 'other' \(labels: base, mix\)"),
                          (["runs/x/lora"], "--lora must be LABEL=FILE"),
                          (["mix=a", "mix=b"], "two adapters for 'mix'")):
        with pytest.raises(EvalError, match=message):
            adapters_by_label(SimpleNamespace(ckpt=args.ckpt, lora=lora))


def test_lora_targets_and_blocks_are_checked_before_any_rank_starts(tmp_path):
    """plan_training (the process the user started, before torchrun) checks the patterns against the model built
    on the meta device: the tiny preset, and the release-shaped folder's transformer/config.json."""
    from t2i.train.plan import plan_training

    base = [f"run.output_dir={tmp_path}", "lora.rank=4"]
    with pytest.raises(ConfigError, match=r"lora.targets: 'attn.to_qq' matches no Linear layer .* closest: attn.to_q"):
        plan_training(None, [*base, "lora.targets=[attn.to_qq]"])
    with pytest.raises(ConfigError, match=r"lora.blocks: \[9\] out of range; the model has 4 transformer blocks"):
        plan_training(None, [*base, "lora.blocks=[9]"])
    with pytest.raises(ConfigError, match=r"'attn2.to_q' matches no Linear layer"):  # tiny has no second attention
        plan_training(None, [*base, "lora.targets=[attn2.to_q]"])
    assert not any(tmp_path.iterdir())  # nothing was started


def test_the_prelaunch_check_reads_the_folders_transformer_config(sd35_folder):
    from t2i.config import load_config

    cfg = load_config(overrides=[f"model.pretrained={sd35_folder}", "lora.rank=4", "lora.targets=[attn2.to_q]",
                                 "lora.blocks=[1]"])
    with pytest.raises(ConfigError, match=r"'attn2.to_q' matches no Linear layer in the chosen lora.blocks \[1\] "
                                          r"\(it does in blocks \[0\]\)"):
        lora.check_config(cfg)
    lora.check_config(load_config(overrides=[f"model.pretrained={sd35_folder}", "lora.rank=4",
                                             "lora.targets=[attn2.to_q]"]))
