"""The command line's error model (exit 2 for a user error in one line, 1 for a bug with its traceback,
99 for "checkpointed and stopped") and checkpoints written before the library was regrouped."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_t2i
from t2i.checkpoint import loading, store

OLD_RUN = REPO / "tests" / "assets" / "pre-layout-run"  # written by t2i at commit 4976b57 (flat t2i/)

# Runs `t2i <argv>` with one pipeline replaced by a function that raises the given exception.
RAISING = """
import sys
import pipelines.sample
from t2i.cli import main
from t2i.errors import Preempted
kind = sys.argv[1]
def boom(args, cfg):
    if kind == "bug":
        raise RuntimeError("an internal invariant broke")
    raise Preempted(7, 10, saved=True)
pipelines.sample.main = boom
sys.exit(main(sys.argv[2:]))
"""


def run_raising(kind: str, tmp_path) -> subprocess.CompletedProcess:
    argv = ["sample", "--ckpt", str(OLD_RUN), "--prompts", "p.txt", "--out", str(tmp_path / "o")]
    return subprocess.run([sys.executable, "-c", RAISING, kind, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_user_error_exits_2_with_one_line():
    proc = run_t2i("config", "train.lr_typo=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.lr_typo" in proc.stderr and "ConfigError" in proc.stderr


def test_a_missing_checkpoint_exits_2_naming_it(tmp_path):
    proc = run_t2i("ckpt", "list", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "CheckpointError" in proc.stderr


def test_a_bug_exits_1_with_its_traceback(tmp_path):
    proc = run_raising("bug", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: an internal invariant broke" in proc.stderr


def test_a_preempted_run_exits_99(tmp_path):
    proc = run_raising("preempted", tmp_path)
    assert proc.returncode == 99, proc.stderr
    assert "SIGUSR1 received: checkpointed at step 7" in proc.stderr and "--auto-resume" in proc.stderr


def test_a_checkpoint_from_before_the_regrouping_loads_with_the_same_predictions():
    expected = load_file(OLD_RUN / "expected.safetensors")
    # it predates sample.guidance_interval: it was sampled with guidance at every step, and still is
    assert loading.load(OLD_RUN).cfg.sample.guidance_interval == [0.0, 1.0]
    for weights in ("ema", "raw"):
        model = loading.load(OLD_RUN, ema=weights == "ema").model
        with torch.no_grad():
            out = model(hidden_states=expected["x"], encoder_hidden_states=expected["context"],
                        pooled_projections=expected["pooled"], timestep=expected["timestep"]).sample
        torch.testing.assert_close(out, expected[weights], rtol=1e-5, atol=1e-7)  # fp32 kernel noise
    assert store.complete_tags(OLD_RUN / "checkpoints") == ["step00000002"]


@pytest.mark.slow
def test_a_run_from_before_the_regrouping_resumes(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=16)
    runs = tmp_path / "runs"
    shutil.copytree(OLD_RUN, runs / "old")
    # the copied run's data is elsewhere now: a data override on a resume needs --force-override
    proc = run_t2i("train", "--config", runs / "old" / "config.yaml", "--resume", f"run.output_dir={runs}",
                   "run.name=old", f"data.shards={shards[0]}::{shards[1]}", "train.steps=3", "sample.steps=2",
                   "--force-override")
    assert "resumed from" in proc.stderr + proc.stdout and "at step 2" in proc.stderr + proc.stdout
    assert store.latest_tag(runs / "old" / "checkpoints") == "step00000003"


def test_export_dtype_is_what_a_pipeline_loads(tmp_path):
    from diffusers import SD3Transformer2DModel

    from t2i import cli

    for dtype in ("float32", "bfloat16"):
        assert cli.main(["ckpt", "export", str(OLD_RUN), "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
    stored = load_file(next((tmp_path / "bfloat16" / "transformer").glob("*.safetensors")))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # half the bytes on disk
    full = SD3Transformer2DModel.from_pretrained(tmp_path / "float32" / "transformer")
    # diffusers loads in fp32 unless told otherwise: a bf16 export is run with torch_dtype=
    half = SD3Transformer2DModel.from_pretrained(tmp_path / "bfloat16" / "transformer", torch_dtype=torch.bfloat16)
    assert next(full.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.bfloat16
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        torch.testing.assert_close(b, a.to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_every_sub_command_help_names_the_t2i_command(capsys):
    """`t2i X --help` reads `usage: t2i X ...` (not `python -m tools.x`) for every tool and pipeline."""
    from t2i.cli import TOOLS, main

    for name in [*TOOLS, "sample", "eval"]:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: t2i {name} "), (name, out[:80])
    for argv in (["fid", "ref", "--help"], ["ckpt", "export", "--help"], ["make-shards", "shapes", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr().out.startswith(f"usage: t2i {' '.join(argv[:2])} ")
