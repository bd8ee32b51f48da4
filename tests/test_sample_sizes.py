"""Sampling at non-square sizes: `--resolution WxH`, generate / sample_folder at (width, height), the token
count of dynamic shifting, manifests with width and height (old ones still resume), and sample grids
that letterbox instead of squashing (square images exactly as before)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from t2i import cli, flow
from t2i.checkpoint import loading
from t2i.config import load_config
from t2i.eval import sample_folder
from t2i.eval.image_source import as_resolution, resolution_record, size_of, size_record
from t2i.eval.sampling import Plan, config_sigmas, generate, image_tokens, plan
from t2i.errors import EvalError
from t2i.eval.prompts import write_prompts
from t2i.models import build
from t2i.viz import save_grid, to_pil

OVERRIDES = ["data.resolution=16", "sample.sigmas=t2i"]
WIDE = (16, 8)  # the toy: patch 4, a 4-token positional grid (16 px), VAE factor 1
PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The tiny random MMDiT as a diffusers transformer folder, loaded, and a prompt file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy")
    cfg = load_config(None, OVERRIDES)
    text, vae = build.build_frozen(cfg)
    torch.manual_seed(0)
    build.build_for(cfg, text, vae).save_pretrained(root / "transformer")
    entries = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": p} for p in PROMPTS]
    prompts = write_prompts(entries, root / "prompts.jsonl")
    return {"ckpt": root / "transformer", "prompts": prompts, "entries": entries, "cfg": cfg,
            "loaded": loading.load_any(root / "transformer", cfg)}


# ---------------------------------------------------------------- sizes and the flag


def test_resolutions_normalise_to_an_int_square_or_a_width_height_tuple():
    assert [as_resolution(r) for r in (64, (64, 64), [64, 64], "64", "64x64", (96, 64), [96, 64], "96x64", None)] == [
        64, 64, 64, 64, 64, (96, 64), (96, 64), (96, 64), None]
    assert size_of(64) == (64, 64) and size_of("1216x832") == (1216, 832) and size_of([832, 1216]) == (832, 1216)
    assert [resolution_record(r) for r in (64, (64, 64), (1216, 832), None)] == [64, 64, "1216x832", None]
    assert size_record(64) == {"resolution": 64, "width": 64, "height": 64}
    assert size_record((1216, 832)) == {"resolution": "1216x832", "width": 1216, "height": 832}


def test_the_resolution_flag_takes_a_square_side_or_width_x_height(capsys):
    sample = cli.parse(["sample", "--ckpt", "c", "--prompts", "p", "--out", "o", "--resolution", "64"])
    assert sample.resolution == 64 and type(sample.resolution) is int          # exactly as before
    assert cli.parse(["sample", "--ckpt", "c", "--prompts", "p", "--out", "o", "--resolution", "1216x832"]
                     ).resolution == (1216, 832)
    assert cli.parse(["eval", "--ckpt", "a=c", "--out", "o", "--resolution", "832x1216"]).resolution == (832, 1216)
    assert cli.parse(["eval", "--ckpt", "a=c", "--out", "o", "--resolution", "512x512"]).resolution == 512
    assert cli.parse(["sample", "--ckpt", "c", "--prompts", "p", "--out", "o"]).resolution is None
    with pytest.raises(SystemExit) as e:
        cli.parse(["sample", "--ckpt", "c", "--prompts", "p", "--out", "o", "--resolution", "1216x"])
    assert e.value.code == 2
    assert "argument --resolution: '1216x' is not a size; write WIDTHxHEIGHT" in capsys.readouterr().err


# ---------------------------------------------------------------- generate, plan, σ grids


def test_generate_returns_height_by_width_images_and_an_int_is_the_square(toy):
    loaded = toy["loaded"]
    kw = dict(steps=2, guidance=2.0, seed=3, batch_size=2)
    wide = generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=WIDE, **kw)
    tall = generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=WIDE[::-1], **kw)
    assert wide.shape == (3, 3, 8, 16) and tall.shape == (3, 3, 16, 8)
    square = generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=16, **kw)
    assert square.shape == (3, 3, 16, 16)
    torch.testing.assert_close(generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=(16, 16), **kw),
                               square, rtol=0, atol=0)
    # image i's noise is its own (seed + i): a batch split does not change it, at a non-square size too
    torch.testing.assert_close(generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=WIDE,
                                        **(kw | {"batch_size": 1})), wide, rtol=0, atol=1e-6)


def test_the_plan_keeps_a_width_height_resolution_and_counts_h_times_w_tokens():
    dynamic = {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
               "base_shift": 0.5, "max_shift": 1.15}
    vae = SimpleNamespace(downsample=8, latent_size=lambda side: side // 8)
    cfg = load_config(None, ["data.resolution=16"])
    loaded = SimpleNamespace(cfg=cfg, folder="/sd3", model=SimpleNamespace(config={"patch_size": 2, "sample_size": 128}),
                             scheduler=dynamic, vae=vae)
    p = plan(loaded, steps=4, resolution=(1216, 832), explicit=set())
    assert (p.resolution, p.width, p.height) == ((1216, 832), 1216, 832)
    tokens = (832 // 16) * (1216 // 16)                                  # 52 x 76, not 76²
    full = flow.scheduler_config(dynamic, 3.0)
    torch.testing.assert_close(p.sigmas, flow.inference_sigmas(4, "diffusers", 3.0, full, image_seq_len=tokens),
                               rtol=0, atol=0)
    assert not torch.equal(p.sigmas, flow.inference_sigmas(4, "diffusers", 3.0, full, image_seq_len=76 * 76))
    square = plan(loaded, steps=4, explicit=set())                        # the folder's 128 x 8 = 1024
    assert (square.resolution, square.width, square.height) == (1024, 1024, 1024) and type(square.resolution) is int
    torch.testing.assert_close(square.sigmas, flow.inference_sigmas(4, "diffusers", 3.0, full,
                                                                    image_seq_len=64 * 64), rtol=0, atol=0)
    assert image_tokens(128, 2) == 64 * 64 and image_tokens((152, 104), 2) == 76 * 52
    assert "resolution = 1216x832 (command line)" in p.describe()
    assert Plan(steps=1, guidance=1.0, shift=1.0, resolution=64, grid="t2i", sigmas=torch.ones(2), scheduler=None,
                model=None, sources={}).width == 64


def test_config_sigmas_takes_a_latent_width_height(monkeypatch):
    from t2i.checkpoint import loading as loading_module

    dynamic = {"shift": 3.0, "use_dynamic_shifting": True}
    monkeypatch.setattr(loading_module, "read_scheduler_config", lambda path: dynamic)
    cfg = load_config(None, ["sample.sigmas=diffusers", "sample.steps=5"])
    full = flow.scheduler_config(dynamic, cfg.sample.shift)
    wide = config_sigmas(cfg, {"patch_size": 2}, (152, 104))
    torch.testing.assert_close(wide, flow.inference_sigmas(5, "diffusers", cfg.sample.shift, full,
                                                           image_seq_len=76 * 52), rtol=0, atol=0)
    torch.testing.assert_close(config_sigmas(cfg, {"patch_size": 2}, 128),
                               flow.inference_sigmas(5, "diffusers", cfg.sample.shift, full, image_seq_len=64 * 64),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- sample folders and manifests


def run_folder(toy, out, **kw):
    settings = dict(prompts_source=str(toy["prompts"]), images_per_prompt=2, steps=2, guidance=2.0, seed=7,
                    batch_size=4, progress=False)
    return sample_folder.run(toy["loaded"], toy["entries"], out, **(settings | kw))


def test_a_sample_folder_at_width_x_height_records_both_and_refuses_another_size(toy, tmp_path):
    out = tmp_path / "wide"
    assert run_folder(toy, out, resolution=WIDE)["images"] == 6
    m = json.loads((out / "manifest.json").read_text())
    assert (m["resolution"], m["width"], m["height"]) == ("16x8", 16, 8)
    assert list(m).index("width") == list(m).index("resolution") + 1
    assert Image.open(out / "00000" / "samples" / "0001.png").size == (16, 8)
    assert run_folder(toy, out, resolution=WIDE)["skipped"] == 6               # a restart: nothing to do
    with pytest.raises(EvalError, match=r"resolution: folder has '16x8', this run '8x16'"):
        run_folder(toy, out, resolution=WIDE[::-1])


def test_a_square_folder_records_an_int_resolution_and_an_old_manifest_still_resumes(toy, tmp_path):
    out = tmp_path / "square"
    run_folder(toy, out)                                                   # data.resolution = 16
    m = json.loads((out / "manifest.json").read_text())
    assert (m["resolution"], m["width"], m["height"]) == (16, 16, 16) and type(m["resolution"]) is int
    old = {k: v for k, v in m.items() if k not in ("width", "height")}     # written before width / height
    (out / "manifest.json").write_text(json.dumps(old))
    (out / "00002" / "samples" / "0001.png").unlink()
    assert run_folder(toy, out, resolution=16)["images"] == 2              # resumed: the missing batch only
    assert run_folder(toy, out, resolution=(16, 16))["skipped"] == 6       # (16, 16) is the square 16
    with pytest.raises(EvalError, match=r"width: folder has 16, this run 8"):
        run_folder(toy, out, resolution=(8, 16))


def test_t2i_sample_resolution_wxh_end_to_end_and_geneval_copies_width_and_height(toy, tmp_path, capsys):
    from t2i.eval import geneval_folder

    out = tmp_path / "cli"
    assert cli.main(["sample", "--ckpt", str(toy["ckpt"]), "--prompts", str(toy["prompts"]), "--out", str(out),
                     "--images-per-prompt", "1", "--steps", "2", "--resolution", "16x8", *OVERRIDES]) == 0
    assert "[sample] resolution = 16x8 (command line)" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert (m["resolution"], m["width"], m["height"]) == ("16x8", 16, 8)
    assert Image.open(out / "00000" / "samples" / "0000.png").size == (16, 8)
    summary = geneval_folder.score(out, progress=False)
    assert {k: summary["sampling"][k] for k in ("resolution", "width", "height")} == {
        "resolution": "16x8", "width": 16, "height": 8}


# ---------------------------------------------------------------- sample grids


def old_save_grid(images, labels, path, cols=4, cell=160):
    """save_grid as it was before non-square images: every image resized to cell x cell."""
    import textwrap

    font = ImageFont.load_default(size=11)
    rows = (len(images) + cols - 1) // cols
    text_h = 44
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(to_pil(img).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(label, width=cell // 6)[:3]
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    sheet.save(path, format="PNG")


def test_square_images_render_exactly_as_before(tmp_path):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = [f"prompt number {i} with a fairly long caption that wraps" for i in range(6)]
    save_grid(images, labels, tmp_path / "new.png", cols=4, cell=40)
    old_save_grid(images, labels, tmp_path / "old.png", cols=4, cell=40)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "new.png")), np.asarray(Image.open(tmp_path / "old.png")))
    save_grid(list(images), labels, tmp_path / "list.png", cols=4, cell=40)   # a list: the same picture
    assert np.array_equal(np.asarray(Image.open(tmp_path / "list.png")), np.asarray(Image.open(tmp_path / "old.png")))


def test_images_of_two_sizes_in_one_grid_are_letterboxed_not_squashed(tmp_path):
    black = -torch.ones(3, 8, 16)                                          # 16 x 8 (w x h): wide
    tall = -torch.ones(3, 16, 8)                                           # 8 x 16: tall
    save_grid([black, tall], ["wide", "tall"], tmp_path / "g.png", cols=2, cell=40)
    sheet = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    wide_cell, tall_cell = sheet[:40, :40], sheet[:40, 40:80]
    assert (wide_cell[10:30] == 0).all() and (wide_cell[:10] == 255).all() and (wide_cell[30:] == 255).all()
    assert (tall_cell[:, 10:30] == 0).all() and (tall_cell[:, :10] == 255).all() and (tall_cell[:, 30:] == 255).all()


def test_t2i_eval_at_width_x_height_builds_its_reference_at_that_size_and_records_it(toy, tmp_path, capsys):
    from t2i.data.shapes import iter_samples
    from t2i.eval import fid

    real = tmp_path / "real"
    real.mkdir()
    for i, (_, image, _, _) in enumerate(iter_samples(8, 0, 32)):
        image.save(real / f"{i:03d}.png")
    out = tmp_path / "eval"
    assert cli.main(["eval", "--ckpt", f"toy={toy['ckpt']}", "--out", str(out), "--per-tag", "1",
                     "--images-per-prompt", "1", "--steps", "1", "--resolution", "16x8", "--fid-shards", str(real),
                     *OVERRIDES]) == 0
    assert "[eval] toy: resolution = 16x8 (command line)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for settings in (report["settings"], report["checkpoints"]["toy"]["settings"]):
        assert (settings["resolution"], settings["width"], settings["height"]) == ("16x8", 16, 8)
    assert fid.load_reference(out / "fid_ref.npz").meta["resolution"] == "16x8"
    result = report["checkpoints"]["toy"]["fid"]
    assert (result["resolution"], result["width"], result["height"]) == ("16x8", 16, 8)
    assert report["settings"]["fid_reference_meta"]["resolution"] == "16x8"
    assert ", 16x8 px, " in (out / "report.md").read_text()
    assert {k: json.loads((out / "toy" / "manifest.json").read_text())[k] for k in ("resolution", "width", "height")} \
        == {"resolution": "16x8", "width": 16, "height": 8}
    assert Image.open(out / "grid.png").format == "PNG"


def test_a_size_the_model_cannot_sample_is_refused_naming_the_flag(toy):
    from t2i.errors import ConfigError

    loaded = toy["loaded"]                                               # patch 4, grid 4 patches, factor 1
    with pytest.raises(ConfigError, match=r"--resolution 18x8: each side must be a multiple of 4 \(VAE downsampling 1 "
                                          r"x patch size 4\)"):
        plan(loaded, resolution=(18, 8), explicit=set())
    with pytest.raises(ConfigError, match=r"--resolution 20x8: a side of 20 px is past the model's positional grid "
                                          r"of 16 px"):
        plan(loaded, resolution=(20, 8), explicit=set())
    assert plan(loaded, resolution=(16, 8), explicit=set()).resolution == (16, 8)
