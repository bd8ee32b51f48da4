"""A peft LoRA of the SD3.5 transformer written by t2i/checkpoint/lora_export.py loads into diffusers'
StableDiffusion3Pipeline with every key and its alpha, acts there as on our adapted transformer, and
survives read_lora; pickled or foreign adapter files are refused naming why."""

import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from t2i.checkpoint import lora_export
from t2i.checkpoint.lora_export import (SIDECAR, WEIGHT_NAME, check_loaded, count_lora_keys, read_lora,
                                        read_provenance, write_diffusers_lora)
from t2i.errors import CheckpointError

RANK, ALPHA = 4, 8  # alpha != rank: a lost alpha would load as alpha = rank, half the adapter's effect
# diffusers' SD3 LoRA targets (its dreambooth script's defaults plus the dual-attention attn2 of SD3.5).
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
PROMPTS = ["a photo of a red circle", "two cats left of a blue square"]
PROVENANCE = {"base": "/models/sd35", "base_sha256": "ab" * 32, "run": "runs/lora-1", "tag": "step_00000100"}


def target_modules(model) -> list[str]:
    """Full names of the Linear layers diffusers' SD3 targets, where present (attn2 only in dual-attention
    blocks; the last block's attn has no to_add_out)."""
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and any(name.endswith(f".{t}") for t in TARGETS))


def base_transformer(folder):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([500.0, 250.0]))


@torch.no_grad()
def run(model, seed=0):
    return model(**inputs(seed), return_dict=False)[0]


@pytest.fixture(scope="module")
def adapted(sd35_folder, tmp_path_factory):
    """Our transformer with a rank-4, alpha-8 adapter (lora_B random), its peft state dict, config and the
    folder write_diffusers_lora made of it."""
    torch.set_num_threads(2)
    model = base_transformer(sd35_folder)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules(model), lora_dropout=0.0,
                             init_lora_weights="gaussian")
    peft.inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    state = peft.get_peft_model_state_dict(model)
    out = write_diffusers_lora(state, config.to_dict(), tmp_path_factory.mktemp("lora") / "export", PROVENANCE)
    return model, state, config, out.parent


@pytest.fixture(scope="module")
def pipe(sd35_folder):
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_file_has_diffusers_keys_the_adapter_metadata_and_a_provenance_sidecar(adapted):
    _, state, config, out = adapted
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHT_NAME, SIDECAR])  # no temp left behind
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == {f"transformer.{k}" for k in state}
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.attn.to_add_out.lora_A.weight" not in keys  # context_pre_only block
    meta = json.loads(header["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (RANK, ALPHA)
    assert sorted(meta["transformer.target_modules"]) == sorted(config.target_modules)
    assert len(config.target_modules) == len(state) // 2
    assert "transformer.peft_version" not in meta  # bookkeeping left out: LoraConfig(**meta) on older peft
    side = json.loads((out / SIDECAR).read_text())
    assert side["provenance"] == PROVENANCE and side["tensors"] == len(state) and side["lora_alpha"] == ALPHA
    assert side["lora_config"]["peft_version"] == peft.__version__
    assert read_provenance(out)["matches"] is True


def test_diffusers_loads_every_key_with_alpha_and_acts_as_our_adapter(adapted, pipe):
    model, state, config, out = adapted
    base = run(pipe.transformer)
    pipe.load_lora_weights(out)
    try:
        assert count_lora_keys(pipe) == len(state) == 2 * len(config.target_modules) == 38
        (name, config), = pipe.transformer.peft_config.items()
        assert (config.r, config.lora_alpha) == (RANK, ALPHA)
        assert check_loaded(pipe, state) == 0.0
        theirs, ours = run(pipe.transformer), run(model)
        assert (theirs - ours).abs().max().item() <= 1e-5
        assert (theirs - base).abs().max().item() > 1e-2  # the adapter does something
    finally:
        pipe.unload_lora_weights()
    assert count_lora_keys(pipe) == 0


def test_a_generation_with_the_lora_differs_from_the_base_and_equals_the_fused_one(adapted, sd35_folder):
    from diffusers import StableDiffusion3Pipeline

    out = adapted[3]
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_folder, dtype=torch.float32)  # fusing changes weights
    pipe.set_progress_bar_config(disable=True)

    def generate():
        noise = torch.randn(len(PROMPTS), 16, 8, 8, generator=torch.Generator().manual_seed(0))
        return pipe(PROMPTS, latents=noise, num_inference_steps=2, guidance_scale=4.5, height=64, width=64,
                    max_sequence_length=256, output_type="latent").images

    base = generate()
    pipe.load_lora_weights(out)
    try:
        lora = generate()
        pipe.fuse_lora()
        fused = generate()
        pipe.unfuse_lora()
    finally:
        pipe.unload_lora_weights()
    assert (lora - base).abs().max().item() > 1e-2
    assert (lora - fused).abs().max().item() <= 1e-5
    # unfuse subtracts B @ A again: the base comes back to rounding (measured 2.6e-6), not bit for bit
    assert count_lora_keys(pipe) == 0 and (generate() - base).abs().max().item() <= 1e-5


def test_read_lora_round_trips_the_state_and_config(adapted):
    _, state, config, out = adapted
    for path in (out, out / WEIGHT_NAME):
        got, meta = read_lora(path)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
        assert (meta["r"], meta["lora_alpha"], meta["init_lora_weights"]) == (RANK, ALPHA, "gaussian")
        assert sorted(meta["target_modules"]) == sorted(config.target_modules)
        assert peft.LoraConfig(**meta).lora_alpha == ALPHA  # what diffusers builds from it


def test_a_pickled_adapter_is_refused_saying_why_and_how_to_convert(adapted, tmp_path):
    state = adapted[1]
    for name in ("pytorch_lora_weights.bin", "adapter.pt", "disguised.safetensors"):
        torch.save({f"transformer.{k}": v for k, v in state.items()}, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name} is a pickled adapter: t2i reads LoRA adapters only as "
                                                  r"safetensors, because loading a pickle can run code.*"
                                                  r"weights_only=True.*write_diffusers_lora"):
            read_lora(tmp_path / name)
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "pytorch_lora_weights.bin").rename(folder / "pytorch_lora_weights.bin")
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.bin is a pickled adapter"):
        read_lora(folder)


def test_safetensors_without_transformer_or_lora_keys_are_refused_naming_what_they_hold(tmp_path):
    t = torch.zeros(4, 4)
    save_file({"text_encoder.a.lora_A.weight": t, "unet.down.lora_A.weight": t.clone()},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds no transformer LoRA: 2 tensor\(s\), none under 'transformer.' "
                                              r"\(text_encoder.\* \(1\), unet.\* \(1\)\)"):
        read_lora(tmp_path / "te.safetensors")
    save_file({"transformer.pos_embed.proj.weight": t}, str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 transformer tensor\(s\) but no LoRA \(lora_A / lora_B\) keys, "
                                              r"e.g. 'transformer.pos_embed.proj.weight'"):
        read_lora(tmp_path / "full.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no pytorch_lora_weights.safetensors \(it holds: nothing\)"):
        read_lora(tmp_path / "empty")


def test_without_metadata_diffusers_takes_alpha_as_rank_and_read_lora_warns(adapted, sd35_folder, tmp_path):
    """The silent rescale this module's metadata prevents: diffusers' writer without adapter metadata."""
    from diffusers import StableDiffusion3Pipeline

    state = adapted[1]
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=state)
    model = base_transformer(sd35_folder)
    # a folder needs use_safetensors=True here: without it load_lora_adapter looks for pytorch_lora_weights.bin
    model.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    assert model.peft_config["default_0"].lora_alpha == RANK != ALPHA
    with pytest.warns(UserWarning, match="no adapter metadata: lora_alpha is taken as r = 4, as diffusers does"):
        _, meta = read_lora(tmp_path)
    assert (meta["r"], meta["lora_alpha"]) == (RANK, RANK)


def test_zero_loaded_keys_show_in_the_count_and_check(adapted, sd35_folder):
    """diffusers#9950: keys under another prefix load nothing, silently; count_lora_keys says 0."""
    state = adapted[1]
    model = base_transformer(sd35_folder)
    model.load_lora_adapter({f"unet.{k}": v for k, v in state.items()}, prefix="transformer")
    assert count_lora_keys(model) == 0
    with pytest.raises(CheckpointError, match=r"holds 0 adapters"):
        check_loaded(model, state)


def test_the_writer_refuses_what_diffusers_would_load_partly_or_rescaled(adapted, tmp_path):
    _, state, config, _ = adapted
    short = dict(config.to_dict(), target_modules=sorted(config.target_modules)[1:])
    with pytest.raises(CheckpointError, match=r"1 of the adapter's \d+ modules are not in lora_config's "
                                              r"target_modules .*diffusers would not load their tensors"):
        write_diffusers_lora(state, short, tmp_path / "a")
    no_alpha = {k: v for k, v in config.to_dict().items() if k != "lora_alpha"}
    with pytest.raises(CheckpointError, match=r"lora_config has no lora_alpha"):
        write_diffusers_lora(state, no_alpha, tmp_path / "b")
    named = {k.replace(".lora_A.", ".lora_A.default."): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"carries an adapter name"):
        write_diffusers_lora(named, config, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"lora_config.loftq_config: a object cannot be stored"):
        lora_export.json_safe({"loftq_config": object()})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
