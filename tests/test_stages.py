"""Stages are configs: MixFlow is one key, invalid combinations name their keys, and a mixflow run
really feeds the model x at σ_in while conditioning it on σ."""

import json

import pytest
import torch

from conftest import sample_members, write_tar
from helpers import losses, run_t2i, tiny_train_args
from t2i.train.step import compute_loss
from t2i import flow
from t2i.config import load_config
from t2i.errors import ConfigError
from t2i.data.loader import TrainLoader
from t2i.models.build import build_for, build_frozen


def test_mixflow_is_one_key_and_the_stage_is_derived():
    assert load_config().stage == "pretrain"
    mix = load_config(overrides=["train.objective=mixflow"])
    assert (mix.stage, mix.timestep_sampler) == ("mixflow", "mixflow")
    control = load_config(overrides=["train.init_from=runs/x"])
    assert (control.stage, control.timestep_sampler) == ("control", "logit_normal")


@pytest.mark.parametrize("overrides,pattern", [
    (["train.objective=mixflow", "train.mixflow_gamma=1.2"], r"train.mixflow_gamma must be in \[0, 1\]"),
    (["train.objective=mixflow", "train.timesteps.kind=logit_normal"],
     r"train.objective=mixflow .* train.timesteps.kind='logit_normal' would be ignored"),
    (["train.objective=eps"], r"train.objective must be one of \['flow_matching', 'mixflow'\]"),
    (["train.stage=control"], r"train.stage='control' contradicts train.objective='flow_matching' and train.init_from"),
    (["train.stage=pretrain", "train.objective=mixflow"], r"train.stage='pretrain' contradicts"),
    (["train.init_weights=best"], r"train.init_weights must be one of \['ema', 'raw'\]"),
])
def test_invalid_stage_combinations_name_the_keys(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides)


@pytest.mark.parametrize("objective", ["mixflow", "flow_matching"])
def test_the_model_sees_x_at_sigma_in_and_is_conditioned_on_sigma(tmp_path, objective):
    shard = write_tar(tmp_path / "s.tar", sum((sample_members(f"k{i}") for i in range(8)), []))
    cfg = load_config(overrides=[f"data.shards={shard}", "data.resolution=16", f"train.objective={objective}",
                                 "train.mixflow_gamma=0.8"])
    text, vae = build_frozen(cfg)
    model = build_for(cfg, text, vae)
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return model(**kwargs)

    batch = next(TrainLoader(cfg.data, seed=0, rank=0, world_size=1, batch_size=8))
    loss, stats = compute_loss(spy, text, vae, batch, torch.Generator().manual_seed(0), cfg,
                               torch.device("cpu"), torch.float32)
    sigma, sigma_in = stats["sigma"], stats["sigma_in"]
    torch.testing.assert_close(seen["hidden_states"], flow.interpolate(stats["x"], stats["noise"], sigma_in))
    torch.testing.assert_close(seen["timestep"], 1000 * sigma)
    if objective == "mixflow":
        assert (sigma_in >= sigma).all() and (sigma_in > sigma + 1e-3).any()
        assert torch.all(sigma_in <= sigma + 0.8 * (1 - sigma) + 1e-6)
    else:
        assert torch.equal(sigma_in, sigma)
    target = stats["noise"] - stats["x"]
    pred = model(**seen)[0]
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


@pytest.mark.slow
def test_post_training_starts_from_the_parent_with_a_fresh_step_counter(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=8)
    out = tmp_path / "runs"
    val = str(tmp_path / "shard-{000000..000001}.tar")
    run_t2i("train", *tiny_train_args(shards, out, "base", **{"train.steps": 4, "validation.shards": val,
                                                                 "validation.num_samples": 8}))
    proc = run_t2i("train", *tiny_train_args(shards, out, "mix", **{
        "train.steps": 3, "train.init_from": out / "base", "train.init_weights": "raw", "train.objective": "mixflow",
        "validation.shards": val, "validation.num_samples": 8, "validation.every": 1}))
    assert "stage mixflow" in proc.stderr
    parent = json.loads((out / "mix" / "parent.json").read_text())
    assert (parent["kind"], parent["tag"], parent["step"], parent["weights"]) == ("checkpoint", "step00000004", 4, "raw")
    records = [json.loads(line) for line in (out / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and len(losses(out / "mix")) == 3
    base_val = [json.loads(line) for line in (out / "base" / "metrics.jsonl").read_text().splitlines()][-1]
    # the child's step-0 validation is the parent's final weights (raw) on the same fixed samples and noise
    assert records[0]["val_loss"] == pytest.approx(base_val["val_loss"], rel=1e-5)


def test_the_stage_configs_differ_in_the_objective_only():
    from t2i.config import DEFAULT_CONFIG, to_dict
    mix = to_dict(load_config(DEFAULT_CONFIG.parent / "stages" / "mixflow.yaml"))
    control = to_dict(load_config(DEFAULT_CONFIG.parent / "stages" / "control.yaml"))
    assert mix["train"].pop("objective") == "mixflow" and control["train"].pop("objective") == "flow_matching"
    assert mix["run"].pop("name") == "mixflow" and control["run"].pop("name") == "control"
    assert mix == control


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sd3.5-medium-lora-mixflow.yaml", "sd3.5-large-lora-control.yaml"])
def test_a_shipped_lora_stage_trains_its_adapters_only_on_the_release_shaped_folder(sd35_folder, make_shards,
                                                                                    tmp_path, config):
    """configs/stages/*-lora-*.yaml with path overrides only (and a CPU-sized batch, as test_sd35.py's stage test):
    two bf16 ZeRO-2 steps through the SD3.5 MMDiT train rank-16 adapters on exactly the default targets of the
    folder's model (attn2 included), from the frozen release, and the tag holds those adapters and nothing else."""
    from t2i.checkpoint import store
    from t2i.models import lora
    from t2i.models.mmdit import load_pretrained

    shards = make_shards(n_shards=2, per_shard=4, sizes=[(16, 16), (24, 16)])
    proc = run_t2i("train", "--config", f"configs/stages/{config}", f"model.pretrained={sd35_folder}",
                   f"train.init_from={sd35_folder}", f"data.shards={shards[0]}::{shards[1]}", "data.resolution=64",
                   "data.buckets={area: 4096, step: 16}", "data.min_size=0", "data.num_workers=0",
                   "data.shuffle_buffer=4", "train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=1",
                   "train.ckpt_every=2", "model.gradient_checkpointing=false", "logging.wandb=disabled",
                   "validation.shards=null", "sample.steps=2", "sample.prompts=[a photo of a cat]",
                   f"run.output_dir={tmp_path}", "run.name=r", timeout=900)
    objective = "mixflow" if "mixflow" in config else "control"
    assert f"stage {objective}" in proc.stderr and "ZeRO-2, bf16" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] == r["loss"] for r in records)
    assert records[-1]["lr"] == pytest.approx(1e-4)

    names = lora.target_names(load_pretrained(str(sd35_folder)))  # the default targets on the folder's model
    assert any(".attn2." in n for n in names) and len(names) == 19  # block 0: 8 + attn2's 4; the last block: 7
    root = tmp_path / "r" / "checkpoints"
    meta = json.loads((root / "step00000002" / "meta.json").read_text())
    assert meta["lora"]["base"] == str(sd35_folder.resolve())
    assert (meta["config"]["lora"]["rank"], meta["config"]["lora"]["alpha"]) == (16, None)
    ema = store.load_weights(root, "step00000002", ema=True)
    assert set(ema) == {f"{n}.lora_{m}.default.weight" for n in names for m in "AB"}
    assert all(ema[f"{n}.lora_A.default.weight"].shape[0] == 16 for n in names)
    assert any(ema[f"{n}.lora_B.default.weight"].abs().sum() > 0 for n in names)  # B (0 at the start) moved
