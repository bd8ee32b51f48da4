"""A release-shaped SD3.5-medium folder (tests/sd35_fixture.py): the example config loads it with path edits
only, `t2i sample` picks its defaults from the folder and samples on diffusers' grid, its images equal
StableDiffusion3Pipeline's for the same noise, and a bf16 model gets its timestep in fp32."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import REPO
from sd35_fixture import RESOLUTION
from t2i import cli, flow
from t2i.checkpoint import loading
from t2i.config import load_config
from t2i.errors import ConfigError
from t2i.eval import sampling
from t2i.eval.sampling import model_family, plan, sample_batch

PROMPTS = ["a photo of a red circle", "two cats left of a blue square"]


@pytest.fixture(scope="module")
def loaded(sd35_folder):
    torch.set_num_threads(2)
    return loading.load_any(sd35_folder, load_config(None))


def test_the_fixture_has_the_release_files_dtypes_and_config_keys(sd35_folder):
    root = sd35_folder
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["tokenizer_3"][1] == "T5TokenizerFast"
    for sub in ("tokenizer", "tokenizer_2"):
        assert {p.name for p in (root / sub).iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert (root / "tokenizer_3" / "tokenizer.json").is_file()
    shards = json.loads((root / "text_encoder_3" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 2 and not (root / "text_encoder_3" / "model.safetensors").exists()
    for sub, name in [("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors"),
                      ("text_encoder_3", sorted(set(shards.values()))[0]),
                      ("transformer", "diffusion_pytorch_model.safetensors"),
                      ("vae", "diffusion_pytorch_model.safetensors")]:
        with safe_open(str(root / sub / name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, sub
    t = json.loads((root / "transformer" / "config.json").read_text())
    assert t["dual_attention_layers"] and t["qk_norm"] == "rms_norm" and t["in_channels"] == 16
    v = json.loads((root / "vae" / "config.json").read_text())
    assert (v["latent_channels"], v["scaling_factor"], v["shift_factor"]) == (16, 1.5305, 0.0609)
    s = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert (s["_class_name"], s["shift"]) == ("FlowMatchEulerDiscreteScheduler", 3.0)
    t5 = json.loads((root / "text_encoder_3" / "config.json").read_text())
    assert t5["feed_forward_proj"] == "gated-gelu"


def test_the_sd35_example_config_loads_the_folder_with_path_edits_only(sd35_folder, tmp_path, capsys):
    from t2i.models.build import build_for, build_frozen
    from t2i.models.geometry import check_geometry

    text = (REPO / "configs" / "sd3.5-medium-512.yaml").read_text()
    assert text.count("/path/to/stable-diffusion-3.5-medium") == 1  # model.pretrained implies the rest
    path = tmp_path / "sd35.yaml"
    path.write_text(text.replace("/path/to/stable-diffusion-3.5-medium", str(sd35_folder)))
    assert cli.main(["config", "--config", str(path)]) == 0
    assert str(sd35_folder) in capsys.readouterr().out
    # The shipped buckets (up to 640 px at 512^2) fit SD3.5-medium's grid (384 patches = 6144 px), not the
    # fixture's 16 patches (256 px): refused before start-up, naming the bucket; the square crop fits.
    with pytest.raises(ConfigError, match=r"data.buckets: bucket 384x640 has a side of 640 px, past the model's "
                                          r"positional grid of 256 px"):
        check_geometry(load_config(path))
    cfg = load_config(path, ["data.buckets=null"])
    check_geometry(cfg)
    text_enc, vae = build_frozen(cfg)
    model = build_for(cfg, text_enc, vae)
    assert (text_enc.context_dim, text_enc.pooled_dim, vae.latent_channels, vae.downsample) == (32, 32, 16, 8)
    assert model.config.dual_attention_layers == (0,) or list(model.config.dual_attention_layers) == [0]
    ctx, pooled = text_enc.encode(["a photo of a cat"])
    assert ctx.shape == (1, 77 + 256, 32) and pooled.shape == (1, 32) and ctx.dtype == torch.bfloat16


def test_without_a_config_the_folder_gives_resolution_shift_and_the_model_card_row(loaded, sd35_folder):
    p = plan(loaded, explicit=set())
    assert (p.steps, p.guidance, p.shift, p.resolution, p.grid, p.model) == (40, 4.5, 3.0, RESOLUTION,
                                                                            "diffusers", "sd3.5-medium")
    assert p.sources["steps"] == p.sources["guidance"] == "model-card default for sd3.5-medium"
    assert p.sources["shift"].endswith("scheduler/scheduler_config.json")
    assert "sample_size" in p.sources["resolution"] and p.sources["grid"].startswith("auto")
    torch.testing.assert_close(p.sigmas, flow.diffusers_sigmas(40, {"shift": 3.0}), rtol=0, atol=0)
    # flags beat everything; a key the user set (override or --config) beats the folder
    p = plan(loaded, steps=6, guidance=2.0, explicit={"sample.shift", "sample.sigmas", "data.resolution"})
    assert (p.steps, p.guidance, p.shift, p.resolution, p.grid) == (6, 2.0, 1.0, 32, "diffusers")
    assert p.sources["steps"] == "command line" and "sample.shift" in p.sources["shift"]
    loaded.cfg.sample.sigmas = "t2i"
    try:
        p = plan(loaded, explicit=None)  # --config given: all from it
        assert (p.steps, p.guidance, p.grid) == (30, 3.0, "t2i")
        torch.testing.assert_close(p.sigmas, flow.sampling_sigmas(30, 1.0), rtol=0, atol=0)
    finally:
        loaded.cfg.sample.sigmas = "auto"


def test_the_model_row_is_picked_from_the_transformer_config():
    assert model_family({"dual_attention_layers": [0, 1], "num_layers": 24, "qk_norm": "rms_norm"}) == "sd3.5-medium"
    assert model_family({"dual_attention_layers": [], "num_layers": 38, "qk_norm": "rms_norm"}) == "sd3.5-large"
    assert model_family({"dual_attention_layers": [], "num_layers": 24, "qk_norm": None}) == "sd3-medium"
    assert model_family({"num_layers": 4, "qk_norm": "rms_norm"}) is None
    assert sampling.MODEL_DEFAULTS["sd3.5-medium"] == {"steps": 40, "guidance": 4.5}
    assert sampling.MODEL_DEFAULTS["sd3.5-large"] == {"steps": 28, "guidance": 3.5}
    assert sampling.MODEL_DEFAULTS["sd3-medium"] == {"steps": 28, "guidance": 7.0}
    assert sampling.PIPELINE_DEFAULTS == {"steps": 28, "guidance": 7.0}


def test_images_equal_stable_diffusion3_pipeline_for_the_same_noise(loaded, sd35_folder):
    from diffusers import StableDiffusion3Pipeline

    p = plan(loaded, steps=6, explicit=set())  # the folder's guidance (4.5), shift and grid
    noise = torch.randn(len(PROMPTS), 16, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = sample_batch(loaded.model, loaded.text, PROMPTS, noise, p.sigmas, p.guidance)
    ours = ((loaded.vae.decode(latents) + 1) / 2).clamp(0, 1)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=p.steps, guidance_scale=p.guidance,
                  height=p.resolution, width=p.resolution, max_sequence_length=256, output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas, p.sigmas, rtol=0, atol=0)
    assert ours.shape == theirs.shape and float(ours.std()) > 0.02
    assert (ours - theirs).abs().max().item() <= 1e-5


# 1216x832 (aspect 19:13 = 1.46) at the fixture's scale: sides in steps of VAE factor 8 x patch 2 = 16 px, within
# the fixture's 16-token pos_embed grid (256 px). 19 x 13 tokens would not fit; 13 x 9 (1.44) is the nearest aspect
# of odd token counts, so the positional crop is off-centre by half a token on each axis as in the release's.
WIDE = (208, 144)


def test_non_square_images_equal_stable_diffusion3_pipeline_at_that_height_and_width(loaded, sd35_folder):
    from diffusers import StableDiffusion3Pipeline

    width, height = WIDE
    pos = loaded.model.config.pos_embed_max_size * loaded.model.config.patch_size * loaded.vae.downsample
    assert width % 16 == height % 16 == 0 and max(width, height) <= pos and abs(width / height - 1216 / 832) < 0.02
    p = plan(loaded, steps=6, resolution=(width, height), explicit=set())  # the folder's guidance, shift, grid
    assert (p.resolution, p.width, p.height, p.sources["resolution"]) == ((width, height), width, height,
                                                                          "command line")
    assert "resolution = 208x144 (command line)" in p.describe()
    images = sampling.generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=p.resolution,
                               steps=p.steps, guidance=p.guidance, sigmas=p.sigmas, seed=5)
    ours = ((images + 1) / 2).clamp(0, 1)
    noise = sampling.initial_noise(0, len(PROMPTS), 5, (16, height // 8, width // 8), "cpu", torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35_folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, latents=noise, num_inference_steps=p.steps, guidance_scale=p.guidance,
                  height=height, width=width, max_sequence_length=256, output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas, p.sigmas, rtol=0, atol=0)
    assert ours.shape == theirs.shape == (len(PROMPTS), 3, height, width) and float(ours.std()) > 0.02
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_t2i_sample_records_the_grid_the_scheduler_and_where_each_setting_came_from(sd35_folder, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    out = tmp_path / "out"
    assert cli.main(["sample", "--ckpt", str(sd35_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                     "--images-per-prompt", "1", "--steps", "2"]) == 0
    log = capsys.readouterr().out
    assert "guidance = 4.5 (model-card default for sd3.5-medium)" in log and "grid = diffusers" in log
    m = json.loads((out / "manifest.json").read_text())
    assert (m["steps"], m["guidance"], m["shift"], m["resolution"], m["grid"], m["model"]) == (
        2, 4.5, 3.0, RESOLUTION, "diffusers", "sd3.5-medium")
    assert m["sigmas"] == flow.diffusers_sigmas(2, {"shift": 3.0}).tolist()
    assert m["scheduler"]["shift"] == 3.0 and m["scheduler"]["use_dynamic_shifting"] is False
    assert m["sources"]["steps"] == "command line"
    assert (out / "00000" / "samples" / "0000.png").is_file()


def test_a_bf16_model_receives_the_timestep_in_fp32(loaded):
    model = loaded.model
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["timestep"].clone()),
                                           with_kwargs=True)
    model.to(torch.bfloat16)
    try:
        sigmas = flow.diffusers_sigmas(3, {"shift": 3.0})
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        out = sample_batch(model, loaded.text, PROMPTS[:1], noise, sigmas, 4.5)
    finally:
        hook.remove()
        model.to(torch.float32)
    assert out.dtype == torch.bfloat16 and len(seen) == 3
    assert all(t.dtype == torch.float32 for t in seen)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), 1000.0 * sigmas[:3], rtol=0, atol=0)
    assert (1000.0 * sigmas[1]).to(torch.bfloat16).float() != 1000.0 * sigmas[1]  # bf16 would have moved it


def test_t2i_eval_of_the_folder_reports_each_checkpoints_settings_and_sources(sd35_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--ckpt", f"sd35={sd35_folder}", "--out", str(out), "--per-tag", "1",
                     "--images-per-prompt", "1", "--steps", "1", "--batch-size", "8"]) == 0
    assert "[eval] sd35: guidance = 4.5 (model-card default for sd3.5-medium)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    row = report["checkpoints"]["sd35"]["settings"]
    assert (row["steps"], row["guidance"], row["shift"], row["resolution"], row["sigmas"], row["model"]) == (
        1, 4.5, 3.0, RESOLUTION, "diffusers", "sd3.5-medium")
    assert row["sources"]["steps"] == "command line"
    assert "on the diffusers sigma grid" in (out / "report.md").read_text()
    assert json.loads((out / "sd35" / "manifest.json").read_text())["sigmas"] == [1.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("config", [f"{stage}sd3.5-{size}{suffix}" for size, base in (("medium", "-512.yaml"),
                                                                               ("large", "-1024.yaml"))
                                    for stage, suffix in (("", base), ("stages/", "-mixflow.yaml"),
                                                          ("stages/", "-control.yaml"))])
def test_each_shipped_sd35_stage_trains_two_bf16_steps_on_the_release_shaped_folder(sd35_folder, make_shards,
                                                                                    tmp_path, config):
    """The shipped configs with path overrides only (model.pretrained, and train.init_from for a stage; plus a
    CPU-sized batch and no live evaluation), on multi-aspect data: the configs' buckets scaled to the fixture's
    64 px (area 64^2 in steps of 16: 48x80, 64x64, 80x48) train through the real VAE and the SD3.5 MMDiT."""
    from helpers import losses, run_t2i

    shards = make_shards(n_shards=2, per_shard=4, sizes=[(16, 16), (24, 16)])
    paths = [f"model.pretrained={sd35_folder}"]  # it implies text.sd3_folder and vae.path (t2i/sd3_folder.py)
    if "stages/" in config:
        paths.append(f"train.init_from={sd35_folder}")
    run_t2i("train", "--config", f"configs/{config}", *paths, f"data.shards={shards[0]}::{shards[1]}",
            "data.resolution=64", "data.buckets={area: 4096, step: 16}", "data.min_size=0", "data.num_workers=0",
            "data.shuffle_buffer=4", "train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=1", "train.ckpt_every=2",
            "model.gradient_checkpointing=false", "logging.wandb=disabled", "validation.shards=null",
            "sample.steps=2", "sample.prompts=[a photo of a cat]", f"run.output_dir={tmp_path}", "run.name=r",
            timeout=900)
    cfg_text = (tmp_path / "r" / "config.yaml").read_text()
    assert "precision: bf16" in cfg_text and "dtype: bfloat16" in cfg_text
    values = losses(tmp_path / "r")
    assert len(values) == 2 and all(v == v and v < 100 for v in values)  # finite
    last = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    accum = 2 if "large" in config else 1  # (the large configs accumulate 2 micro-batches)
    assert sum(last["images_per_bucket"].values()) == 2 * 2 * accum
    assert set(last["images_per_bucket"]) == {"48x80", "64x64", "80x48"}
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step00000002"
