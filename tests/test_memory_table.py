"""docs/memory.md's tables (tools/memory_table.py) against what a rank really holds and peaks at while it
loads a release-shaped SD3.5 folder, scaled up so the weights (~0.5 GB) dominate the interpreter; the LoRA rows
against their bytes-per-parameter rules and the adapter sizes, and those rules against what DeepSpeed's
engines hold at 2 ranks.

Pass criteria, fixed before measuring:
- the bytes each component holds after loading equal the table's bytes per parameter times the parameter
  counts it reads from the folder's config files (encoders bf16, VAE fp32, transformer fp32), to 0.1 %;
- each phase's peak anonymous RSS above the level before it stays within 15 % (+32 MB for tokenizers and
  the interpreter) of what it holds at the end: every component is read once, never in two copies.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.memory_table import ENCODERS, VAE, folder_params, main, per_rank_gb, table, transformer_params

REPO = Path(__file__).resolve().parent.parent
MB = 2**20


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from sd35_fixture import build_sd35_folder

    root = tmp_path_factory.mktemp("sd35-scaled")
    folder = build_sd35_folder(root / "stable-diffusion-3.5-medium", scale=48)
    out = root / "memory.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), str(folder), str(out)],
                   check=True, capture_output=True, cwd=REPO, timeout=600)
    return folder, json.loads(out.read_text())


@pytest.mark.slow
def test_held_bytes_are_the_tables_bytes_per_parameter(measured):
    folder, m = measured
    counts = folder_params(str(folder))
    text = sum(counts[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert m["frozen"]["text_params"] == text and m["frozen"]["vae_params"] == counts["vae"]
    assert m["transformer"]["params"] == counts["transformer"]
    assert m["frozen"]["text_dtypes"] == ["torch.bfloat16"] and m["frozen"]["vae_dtypes"] == ["torch.float32"]
    assert m["transformer"]["dtypes"] == ["torch.float32"]  # fp32 on the host until DeepSpeed casts it
    table = per_rank_gb(counts["transformer"], ranks=1, stage=2, encoders=text, vae=counts["vae"],
                        buffers=counts["transformer_buffers"])
    predicted_frozen = table["frozen"] * 1e9          # 2 B per encoder parameter + 4 B per VAE parameter
    predicted_host = (table["host_startup"] - 4 * counts["vae"] / 1e9) * 1e9  # 4 B per transformer element
    assert m["frozen"]["held"] == pytest.approx(predicted_frozen, rel=1e-3)
    assert m["transformer"]["held"] == pytest.approx(predicted_host, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["frozen", "transformer"])
def test_each_component_is_read_once(measured, phase):
    _, m = measured
    held, peak = m[phase]["held"], m[phase]["peak_delta"]
    assert held > 150 * MB  # the weights dominate, so a second copy could not hide in the slack
    assert 0.9 * held <= peak <= 1.15 * held + 32 * MB, (phase, peak / MB, held / MB)


# --------------------------------------------------------------------------------------------- LoRA rows

ADAPTERS_R16 = {"sd3.5-medium": 11_943_936, "sd3.5-large": 23_580_672}  # docs/design/lora.md, t2i.models.lora


@pytest.fixture(scope="module")
def release_counts():
    from t2i.models.lora import parameter_count

    return {preset: (*transformer_params(preset), parameter_count(preset, 16).parameters) for preset in ADAPTERS_R16}


@pytest.mark.parametrize("preset", ["sd3.5-medium", "sd3.5-large"])
@pytest.mark.parametrize("ranks", [8, 16])
@pytest.mark.parametrize("stage", [2, 3])
def test_a_lora_row_is_the_frozen_bf16_base_plus_the_adapters_full_training_state(release_counts, preset, ranks,
                                                                                  stage):
    p, buffers, adapters = release_counts[preset]
    assert adapters == ADAPTERS_R16[preset]
    assert (p, buffers) == {"sd3.5-medium": (2_243_171_520, 226_492_416),
                            "sd3.5-large": (8_056_627_520, 89_653_248)}[preset]
    m = {k: v * 1e9 for k, v in per_rank_gb(p, ranks, stage, buffers=buffers, adapters=adapters).items()}
    full = {k: v * 1e9 for k, v in per_rank_gb(p, ranks, stage, buffers=buffers).items()}
    base = 2 * p / (ranks if stage == 3 else 1)  # bf16; ZeRO-3 partitions the frozen base, ZeRO-2 does not
    assert m["weights"] == pytest.approx(base + 2 * adapters + 4 * buffers, rel=1e-12)  # fp32 buffers, whole
    assert full["weights"] == pytest.approx(base + 4 * buffers, rel=1e-12)
    assert m["grads"] == pytest.approx(2 * adapters / ranks, rel=1e-12)          # ZeRO-2 and -3 shard them
    assert m["optimizer"] == pytest.approx(12 * adapters / ranks, rel=1e-12)     # fp32 master + Adam m, v
    assert m["ema"] == pytest.approx(4 * adapters / ranks, rel=1e-12)            # over the adapters only
    assert m["frozen"] == full["frozen"] == pytest.approx(2 * sum(ENCODERS.values()) + 4 * VAE, rel=1e-12)
    assert m["gpu"] == pytest.approx(m["weights"] + m["grads"] + m["optimizer"] + m["ema"] + m["frozen"], rel=1e-12)
    assert m["host_startup"] == pytest.approx(4 * (p + buffers + adapters) + 4 * VAE, rel=1e-12)  # fp32 on the host
    assert m["checkpoint_per_rank"] == pytest.approx(18 * adapters / ranks, rel=1e-12)  # adapters only
    # what LoRA saves against full fine-tuning: the base's gradients, master, Adam and EMA (18 bytes a parameter
    # over N), less the adapters' own bf16 weights, which every rank holds whole
    assert full["gpu"] - m["gpu"] == pytest.approx(18 * (p - adapters) / ranks - 2 * adapters, rel=1e-12)


def test_the_lora_table_prints_the_release_rows(release_counts):
    text = table(["sd3.5-medium", "sd3.5-large"], [8, 16], [2, 3], lora_rank=16)
    rows = [line for line in text.splitlines() if "LoRA r16" in line]
    assert len(rows) == 8
    assert rows[0].startswith("| sd3.5-medium + LoRA r16 (11.9M trained) | 2.24B | 8 | 2 | 5.4 | 0.003 | 0.018 | "
                              "0.006 | 11.5 | **16.9** | 10.3 | 82 |")
    assert rows[-1] == ("| sd3.5-large + LoRA r16 (23.6M trained) | 8.06B | 16 | 3 | 1.4 | 0.003 | 0.018 | 0.006 | "
                        "11.5 | **12.9** | 33.0 | 264 |")
    assert "LoRA" not in table(["sd3.5-medium"], [8], [2])  # rank 0: full fine-tuning, as before
    with pytest.raises(SystemExit):
        main(["--lora-rank", "-1"])


def test_the_folder_counts_the_adapters_of_its_transformer(sd35_folder):
    from t2i.models import lora
    from t2i.models.mmdit import load_pretrained

    counts = folder_params(str(sd35_folder), lora_rank=16)
    expected = lora.adapter_size(load_pretrained(str(sd35_folder)), 16)
    assert expected.modules == 19 and counts["adapters"] == expected.parameters > 0
    assert folder_params(str(sd35_folder))["adapters"] == 0


# What each rank holds of a LoRA model after deepspeed.initialize (t2i's engine, the tiny preset, bf16, 2 ranks):
# the premises of the LoRA rows, read in DeepSpeed's source (tools/memory_table.py's docstring).
PROBE = """
import json, sys
from t2i.config import load_config
from t2i.models import lora
from t2i.models.build import build_for, build_frozen
from t2i.train import engine as engine_lib

rank, world = engine_lib.init_distributed()
out = {}
for stage in (2, 3):
    cfg = load_config(overrides=["data.resolution=32", f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"])
    text, vae = build_frozen(cfg)
    model = build_for(cfg, text, vae)
    lora.apply(model, 4)
    engine, _ = engine_lib.initialize(model, cfg)
    params = list(engine.module.named_parameters())
    held = lambda p: p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    full = lambda p: getattr(p, "ds_numel", p.numel())
    frozen = [p for _, p in params if not p.requires_grad]
    out[stage] = {"frozen": sum(full(p) for p in frozen), "frozen_held": sum(held(p) for p in frozen),
                  "frozen_tensors": len(frozen), "frozen_dtypes": sorted({str(p.dtype) for p in frozen}),
                  "trainable_are_adapters": all("lora_" in n for n, p in params if p.requires_grad),
                  "buffer_dtypes": sorted({str(b.dtype) for b in engine.module.buffers()})}
    del engine, model
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


@pytest.mark.slow
def test_deepspeed_keeps_the_frozen_base_whole_under_zero2_and_partitions_it_under_zero3(tmp_path):
    import os

    script, out = tmp_path / "probe.py", tmp_path / "held.json"
    script.write_text(PROBE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(out)], check=True, capture_output=True, cwd=REPO, env=env, timeout=600)
    held = json.loads(out.read_text())
    for stage in ("2", "3"):
        h = held[stage]
        assert h["trainable_are_adapters"] and h["frozen_dtypes"] == ["torch.bfloat16"]  # cast like the rest
        assert h["buffer_dtypes"] == ["torch.float32"]  # buffers are not cast: 4 bytes an element in the table
    assert held["2"]["frozen_held"] == held["2"]["frozen"]  # ZeRO-2: the whole base on every rank
    z3 = held["3"]
    assert z3["frozen"] / 2 <= z3["frozen_held"] <= z3["frozen"] / 2 + z3["frozen_tensors"]  # 1/N (+ padding)
