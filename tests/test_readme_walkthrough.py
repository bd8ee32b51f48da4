"""The README's "Train on your own data" block, run as written (plus tiny settings appended to each
`t2i` line) on a folder of captioned images, so the README cannot drift from what the commands do."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO

HEADING = "### Train on your own data"
# appended to each command: the README's lines stay as a user types them (overrides go anywhere)
TINY = {"train": "train.steps=2 data.resolution=16 train.micro_batch_size=4 data.shuffle_buffer=16 "
                 "train.warmup_steps=1 sample.steps=2 logging.wandb=disabled 'data.buckets={step: 4}'",
        "sample": "--steps 2 --images-per-prompt 1"}


def walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(HEADING):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_walkthrough_is_what_a_user_types():
    lines = [line for line in walkthrough().splitlines() if line.strip()]
    assert [line.split()[:2] for line in lines if line.startswith("t2i")] == [
        ["t2i", "make-shards"], ["t2i", "train"], ["t2i", "sample"]]
    assert "data.shards=data/mine" in walkthrough() and "--src my_images" in walkthrough()
    assert "'data.buckets={step: 8}'" in walkthrough()  # multi-aspect


@pytest.mark.slow
def test_the_readme_walkthrough_runs(tmp_path):
    images = tmp_path / "my_images"
    (images / "more").mkdir(parents=True)
    colours = {"cat": (200, 120, 40), "beach": (240, 220, 160), "more/forest": (20, 120, 30), "sky": (90, 150, 250)}
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (40 + 8 * i, 40), rgb).save(images / f"{name}.{'jpg' if i % 2 else 'png'}")
        (images / f"{name}.txt").write_text(f"a photo of the {name.split('/')[-1]}")
    script = ("set -euo pipefail\n"
              't2i() {\n  case "$1" in\n'
              + "".join(f'    {cmd}) "$PY" -m t2i.cli "$@" {extra} ;;\n' for cmd, extra in TINY.items())
              + '    *) "$PY" -m t2i.cli "$@" ;;\n  esac\n}\n' + walkthrough())
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    assert sorted(p.name for p in (tmp_path / "data/mine").iterdir()) == ["manifest.json", "mine-000000.tar"]
    for line in ("INFO validation off: data.shards=data/mine is not the shapes domain",
                 "INFO sample prompts: data.shards=data/mine is not the shapes domain; the sample grids use 4 caption(s)",
                 "INFO live GenEval off: data.shards=data/mine is not the shapes domain"):
        assert line in proc.stderr
    run = tmp_path / "runs" / "mine"
    # multi-aspect: 40x40 .. 64x40 images in the 16x16 and 20x12 buckets (16 px area in steps of 4, appended)
    assert "buckets 12x20=0 16x16=" in proc.stderr and "dropped for aspect 0" in proc.stderr
    assert (run / "samples" / "step00000002.png").is_file() and (run / "loss.png").is_file()
    assert "- a photo of the cat" in (run / "config.yaml").read_text()  # the grid's prompts are the captions
    assert (tmp_path / "samples/mine/00000/samples/0000.png").is_file()
    assert (tmp_path / "samples/mine/00000/metadata.jsonl").read_text().count("a photo of my cat on the sofa") == 1
