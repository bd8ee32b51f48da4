"""Checkpoint integrity (kill -9 inside a save), retention, the `t2i ckpt` tools (consolidate, export)
and resuming at another world size, on real 2-rank DeepSpeed runs (gloo)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_probe import fixed_inputs
from helpers import REPO, losses, run_t2i, tiny_train_args

from t2i.checkpoint import store
from t2i.train import faults
from t2i.io import write_text
from t2i.config import from_dict, load_config, to_dict
from t2i.errors import ConfigError
from t2i.models.mmdit import velocity
from t2i import cli

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
           PYTHONPATH=str(REPO))


def train(shards, runs, name, *flags, **overrides):
    return run_t2i("train", *flags, *tiny_train_args(shards, runs, name, **overrides))


def probe(run_dir: Path, nproc: int, out: Path) -> dict:
    """What a run holds right after `restore()` at `nproc` ranks (tests/ckpt_probe.py)."""
    script = str(REPO / "tests" / "ckpt_probe.py")
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, script, str(run_dir), str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def zero_optimizer_state(tag_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """Full per-parameter tensors of one optimizer state ("exp_avg", "exp_avg_sq", or the fp32 master
    weights "fp32") read straight from the ZeRO shards written at save time; independent of DeepSpeed's
    universal conversion. ZeRO-1/2: the rank partitions of a group concatenate into the flat group;
    ZeRO-3: each parameter is split into world-size equal (zero-padded) parts, one per rank."""
    model_file = min(tag_dir.glob("*model_states.pt"))
    shapes = torch.load(model_file, weights_only=False)["param_shapes"]
    optim_files = sorted(tag_dir.glob("*optim_states.pt"), key=lambda f: int(re.search(r"rank_(\d+)_", f.name)[1]))
    sds = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage, world = int(sds[0]["zero_stage"]), len(sds)
    inner, fp32 = ("base_optimizer_state", "single_partition_of_fp32_groups") if stage <= 2 else \
        ("optimizer_state_dict", "fp32_flat_groups")
    out = {}
    for g, group in enumerate(shapes):
        parts = [sd[fp32][g] if key == "fp32" else sd[inner]["state"][g][key] for sd in sds]
        offset = 0
        if stage <= 2:
            assert not any(any(p) for p in sds[0].get("param_alignment_paddings", [[]])), "padded layout"
            flat = torch.cat(parts)
            for name, shape in group.items():
                out[name] = flat[offset:offset + shape.numel()].view(shape)
                offset += shape.numel()
        else:
            for name, shape in group.items():
                k = math.ceil(shape.numel() / world)
                out[name] = torch.cat([p[offset:offset + k] for p in parts])[:shape.numel()].view(shape)
                offset += k
    return out


def assert_holds_exactly(state: dict, root: Path, tag: str) -> None:
    """A probe's state (right after restore) equals what `tag` saved: weights, Adam moments and step, EMA."""
    meta = store.read_meta(root, tag)
    raw, ema = store.load_weights(root, tag, ema=False), store.load_weights(root, tag, ema=True)
    master = zero_optimizer_state(root / tag, "fp32")
    assert set(state["weights"]) == set(master) == set(ema) and len(master) == 138
    for name, w in state["weights"].items():
        assert torch.equal(master[name], raw[name])  # the independent reader agrees with zero_to_fp32
        assert torch.equal(w, raw[name]), name
        assert torch.equal(state["ema"][name], ema[name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        saved = zero_optimizer_state(root / tag, key)
        for name, t in state[key].items():
            assert torch.equal(t.reshape(saved[name].shape), saved[name]), (key, name)
        assert sum(t.abs().sum() for t in saved.values()) > 0
    assert state["adam_step"] == [float(meta["step"])]
    assert state["step"] == meta["step"] and state["ema_updates"] == meta["step"]  # no skipped steps
    assert any(not torch.equal(ema[n], raw[n]) for n in ema)  # the EMA is not the raw weights


# ----------------------------------------------------------------------------------------------
# Fast
# ----------------------------------------------------------------------------------------------


def test_keep_last_must_not_be_negative():
    assert load_config().train.keep_last == 3
    with pytest.raises(ConfigError, match=r"train.keep_last must be >= 0"):
        from_dict({"train": {"keep_last": -1}})


def test_pipeline_export_of_the_tiny_config_is_refused_with_the_reason(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    (root / "step00000001").mkdir(parents=True)
    meta = {"step": 1, "world_size": 2, "zero_stage": 2, "config": to_dict(load_config())}
    (root / "step00000001" / "meta.json").write_text(json.dumps(meta))
    write_text(root / "latest", "step00000001", fsync=True)
    assert cli.main(["ckpt", "export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--pipeline"]) == 2
    err = capsys.readouterr().err
    assert "--pipeline needs" in err and "text.preset=tiny, vae.kind=identity" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["ckpt", "consolidate", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Slow: real 2-rank runs
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_inside_a_save_keeps_latest_at_the_previous_tag_and_resume_reports_the_half_written_one(
        make_shards, tmp_path, capsys):
    shards = make_shards(n_shards=4, per_shard=12)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "kill"
    root = run / "checkpoints"
    args = ["train", "--nproc", "2", *tiny_train_args(shards, runs, "kill", **{
        "train.steps": 8, "train.ckpt_every": 2, "train.keep_last": 2})]
    # Rank 0 pauses inside the save of step 4, after its DeepSpeed and client files, before meta.json.
    env = dict(ENV, **{faults.PAUSE_ENV: "4:0"})
    marker = root / "step00000004" / ".paused-rank0"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 400
            while not marker.is_file() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert marker.is_file(), (tmp_path / "first.log").read_text()[-4000:]
            os.kill(int(marker.read_text()), signal.SIGKILL)
            assert proc.wait(timeout=240) != 0
        finally:
            if proc.poll() is None:  # only our own launcher's session
                os.killpg(proc.pid, signal.SIGKILL)

    assert (root / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # killed mid-save
    assert store.latest_tag(root) == "step00000002"
    assert store.incomplete_tags(root) == ["step00000004"]
    assert cli.main(["ckpt", "list", str(run)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("step00000002  step 2  2 rank(s)  ZeRO-2  complete latest")
    assert listing[1].startswith("step00000004  INCOMPLETE")
    from t2i.checkpoint import loading
    loaded = loading.load(run, ema=False)  # `latest` = the previous complete tag, and it loads
    assert loaded.source.endswith("step00000002 (raw)")
    weights = store.load_weights(root, "step00000002", ema=False)
    assert all(torch.equal(p.detach(), weights[n]) for n, p in loaded.model.named_parameters())

    resumed = run_t2i(*args, "--resume")  # no pause hook now
    warning = (f"incomplete checkpoint folder(s) in {root} (a save that did not finish; no meta.json): step00000004; "
               "ignoring them and resuming from latest = step00000002")
    assert warning in resumed.stderr and warning in (run / "train.log").read_text()
    assert f"resumed from {root / 'step00000002'} at step 2" in resumed.stderr
    # The step-4 save was redone from scratch; keep_last=2 then kept the newest two of 2, 4, 6, 8.
    assert store.latest_tag(root) == "step00000008" and store.incomplete_tags(root) == []
    assert store.complete_tags(root) == ["step00000006", "step00000008"]
    train_log = (run / "train.log").read_text()
    assert "train.keep_last=2: deleted step00000002" in train_log
    assert "train.keep_last=2: deleted step00000004" in train_log
    assert all(math.isfinite(x) for x in losses(run))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_at_another_world_size_keeps_model_optimizer_and_ema(make_shards, tmp_path, zero_stage):
    shards = make_shards(n_shards=4, per_shard=12)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "reshard"
    root = run / "checkpoints"
    opts = {"deepspeed.zero_stage": zero_stage, "train.steps": 6}
    train(shards, runs, "reshard", "--nproc", 2, "--stop-at", 2, **opts)

    # 2 -> 1: what the 1-rank run holds after restore() is exactly what 2 ranks saved at step 2.
    held = probe(run, 1, tmp_path / "held1.pt")
    assert held["world_size"] == 1
    assert_holds_exactly(held, root, "step00000002")
    saved_data = [c["data"] for c in store.read_client_states(root, "step00000002")]
    epoch = max(w["epoch"] for d in saved_data for w in d["workers"].values())
    assert [(w["epoch"], w["index"]) for w in held["data"][0]["workers"].values()] == [(epoch, 0)]
    assert held["data"][0]["workers"][0]["counts"]["good"] == sum(
        w["counts"]["good"] for d in saved_data for w in d["workers"].values()) == 2 * 2 * 4
    assert (root / "step00000002" / store.UNIVERSAL / "zero").is_dir()

    one = train(shards, runs, "reshard", "--nproc", 1, "--resume", "--stop-at", 4, **opts)
    assert f"was written by 2 rank(s) under ZeRO-{zero_stage}; this run has 1 rank(s) under ZeRO-{zero_stage}" \
        in one.stderr and "universal checkpoint" in one.stderr
    assert "(written by 2 rank(s); resharded)" in (run / "train.log").read_text()
    assert store.read_meta(root, "step00000004")["world_size"] == 1

    # 1 -> 2
    held = probe(run, 2, tmp_path / "held2.pt")
    assert held["world_size"] == 2 and [d["workers"][0]["index"] for d in held["data"]] == [0, 0]
    assert_holds_exactly(held, root, "step00000004")

    train(shards, runs, "reshard", "--nproc", 2, "--resume", **opts)
    assert store.latest_tag(root) == "step00000006"
    assert store.read_meta(root, "step00000006")["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) and 0 < x < 10 for x in losses(run))


@pytest.mark.slow
def test_zero3_ema_shards_equal_an_ema_of_the_gathered_weights_and_consolidate_exports_it(make_shards, tmp_path):
    from safetensors.torch import load_file


    from t2i.models import build

    shards = make_shards(n_shards=4, per_shard=12)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "ema3"
    root = run / "checkpoints"
    n_steps, decay = 4, 0.9
    train(shards, runs, "ema3", "--nproc", 2, **{"deepspeed.zero_stage": 3, "train.steps": n_steps,
                                                  "train.ckpt_every": 1, "train.keep_last": 0,
                                                  "train.ema_decay": decay})
    assert store.complete_tags(root) == [store.tag_for(s) for s in range(1, n_steps + 1)]

    # Reference: the EMA formula applied to the full (gathered) weights after every step.
    cfg = from_dict(store.read_meta(root, "step00000001")["config"])
    init = dict(build.build_for(cfg, *build.build_frozen(cfg)).named_parameters())
    reference = {n: p.detach().clone() for n, p in init.items()}
    for n_update in range(n_steps):
        full = store.load_weights(root, store.tag_for(n_update + 1), ema=False)
        d = min(decay, (1 + n_update) / (10 + n_update))
        reference = {name: d * r + (1 - d) * full[name] for name, r in reference.items()}

    states = store.read_client_states(root, "step00000004")
    assert len(states) == 2 and all(s["ema"]["zero3"] and s["ema"]["updates"] == n_steps for s in states)
    shard = states[0]["ema"]["shadow"]["proj_out.weight"]
    assert shard.dim() == 1 and shard.numel() == math.ceil(init["proj_out.weight"].numel() / 2)  # a real shard
    ema = store.load_weights(root, "step00000004", ema=True)
    worst = max((ema[n] - reference[n]).abs().max().item() for n in reference)
    assert worst <= 1e-6, worst
    assert max((ema[n] - full[n]).abs().max().item() for n in reference) > 100 * 1e-6  # not the raw weights

    out = tmp_path / "consolidated"
    assert cli.main(["ckpt", "consolidate", str(run), "--out", str(out), "--weights", "both"]) == 0
    exported_ema, exported_raw = load_file(str(out / "ema.safetensors")), load_file(str(out / "raw.safetensors"))
    assert set(exported_ema) == set(reference) and all(torch.equal(exported_ema[n], ema[n]) for n in ema)
    assert max((exported_ema[n] - reference[n]).abs().max().item() for n in reference) <= 1e-6
    assert all(torch.equal(exported_raw[n], full[n]) for n in full)
    info = json.loads((out / "consolidated.json").read_text())
    assert (info["tag"], info["step"], info["world_size"], info["zero_stage"]) == ("step00000004", 4, 2, 3)
    assert info["ema"] == {"decay": decay, "updates": 4} and info["config"]["run"]["name"] == "ema3"
    assert info["files"]["ema"]["parameters"] == sum(t.numel() for t in reference.values())


def tiny_sd3_folder(root: Path) -> Path:
    """A tiny StableDiffusion3Pipeline folder built offline (random CLIP-L/bigG/T5 and VAE; its
    transformer is a placeholder: t2i trains its own preset)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    from t2i.models.text_encoders import CLIP_G_PAD, CLIP_L_PAD, clip_tokenizer

    def clip(hidden, proj, act, eos):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
            bos_token_id=49406, eos_token_id=eos, pad_token_id=1)).eval()

    torch.manual_seed(0)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    tok3 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
                       + [(c, -8.0) for c in chars], extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                          caption_projection_dim=16, pooled_projection_dim=36, out_channels=4),
        vae=AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                          layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                          scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE constants
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(16, 16, "quick_gelu", 2), tokenizer=clip_tokenizer(CLIP_L_PAD),
        text_encoder_2=clip(24, 20, "gelu", 49407), tokenizer_2=clip_tokenizer(CLIP_G_PAD),
        text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(root)
    return root


@pytest.mark.slow
def test_exported_transformer_predicts_like_the_deepspeed_model_and_runs_in_a_sd3_pipeline(make_shards, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from t2i.checkpoint import loading


    sd3 = tiny_sd3_folder(tmp_path / "sd3")
    shards = make_shards(n_shards=4, per_shard=12)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "export"
    train(shards, runs, "export", "--nproc", 2, **{
        "deepspeed.zero_stage": 3, "train.steps": 3, "text.preset": "sd3", "text.sd3_folder": sd3,
        "text.clip_context": 77, "text.max_t5_tokens": 16, "vae.kind": "pretrained", "vae.path": sd3})

    # The 2-rank ZeRO-3 engine holding the final checkpoint, on a fixed input.
    live = probe(run, 2, tmp_path / "live.pt")["prediction"]
    raw_dir, ema_dir = tmp_path / "export-raw", tmp_path / "export-ema"
    assert cli.main(["ckpt", "export", str(run), "--out", str(raw_dir), "--weights", "raw", "--pipeline"]) == 0
    assert cli.main(["ckpt", "export", str(run), "--out", str(ema_dir)]) == 0

    exported = SD3Transformer2DModel.from_pretrained(raw_dir / "transformer").eval()
    c = exported.config
    assert (c.in_channels, c.sample_size, c.joint_attention_dim, c.pooled_projection_dim) == (4, 8, 48, 36)
    x, t, cond = fixed_inputs(c.in_channels, c.sample_size, c.joint_attention_dim, c.pooled_projection_dim)
    rebuilt = loading.load(run, ema=False).model  # the checkpoint's raw weights in a model built by t2i
    with torch.no_grad():
        ours, theirs = velocity(exported, x, t, cond), velocity(rebuilt, x, t, cond)
    assert ours.abs().mean() > 1e-3
    assert (ours - live).abs().max().item() <= 1e-6
    assert (ours - theirs).abs().max().item() <= 1e-6

    ema = store.load_weights(run / "checkpoints", "step00000003", ema=True)
    ema_model = SD3Transformer2DModel.from_pretrained(ema_dir / "transformer")
    assert all(torch.equal(p, ema[n]) for n, p in ema_model.named_parameters())
    info = json.loads((ema_dir / "t2i_export.json").read_text())
    assert (info["tag"], info["step"], info["weights"]) == ("step00000003", 3, "ema")
    assert not (ema_dir / "model_index.json").exists() and (ema_dir / "config.yaml").is_file()

    pipe = StableDiffusion3Pipeline.from_pretrained(raw_dir)
    assert all(torch.equal(p, q) for p, q in zip(pipe.transformer.parameters(), exported.parameters()))
    image = pipe("a red square", num_inference_steps=1, height=16, width=16, guidance_scale=2.0,
                 max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and float(image.std()) > 0
