"""t2i bench's parts: the MMDiT FLOP formula against torch's FLOP counter, phase timing, and one
real (short) bench run that writes a table and ratios. Speed itself is never asserted here."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import REPO, run_t2i
from t2i.models.flops import mmdit_forward_flops, peak_flops, train_flops_per_sample
from t2i.models.mmdit import PRESETS
from t2i.train.timing import Phases


@pytest.mark.parametrize("dual", [(), (0, 1)])
@pytest.mark.parametrize("text_tokens", [7, 20])
def test_the_flop_formula_equals_torchs_count_of_a_real_forward(dual, text_tokens):
    """Independent reference: torch.utils.flop_counter over the real diffusers forward, attention in
    SDPA's math backend so that its two batched matmuls are counted too."""
    kw = dict(patch_size=2, num_layers=3, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
              qk_norm="rms_norm", dual_attention_layers=dual, sample_size=16, in_channels=4, out_channels=4,
              joint_attention_dim=48, pooled_projection_dim=32, pos_embed_max_size=8)
    model = SD3Transformer2DModel(**kw)
    batch = 2
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=torch.randn(batch, 4, 16, 16), timestep=torch.rand(batch) * 1000,
              encoder_hidden_states=torch.randn(batch, text_tokens, 48), pooled_projections=torch.randn(batch, 32))
    assert mmdit_forward_flops(model.config, 16, text_tokens) == counter.get_total_flops() / batch
    assert train_flops_per_sample(model.config, 16, text_tokens) == 3 * counter.get_total_flops() / batch


def test_sd35_medium_at_512_costs_what_its_parameter_count_says():
    """Cross-check at full size without building it: ≈ 6 · (per-token parameters) · tokens for training
    (the usual transformer rule; each token passes its own stream's 12·D² block weights; adaLN weights
    act once per sample) plus attention and the 13 dual-attention layers, within 2 %."""
    cfg = dict(PRESETS["sd3.5-medium"], in_channels=16, out_channels=16, joint_attention_dim=4096,
               pooled_projection_dim=2048)
    n_img, n_txt, d = (64 // 2) ** 2, 333, 24 * 64
    rough = 6 * 24 * 12 * d * d * (n_img + n_txt) + 3 * 24 * 4 * (n_img + n_txt) ** 2 * d
    rough += 3 * 13 * (8 * n_img * d * d + 4 * n_img ** 2 * d)
    assert train_flops_per_sample(cfg, 64, n_txt) == pytest.approx(rough, rel=0.02)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None
    assert peak_flops("Some Future GPU", override_tflops=100) == 100e12


def test_phases_accumulate_per_name_and_reset_on_collect():
    comm = iter([0.0, 0.25, 0.75])
    phases = Phases(True, torch.device("cpu"), comm=lambda: next(comm))
    for _ in range(2):
        with phases("a"):
            time.sleep(0.01)
    with phases("b"):
        pass
    first = phases.collect()["time"]
    assert set(first) == {"a", "b", "comm"} and 0.02 <= first["a"] < 0.5 and first["comm"] == 0.25
    assert phases.collect()["time"] == {"comm": 0.5}
    assert Phases(False, torch.device("cpu")).collect() == {}


COMM_SCRIPT = """
import time, torch, deepspeed, deepspeed.comm as dc
from t2i.train import engine
from t2i.train.timing import comm_seconds
engine.init_distributed()
dc.configure(enabled=True, prof_all=True, verbose=False, debug=False)
x = torch.ones(2_000_000)
t0 = time.perf_counter()
for _ in range(30):
    dc.all_reduce(x)
wall = time.perf_counter() - t0
print(comm_seconds(), wall)
"""


def test_comm_time_is_the_time_spent_in_collectives_not_the_sum_of_running_totals():
    """DeepSpeed's comms logger stores running totals; summing them would exceed the wall time."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", COMM_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300, check=True).stdout.split()
    comm, wall = float(out[-2]), float(out[-1])
    assert 0 < comm <= wall


@pytest.mark.slow
def test_a_bench_run_writes_the_table_and_the_ratios(tmp_path):
    """`t2i bench` on the tiny config, one process: the full t2i step (its real training loop), the
    DeepSpeed model step and the bare loop, all in one process group; with --ckpt-bytes and a LoRA variant
    (checked by check_lora_pair: in this run to save a process start)."""
    from conftest import sample_members, write_tar
    members = []
    for i in range(24):
        members += sample_members(f"k{i:03d}", (10 * i, 100, 200), f"caption {i}")
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    out = tmp_path / "bench"
    overrides = ["data.resolution=16", "train.micro_batch_size=4", "data.shuffle_buffer=8"]
    run_t2i("bench", "--nproc", 1, "--in-process", "--ckpt-bytes", "--variants", "t2i,zero2,bare,zero2+lora.rank=16",
            "--steps", 3, "--warmup", 1, "--out", out, f"data.shards={shard}", *overrides, timeout=600)
    report = json.loads((out / "bench.json").read_text())
    check_lora_pair(report, out, overrides)
    by = {r["spec"]: r for r in report["results"] if not r["lora_rank"]}
    assert set(by) == {"t2i", "zero2", "bare"}
    for r in by.values():
        assert r["images_per_s"] > 0 and r["micro_batch"] == 4 and r["steps"] == 3
        assert r["phases_ms"]["forward"] > 0 and r["phases_ms"]["backward"] > 0
        assert r["train_flops_per_image"] > 0 and r["peak_mem_gb_per_rank"][0] > 0
    assert by["t2i"]["phases_ms"]["data"] > 0 and by["t2i"]["phases_ms"]["encode"] > 0
    assert by["t2i"]["phases_ms"]["ema"] > 0
    assert by["t2i"]["images_per_s"] == pytest.approx(4 / (by["t2i"]["step_ms"] / 1e3))
    labels = [q["ratio"] for q in report["ratios"]]
    assert any(label.startswith("t2i / bare") for label in labels)
    assert any(label.startswith("zero2 / bare") for label in labels)
    assert "| t2i |" in (out / "bench.md").read_text()
    for v in ("t2i", "zero2"):  # DeepSpeed's step by part (fp32 on the CPU: no overflow check runs)
        parts = by[v]["optimizer_ms"]
        assert parts["update"] > 0 and parts["grad_norm"] > 0 and parts["allgather"] > 0 and parts["overflow"] == 0
        assert sum(parts.values()) == pytest.approx(by[v]["phases_ms"]["step"], rel=1e-6)
        assert by[v]["optimizer"] == "adamw (fused)"
    assert by["bare"]["optimizer_ms"] == {} and by["bare"]["optimizer"] == "adamw (fused)"
    assert all(r["attention"]["kernel"] == "flash" and "math" in r["attention"]["usable"] for r in by.values())
    assert all(r["cpu_ms_median"] > 0 for r in by.values())
    assert by["t2i"]["ckpt_bytes"]["other"] >= 4 * by["t2i"]["trained_params"]  # the Checkpointer's tag: + fp32 EMA
    assert by["bare"].get("ckpt_bytes") is None  # not DeepSpeed: no tag


def check_lora_pair(report, out, overrides):
    """zero2 against zero2+lora.rank=16 (tools/bench_lora.py): the LoRA optimizer's parameters are the adapters
    (lora.adapter_size of the same model, built here independently), the full one's every parameter, and the
    LoRA tag (--ckpt-bytes) is a small fraction of the full one (the frozen base left out)."""
    from t2i.config import load_config
    from t2i.models import lora
    from t2i.models.mmdit import build_model
    from tools.bench import model_shapes

    by = {r["spec"]: r for r in report["results"]}
    full, lo = by["zero2"], by["zero2+lora.rank=16"]
    cfg = load_config(None, overrides)
    shapes, _ = model_shapes(cfg)
    model = build_model(cfg.model, seed=cfg.run.seed, **shapes)
    total = sum(p.numel() for p in model.parameters())
    size = lora.adapter_size(model, 16)
    assert 0 < size.parameters < total / 10
    assert lo["lora_rank"] == 16 and lo["lora_modules"] == size.modules
    assert lo["optimizer_params"] == lo["trained_params"] == size.parameters and lo["base_params"] == total
    assert full["lora_rank"] == 0 and full["optimizer_params"] == full["trained_params"] == total

    a, b = lo["ckpt_bytes"], full["ckpt_bytes"]
    assert b["model"] >= 4 * total and b["optimizer"] >= 12 * total  # fp32 weights; fp32 master + Adam's two moments
    assert 0 < a["model"] < b["model"] / 10 and 0 < a["optimizer"] < b["optimizer"] / 10
    assert a["total"] < b["total"] / 10
    assert not (out / "ckpt").exists()  # measured, then deleted
    labels = {q["ratio"].split(" (")[0]: q for q in report["ratios"]}
    assert labels["zero2+lora.rank=16 / zero2"]["means"].startswith("LoRA (rank 16) over full fine-tuning")
    md = (out / "bench.md").read_text()
    assert "| LoRA / full |" in md
    assert f"| zero2+lora.rank=16 | LoRA r16 ({size.modules} layers) | {size.parameters:,} |" in md


def test_variant_overrides_and_round_ratios():
    from tools.bench import base_variant, round_ratio, summarize, variant_overrides

    assert base_variant("t2i+optimizer.implementation=foreach+deepspeed.overlap_comm=false") == "t2i"
    assert variant_overrides("t2i+optimizer.implementation=foreach+deepspeed.overlap_comm=false") == [
        "optimizer.implementation=foreach", "deepspeed.overlap_comm=false"]
    assert variant_overrides("bare") == []

    def rec(spec, repeat, ms, cpu):
        return {"variant": base_variant(spec), "spec": spec, "repeat": repeat, "ckpt": False, "compile": False,
                "step_ms": ms, "step_ms_median": ms, "cpu_ms_median": cpu, "zero_stage": 2, "world": 2,
                "micro_batch": 4, "images_per_s": 1e3 / ms, "images_per_s_per_rank": 5e2 / ms, "phases_ms": {},
                "optimizer_ms": {}, "achieved_tflops_per_rank": 0.0, "peak_mem_gb_per_rank": [1.0], "device": "cpu",
                "preset": "tiny", "resolution": 32}
    # round 0 under load (everything 2x slower), round 1 quiet: the paired ratios stay 1.2
    results = [rec("t2i", 0, 240, 110), rec("bare", 0, 200, 100), rec("t2i+x=1", 0, 220, 105),
               rec("t2i", 1, 120, 110), rec("bare", 1, 100, 100), rec("t2i+x=1", 1, 110, 105),
               rec("t2i", 2, 130, 110), rec("bare", 2, 100, 100), rec("t2i+x=1", 2, 105, 105)]
    key = lambda s: (s, False, False)  # noqa: E731
    assert round_ratio(results, key("t2i"), key("bare")) == pytest.approx((1.2, 1.2, 1.3, 3))
    assert round_ratio(results, key("t2i"), key("bare"), "cpu_ms_median")[0] == pytest.approx(1.1)

    class Args:
        warmup, steps, nproc, repeats, config, overrides, synthetic = 1, 3, 2, 3, None, [], False
    report = summarize(results, Args)
    ratios = {q["ratio"].split(" (")[0]: q for q in report["ratios"]}
    assert ratios["t2i / bare"]["value"] == pytest.approx(1.2) and ratios["t2i / bare"]["cpu"] == pytest.approx(1.1)
    assert ratios["t2i+x=1 / t2i"]["value"] == pytest.approx(220 / 240)
    assert ratios["t2i+x=1 / bare"]["rounds"] == 3
    rows = {r["spec"]: r for r in report["rows"]}
    assert rows["t2i"]["step_ms"] == 130 and rows["t2i"]["step_ms_rounds"] == [240, 120, 130]  # the median round
    assert "| t2i+x=1 / t2i (checkpointing off, compile off) | 0.917 | 0.808-0.917 (3 rounds) | 0.955 |" \
        in report["markdown"]


def test_the_optimizer_step_breakdown_adds_up_to_the_step():
    from t2i.train.step_profile import breakdown

    times = {"step": 0.100, "opt.overflow": 0.010, "opt.grad_norm": 0.020, "opt.grads_to_fp32": 0.015,
             "opt.update": 0.030, "opt.update_and_copy_back": 0.035, "opt.allgather": 0.012}
    parts = breakdown(times)
    assert parts == pytest.approx({"overflow": 0.010, "grad_norm": 0.020, "grads_to_fp32": 0.015, "update": 0.030,
                                   "copy_back": 0.005, "allgather": 0.012, "other": 0.008})
    assert breakdown({"step": 0.1, "forward": 1.0}) == {}
    zero3 = breakdown({"step": 0.1, "opt.update": 0.05, "opt.copy_back": 0.02})  # ZeRO-3 times the copy itself
    assert zero3["copy_back"] == pytest.approx(0.02) and zero3["other"] == pytest.approx(0.03)


def test_the_lora_table_pairs_each_lora_variant_with_its_full_form_round_by_round():
    from tools.bench import summarize
    from tools.bench_lora import full_spec

    assert full_spec("zero2+lora.rank=16") == "zero2"
    assert full_spec("t2i+lora.rank=8+deepspeed.overlap_comm=false+lora.alpha=16") == "t2i+deepspeed.overlap_comm=false"

    def rec(spec, repeat, ms, step_ms, lora_rank, ckpt=None):
        return {"variant": spec.split("+")[0], "spec": spec, "repeat": repeat, "ckpt": False, "compile": False,
                "step_ms": ms, "step_ms_median": ms, "cpu_ms_median": ms / 2, "zero_stage": 2, "world": 2,
                "micro_batch": 4, "images_per_s": 1e3 / ms, "images_per_s_per_rank": 5e2 / ms,
                "phases_ms": {"step": step_ms}, "optimizer_ms": {}, "achieved_tflops_per_rank": 0.0,
                "peak_mem_gb_per_rank": [1.0], "device": "cpu", "preset": "tiny", "resolution": 32,
                "lora_rank": lora_rank, "lora_modules": 31 if lora_rank else 0, "base_params": 1000,
                "trained_params": 50 if lora_rank else 1000, "ckpt_bytes": ckpt}

    def tag(total):
        return {"model": total / 4, "optimizer": 3 * total / 4, "other": 0, "files": 6, "total": total}
    # round 0 loaded (both 2x slower), tags measured in round 0 only: the ratios pair rounds
    results = [rec("zero2", 0, 200, 40, 0, tag(16e6)), rec("zero2+lora.rank=16", 0, 180, 10, 16, tag(1e6)),
               rec("zero2+lora.rank=16", 1, 80, 4, 16), rec("zero2", 1, 100, 20, 0),
               rec("zero2", 2, 100, 20, 0), rec("zero2+lora.rank=16", 2, 100, 5, 16)]

    class Args:
        warmup, steps, nproc, repeats, config, overrides, synthetic = 1, 3, 2, 3, None, [], False
    report = summarize(results, Args)
    ratios = {q["ratio"].split(" (")[0]: q for q in report["ratios"]}
    q = ratios["zero2+lora.rank=16 / zero2"]
    assert q["value"] == pytest.approx(0.9) and (q["min"], q["max"]) == pytest.approx((0.8, 1.0))
    assert q["means"].startswith("LoRA (rank 16) over full fine-tuning")
    md = report["markdown"]
    assert "| zero2+lora.rank=16 | LoRA r16 (31 layers) | 50 | 5.00 % | 5.00 | 1.00 (0.25 + 0.75 + 0.00) |" in md
    assert "| zero2 | all | 1,000 | 100.00 % | 20.00 | 16.00 (4.00 + 12.00 + 0.00) |" in md
    assert ("| zero2+lora.rank=16 / zero2 | 0.900 | 0.800-1.000 (3 rounds) | 0.900 | 0.250 | 0.0625 (16x smaller) "
            "| 0.0500 |") in md
    # without a LoRA variant, no LoRA table
    assert "LoRA / full" not in summarize([r for r in results if not r["lora_rank"]], Args)["markdown"]
