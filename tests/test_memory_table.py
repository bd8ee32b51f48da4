"""docs/memory.md's table (tools/memory_table.py) against what a rank really holds and peaks at while it
loads a release-shaped SD3.5 folder, scaled up so the weights (~0.5 GB) dominate the interpreter.

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

from tools.memory_table import folder_params, per_rank_gb

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
