"""CLIPScore and its tool, on a tiny random open_clip CLIP saved to a local file (nothing downloaded)."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.errors import EvalError
from t2i.eval.clipscore import ClipScorer
from pipelines.clipscore import main as clipscore_main

TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip_checkpoint(folder: Path) -> tuple[str, str]:
    """Register the 't2i-tiny-clip' open_clip config and save random weights; -> (model name, .pt path)."""
    config = folder / "t2i-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    ckpt = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model("t2i-tiny-clip").state_dict(), ckpt)
    return "t2i-tiny-clip", str(ckpt)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("clip"))


def noise_images(n, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a photo of a red car", "a photo of a dog", "two cats", "a blue bench", "a photo of a red car"]


def hand_cos(scorer, images, prompts):
    with torch.no_grad():
        img = scorer.model.encode_image(torch.stack([scorer.preprocess(im) for im in images]))
        txt = scorer.model.encode_text(scorer.tokenizer(prompts))
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).numpy()


def test_clipscore_is_max_of_100_cos_and_zero(tiny_clip):
    scorer = ClipScorer(*tiny_clip, batch_size=2)          # batches of 2 exercise the chunking
    assert scorer.name == "clipscore(t2i-tiny-clip)"
    images = noise_images(len(PROMPTS))
    cos = hand_cos(scorer, images, PROMPTS)
    np.testing.assert_allclose(scorer.score(images, PROMPTS), np.maximum(100 * cos, 0), rtol=1e-5, atol=1e-4)

    with torch.no_grad():                                   # flip every text embedding: cos -> -cos
        scorer.model.text_projection.neg_()
    flipped = scorer.score(images, PROMPTS)
    np.testing.assert_allclose(flipped, np.maximum(-100 * cos, 0), rtol=1e-5, atol=1e-4)
    assert ((flipped == 0) | (np.maximum(100 * cos, 0) == 0)).all()  # each pair is clipped in one sign


def test_clipscore_w_scales_and_checks_lengths(tiny_clip):
    images = noise_images(2, seed=1)
    base = ClipScorer(*tiny_clip).score(images, PROMPTS[:2])
    np.testing.assert_allclose(ClipScorer(*tiny_clip, w=2.5).score(images, PROMPTS[:2]), base * 0.025, rtol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ClipScorer(*tiny_clip).score(images, PROMPTS[:1])


def test_missing_checkpoint_fails_clearly(tiny_clip, tmp_path):
    with pytest.raises(EvalError, match="not a local file"):
        ClipScorer(tiny_clip[0], tmp_path / "missing.pt")
    with pytest.raises(EvalError, match="not a local file"):
        ClipScorer("ViT-L-14-quickgelu", "openai")          # a tag would download: refused


def test_tool_scores_a_geneval_folder(tiny_clip, tmp_path, capsys):
    root = tmp_path / "images"
    for k, prompt in enumerate(PROMPTS[:2]):
        folder = root / f"{k:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": prompt}) + "\n")
        for j, im in enumerate(noise_images(2, seed=10 * k)):
            im.save(folder / "samples" / f"{j:04d}.png")
        noise_images(1)[0].save(folder / "samples" / "grid.png")      # not <digits>.png: ignored
    (root / "notes").mkdir()                                           # not a digit folder: ignored
    out = tmp_path / "report" / "clipscore.json"
    assert clipscore_main(["--images", str(root), "--model", tiny_clip[0], "--pretrained", tiny_clip[1],
                           "--out", str(out), "--batch-size", "3"]) == 0
    report = json.loads(out.read_text())

    scorer = ClipScorer(*tiny_clip)
    expected = {}
    for k, prompt in enumerate(PROMPTS[:2]):
        expected[f"{k:05d}"] = scorer.score(noise_images(2, seed=10 * k), [prompt] * 2)
    flat = np.concatenate(list(expected.values()))
    assert report["n"] == 4 and report["model"] == "clipscore(t2i-tiny-clip)"
    np.testing.assert_allclose(report["mean"], flat.mean(), rtol=1e-5)
    np.testing.assert_allclose(report["std"], flat.std(), rtol=1e-4, atol=1e-6)
    assert set(report["per_prompt"]) == {"00000", "00001"}
    entry = report["per_prompt"]["00001"]
    assert entry["prompt"] == PROMPTS[1] and list(entry["scores"]) == ["0000.png", "0001.png"]
    np.testing.assert_allclose(list(entry["scores"].values()), expected["00001"], rtol=1e-5)
    assert "n 4" in capsys.readouterr().out


def test_a_clip_file_with_a_planted_pickle_runs_no_code(tiny_clip, tmp_path):
    import os
    import zipfile

    from t2i.errors import T2IError

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    name, good = tiny_clip
    state = torch.load(good, weights_only=True)
    state["extra"] = Planted()
    planted = tmp_path / "planted.pt"
    torch.save(state, planted)
    with pytest.raises(T2IError, match="posix.system"):
        ClipScorer(name, planted)
    # a member named like TorchScript's constants.pkl no longer switches to an unsafe load
    disguised = tmp_path / "disguised.pt"
    with zipfile.ZipFile(planted) as src, zipfile.ZipFile(disguised, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        root = src.namelist()[0].split("/")[0]
        dst.writestr(f"{root}/constants.pkl", b"")
        dst.writestr(f"{root}/code/__torch__.py", b"")
    with pytest.raises(T2IError):
        ClipScorer(name, disguised)
    assert not marker.exists()
