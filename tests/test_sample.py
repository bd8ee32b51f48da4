"""`t2i sample`: the output does not depend on how the work is split (shards, torchrun ranks), a kill
leaves only whole PNGs and the restart finishes the job identically, and a changed setting is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, run_t2i
from t2i.eval import sample_folder as sample
from t2i.eval import geneval
from t2i.checkpoint import loading
from t2i.models import build
from t2i.config import load_config
from t2i.errors import EvalError
from t2i.eval.prompts import write_prompts

OVERRIDES = ["data.resolution=16", "sample.sigmas=t2i"]  # the toy on t2i's grid, as sample.run without a plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random MMDiT saved as a diffusers transformer folder, and a prompt file."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(None, OVERRIDES)
    text, vae = build.build_frozen(cfg)
    build.build_for(cfg, text, vae).save_pretrained(root / "transformer")
    colors, shapes = ["red", "blue", "green"], ["circle", "square", "triangle"]
    entries = [{"tag": "colors", "include": [{"class": s, "count": 1, "color": c}], "prompt": f"a photo of a {c} {s}"}
               for c in colors for s in shapes]
    prompts = write_prompts(entries, root / "prompts.jsonl")
    return {"ckpt": root / "transformer", "prompts": prompts, "entries": entries, "cfg": cfg}


def images_of(folder):
    return {(p, img.name): np.asarray(Image.open(img)) for p, (_, imgs) in geneval.list_images(folder).items()
            for img in imgs}


def run_in_process(tiny, out, **kw):
    torch.set_num_threads(1)  # torchrun's workers run with OMP_NUM_THREADS=1; same kernels, same sums
    loaded = loading.load_any(tiny["ckpt"], tiny["cfg"])
    settings = dict(prompts_source=str(tiny["prompts"]), images_per_prompt=3, steps=3, guidance=2.0, seed=7,
                    batch_size=4, progress=False)
    return sample.run(loaded, tiny["entries"], out, **(settings | kw))


def test_item_seeds_and_batches_do_not_depend_on_the_split():
    all_batches = sample.batches(9, 3, 4)
    assert sum(all_batches, []) == [(p, k) for p in range(9) for k in range(3)]
    parts = [sample.my_batches(all_batches, w, 3) for w in range(3)]
    assert sorted(sum(parts, []), key=all_batches.index) == all_batches
    seeds = {sample.item_seed(7, p, k) for p in range(50) for k in range(8)}
    assert len(seeds) == 400 and sample.item_seed(7, 1, 2) == sample.item_seed(7, 1, 2) != sample.item_seed(8, 1, 2)
    assert sample.parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "a/b", "3"):
        with pytest.raises(EvalError, match="shard"):
            sample.parse_shard(bad)


def test_array_shards_equal_one_process_image_for_image(tiny, tmp_path):
    whole = run_in_process(tiny, tmp_path / "whole")
    assert whole["images"] == 27 and whole["skipped"] == 0
    parts = [run_in_process(tiny, tmp_path / "split", shard=f"{i}/3") for i in range(3)]
    assert sum(p["images"] for p in parts) == 27
    a, b = images_of(tmp_path / "whole"), images_of(tmp_path / "split")
    assert len(a) == 27 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len({a[k].tobytes() for k in a}) == 27                      # every image has its own noise
    meta = json.loads((tmp_path / "whole" / "00004" / "metadata.jsonl").read_text())
    assert meta == tiny["entries"][4]
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["images_per_prompt"] == 3 and manifest["weights"] == "diffusers"


def test_other_settings_in_the_same_folder_are_refused(tiny, tmp_path):
    run_in_process(tiny, tmp_path / "s", images_per_prompt=1)
    with pytest.raises(EvalError, match=r"steps: folder has 3, this run 4"):
        run_in_process(tiny, tmp_path / "s", images_per_prompt=1, steps=4)
    again = run_in_process(tiny, tmp_path / "s", images_per_prompt=1)
    assert again == {**again, "images": 0, "skipped": 9}


def test_the_guidance_interval_is_recorded_changes_the_images_and_an_older_manifest_still_resumes(tiny, tmp_path):
    from diffusers import SD3Transformer2DModel

    from t2i.eval.sampling import plan

    model = SD3Transformer2DModel.from_pretrained(tiny["ckpt"])  # zero-initialised outputs: make the text matter
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    model.save_pretrained(tmp_path / "perturbed")
    tiny = {**tiny, "ckpt": tmp_path / "perturbed"}
    full = run_in_process(tiny, tmp_path / "full", images_per_prompt=1)
    assert full["images"] == 9
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["guidance_interval"] == [0.0, 1.0]
    # a folder written before the key existed guided every step: it resumes under the default
    del manifest["guidance_interval"]
    (tmp_path / "full" / "manifest.json").write_text(json.dumps(manifest))
    assert run_in_process(tiny, tmp_path / "full", images_per_prompt=1)["skipped"] == 9
    with pytest.raises(EvalError, match=r"guidance_interval: folder has \[0.0, 1.0\], this run \[0.0, 0.5\]"):
        run_in_process(tiny, tmp_path / "full", images_per_prompt=1, guidance_interval=(0.0, 0.5))
    # 3 steps at sigma 1, 2/3, 1/3: guiding only sigma <= 0.5 changes the images, [0, 0] is CFG 1 throughout
    run_in_process(tiny, tmp_path / "half", images_per_prompt=1, guidance_interval=(0.0, 0.5))
    run_in_process(tiny, tmp_path / "none", images_per_prompt=1, guidance_interval=(0.0, 0.0))
    run_in_process(tiny, tmp_path / "cfg1", images_per_prompt=1, guidance=1.0)
    a, b, c, d = (images_of(tmp_path / n) for n in ("full", "half", "none", "cfg1"))
    assert all(not np.array_equal(a[k], b[k]) for k in a) and all(not np.array_equal(b[k], d[k]) for k in a)
    assert all(np.array_equal(c[k], d[k]) for k in c)
    # the plan: the checkpoint's config, unless the command line says otherwise
    loaded = loading.load_any(tiny["ckpt"], load_config(None, [*OVERRIDES, "sample.guidance_interval=[0.1, 0.6]"]))
    p = plan(loaded, explicit=None)
    assert p.guidance_interval == (0.1, 0.6) and "sample.guidance_interval" in p.sources["guidance_interval"]
    p = plan(loaded, explicit=None, guidance_interval=[0.0, 0.3])
    assert p.guidance_interval == (0.0, 0.3) and p.sources["guidance_interval"] == "command line"
    assert plan(loaded, explicit=set()).guidance_interval == (0.0, 1.0)  # a diffusers folder, no config: every step


@pytest.mark.slow
def test_torchrun_ranks_equal_one_process(tiny, tmp_path):
    run_in_process(tiny, tmp_path / "ref")
    proc = run_t2i("sample", "--ckpt", tiny["ckpt"], "--prompts", tiny["prompts"], "--out", tmp_path / "ranks",
                   "--images-per-prompt", 3, "--steps", 3, "--guidance", 2.0, "--seed", 7, "--batch-size", 4,
                   "--nproc", 2, *OVERRIDES)
    assert "rank 1:" in proc.stdout and "rank 0:" in proc.stdout
    a, b = images_of(tmp_path / "ref"), images_of(tmp_path / "ranks")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_job_leaves_whole_pngs_and_the_restart_completes_it(tiny, tmp_path):
    kw = dict(images_per_prompt=2, steps=40, batch_size=2)
    run_in_process(tiny, tmp_path / "ref", **kw)
    args = [sys.executable, "-m", "t2i.cli", "sample", "--ckpt", str(tiny["ckpt"]), "--prompts", str(tiny["prompts"]),
            "--out", str(tmp_path / "job"), "--images-per-prompt", "2", "--steps", "40", "--guidance", "2.0",
            "--seed", "7", "--batch-size", "2", *OVERRIDES]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "job").glob("*/samples/*.png"))) < 4 and time.time() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ref, partial = images_of(tmp_path / "ref"), images_of(tmp_path / "job")
    assert 4 <= len(partial) < len(ref)
    assert all(np.array_equal(partial[k], ref[k]) for k in partial)       # every counted PNG is whole
    proc = run_t2i(*args[3:], env={"OMP_NUM_THREADS": "1"})
    complete = sum(all((p, f"{k:04d}.png") in partial for k in range(2)) for p in range(9))  # batch = 1 prompt
    assert f"{2 * complete} already there" in proc.stdout
    done = images_of(tmp_path / "job")
    assert done.keys() == ref.keys() and all(np.array_equal(done[k], ref[k]) for k in ref)


def test_prompt_sources_text_file_geneval_jsonl_and_shard_captions(tmp_path, tiny):
    from t2i.data.shapes import make_sample
    from t2i.data.writers import write_shapes_shards
    from t2i.eval.prompts import load_prompts

    (tmp_path / "p.txt").write_text("a photo of a cat\n\n  a photo of a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == [{"prompt": "a photo of a cat"}, {"prompt": "a photo of a dog"}]
    assert load_prompts(str(tiny["prompts"]), limit=2) == tiny["entries"][:2]
    shards = write_shapes_shards(tmp_path / "s", n=10, samples_per_shard=5, seed=0, size=32, progress=False)
    from_shards = load_prompts(str(tmp_path / "s"), limit=7)
    assert len(from_shards) == 7 and from_shards[2]["tag"] == "counting" and "exclude" in from_shards[2]
    assert [e["prompt"] for e in from_shards] == [make_sample(i, 0, 32)[1] for i in range(7)]
    assert len(load_prompts(str(shards[0]))) == 5
    with pytest.raises(EvalError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))
