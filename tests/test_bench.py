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
    DeepSpeed model step and the bare loop, all in one process group."""
    from conftest import sample_members, write_tar
    members = []
    for i in range(24):
        members += sample_members(f"k{i:03d}", (10 * i, 100, 200), f"caption {i}")
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    out = tmp_path / "bench"
    run_t2i("bench", "--nproc", 1, "--in-process", "--variants", "t2i,zero2,bare", "--steps", 3, "--warmup", 1,
            "--out", out, f"data.shards={shard}", "data.resolution=16", "train.micro_batch_size=4",
            "data.shuffle_buffer=8", timeout=600)
    report = json.loads((out / "bench.json").read_text())
    by = {r["variant"]: r for r in report["results"]}
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
