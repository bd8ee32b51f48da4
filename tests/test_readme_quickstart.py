"""The README's command blocks -- Quickstart; Evaluation; SLURM, preemption and checkpoint tools; LoRA;
Performance -- run in the README's order, as one session in one folder, with tiny settings appended
to each `t2i` line, so the README cannot drift from the code.

Lines that need real weights, a cluster, a GPU or the user's own config stay in the README and are
skipped by one rule (SKIP below); the test asserts exactly which lines that rule skipped, so it
cannot silently swallow more. "Train on your own data" is run by tests/test_readme_walkthrough.py."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO

HEADINGS = ["## Quickstart",
            "### Evaluation: sampling at scale, GenEval, FID, CLIP score",
            "### SLURM, preemption and checkpoint tools",
            "### LoRA: MixFlow on a budget, loaded by diffusers",
            "### Performance: benchmark, precomputed caches, compile"]
# needs real weights (/weights/..., mask2former, clip:), a cluster (sbatch, $SLURM...), a GPU
# (gpu_bench), the user's own config (my.yaml) or a fresh checkout's setup (make setup)
SKIP = re.compile(r"/weights/|\bsbatch\b|\$SLURM|mask2former|clip:|gpu_bench|make setup|\bmy\.yaml\b")
SKIPPED = ["make setup", "sbatch --nodes 2", "t2i sample --ckpt /weights/sd3.5-medium",
           "t2i geneval samples/sd35 --prompts", "t2i clipscore --images samples/r",
           "sbatch slurm/train.sbatch", "sbatch --nodes 1 slurm/train.sbatch --config configs/stages/sd3.5-large-lora",
           "t2i bench --config my.yaml", "t2i cache --config my.yaml",
           "t2i train --config my.yaml", "bash tools/gpu_bench.sh"]

TRAIN = ("data.resolution=16 train.micro_batch_size=4 train.warmup_steps=1 train.ckpt_every=50 "
         "sample.steps=2 logging.wandb=disabled validation.num_samples=8")
# bash: the README's lines stay as a user types them; `t2i` appends tiny settings per sub-command
# (overrides and repeated flags: the last one wins) and runs every --nproc as 1 rank (2 shared CPU
# cores; the multi-rank paths have their own tests)
WRAPPER = r"""
set -euo pipefail
t2i() {
  local args=() prev="" a
  for a in "$@"; do
    if [[ "$prev" == --nproc ]]; then a=1; fi
    args+=("$a"); prev="$a"
  done
  local line=" $* " extra=""
  case "$1 ${2-}" in
    "make-shards folder") extra="--per-shard 1 --no-progress" ;;
    "make-shards shapes") extra="--n 16 --per-shard 2 --no-progress" ;;
    "fid ref") extra="--resolution 16 --no-progress" ;;
    "fid score") extra="--no-progress" ;;
    train\ *)
      extra="TRAIN train.steps=4"
      if [[ "$line" == *" --stop-at "* ]]; then extra="TRAIN train.steps=22"; fi
      if [[ "$line" == *" --resume "* ]]; then extra="TRAIN train.steps=24"; fi
      if [[ "$line" == *" --auto-resume "* ]]; then extra="TRAIN train.steps=26"; fi ;;
    sample\ *) extra="--steps 2 --images-per-prompt 1 --limit 6" ;;
    eval\ *) extra="--per-tag 1 --images-per-prompt 1 --steps 2 --fid-max 16" ;;
    bench\ *) extra="--steps 2 --warmup 0 --repeats 1 --variants t2i,bare --nproc 1 --batch-size 4 --resolution 16" ;;
    bench-loader\ *) extra="--seconds 1 --workers 0 --batch-size 4 --json bench-loader.json" ;;
  esac
  echo "+ t2i ${args[*]} $extra" >&2
  "$PY" -m t2i.cli "${args[@]}" $extra
}
""".replace("TRAIN", TRAIN)


def blocks() -> list[str]:
    """Each heading's first ```bash block, as logical lines (backslash continuations joined)."""
    text = (REPO / "README.md").read_text()
    out = []
    for heading in HEADINGS:
        section = text[text.index(heading + "\n"):]
        block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
        out.append(re.sub(r"\\\n\s*", "", block))
    return out


def commands() -> tuple[list[str], list[str]]:
    run, skipped = [], []
    for block in blocks():
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            (skipped if SKIP.search(line) else run).append(line)
    return run, skipped


def test_the_skip_rule_skips_only_what_needs_weights_a_cluster_or_a_gpu():
    run, skipped = commands()
    assert len(skipped) == len(SKIPPED), skipped
    for line, start in zip(skipped, SKIPPED):
        assert line.startswith(start), (line, start)
    assert all(line.startswith("t2i ") for line in run), run
    # every part of the quickstart this test is for is among the lines run
    for needle in ("make-shards folder", "make-shards shapes", "train data.shards=data/mine", "--stop-at",
                   "--resume", "--auto-resume", "sample --ckpt runs/r", "geneval-prompts", "geneval samples/r",
                   "fid ref", "fid score", "eval --ckpt r=runs/r", "ckpt list", "ckpt consolidate",
                   "ckpt export", "bench", "bench --shards", "bench-loader", "lora.rank=16", "--merge",
                   "--lora runs/r-lora/lora"):
        assert any(needle in line for line in run), needle


@pytest.mark.slow
def test_the_readme_quickstart_runs_in_order(tmp_path):
    images = tmp_path / "my_images"
    images.mkdir()
    for i, (name, rgb) in enumerate({"cat": (200, 120, 40), "beach": (240, 220, 160),
                                     "forest": (20, 120, 30), "sky": (90, 150, 250)}.items()):
        Image.new("RGB", (40, 40), rgb).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a photo of the {name}")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the README runs in a checkout
    (tmp_path / "prompts.txt").write_text("a photo of my cat on the sofa\na photo of the beach\n")
    run, _ = commands()
    script = WRAPPER + "\n".join(run) + "\n"
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               T2I_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    # make-shards: a folder (one image per shard here) and the shapes sets
    assert sorted(p.name for p in (tmp_path / "data/mine").glob("*.tar")) == [
        f"mine-00000{i}.tar" for i in range(4)]
    assert len(list((tmp_path / "data/shapes").glob("shapes-*.tar"))) == 8
    assert (tmp_path / "data/shapes-val/shapes-val-000001.tar").is_file()
    # train, stop, resume (three ways), auto-resume
    for name in ("mine", "longer"):
        assert (tmp_path / "runs" / name / "checkpoints" / "step00000004").is_dir()
    r = tmp_path / "runs/r"
    assert "stopped at step 20 of 22 (--stop-at)" in proc.stderr
    assert "resumed from runs/r/checkpoints/step00000020 at step 20" in proc.stderr
    assert (r / "checkpoints/step00000026").is_dir()
    # sample in GenEval's layout, GenEval, FID
    assert (tmp_path / "prompts/shapes/evaluation_metadata.jsonl").is_file()
    assert len(list((tmp_path / "samples/r").glob("0000[0-5]/samples/0000.png"))) == 6
    assert (tmp_path / "samples/r/00000/metadata.jsonl").is_file()
    assert (tmp_path / "samples/mine/00001/samples/0000.png").is_file()
    summary = json.loads((tmp_path / "samples/r/geneval/summary.json").read_text())
    assert 0.0 <= summary["overall"] <= 1.0
    assert (tmp_path / "ref.npz").is_file()
    assert "fid" in json.loads((tmp_path / "fid.json").read_text())
    # eval reports
    assert "r" in (tmp_path / "runs/eval/report.md").read_text()
    assert (tmp_path / "runs/mine-eval/report.md").is_file()
    # checkpoint tools
    assert "latest" in proc.stdout + proc.stderr
    assert list((r / "fp32").glob("*.safetensors"))
    assert list((r / "diffusers").rglob("config.json"))
    # LoRA: trained on runs/r, exported both ways, sampled from the run and as a file on the base: same adapter
    assert "LoRA rank 16 (alpha 16)" in (tmp_path / "runs/r-lora/train.log").read_text()
    assert (tmp_path / "runs/r-lora/lora/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs/r-lora/merged/transformer/config.json").is_file()
    by_run, by_file = (json.loads((tmp_path / "samples" / k / "manifest.json").read_text())["lora"]
                       for k in ("r-lora", "r-lora-file"))
    assert by_run["adapter_sha256"] == by_file["adapter_sha256"] and by_run["base_sha256"] == by_file["base_sha256"]
    # bench
    assert "failed with exit code" not in proc.stderr  # a variant that fails leaves t2i bench exiting 0
    assert json.loads((tmp_path / "runs/bench/bench.json").read_text())
    assert (tmp_path / "bench-loader.json").is_file()
