"""A LoRA run from end to end on the release-shaped SD3.5 folder (tests/sd35_fixture.py): MixFlow LoRA training on
2 gloo ranks under ZeRO-1 (bf16, the shipped SD3.5-medium MixFlow stage with path overrides) -> `t2i ckpt export` ->
diffusers' StableDiffusion3Pipeline.load_lora_weights loads every adapter key -> the same image as t2i's sampler on
the run (the square sampler test's tolerance, tests/test_sd35.py) -> the same as the merged folder -> not the
base's. Then `t2i sample` / `t2i eval` / `t2i slowflow` on the run and `--lora FILE` on the base folder, with
manifests that record the base and the adapter's hash; and the base check: a changed base folder is refused."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import run_t2i
from t2i import cli
from t2i.checkpoint import loading, store
from t2i.checkpoint.lora_export import SIDECAR, WEIGHT_NAME, count_lora_keys, read_lora
from t2i.errors import CheckpointError
from t2i.eval import sampling
from t2i.eval.sampling import plan

pytestmark = pytest.mark.slow
PROMPTS = ["a photo of a red circle", "two cats left of a blue square"]
RANK, ALPHA = 4, 8  # alpha != rank: the export must carry alpha for diffusers to load the same adapter
SEED, STEPS = 5, 4
TOL = 1e-5  # tests/test_sd35.py: t2i's sampler vs StableDiffusion3Pipeline


@pytest.fixture(scope="module")
def lora_run(sd35_folder, tmp_path_factory):
    """2 bf16 MixFlow steps of a rank-4, alpha-8 LoRA on 2 gloo ranks under ZeRO-1, from the release-shaped folder;
    a high learning rate so that 2 steps move the adapters visibly away from their B = 0 start."""
    from conftest import write_sample_shards

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("lora_run")
    shards = write_sample_shards(tmp, 2, 8)
    run_t2i("train", "--nproc", 2, "--config", "configs/stages/sd3.5-medium-mixflow.yaml",
            f"model.pretrained={sd35_folder}", f"train.init_from={sd35_folder}", f"lora.rank={RANK}",
            f"lora.alpha={ALPHA}", "deepspeed.zero_stage=1", "train.lr=0.02", f"data.shards={shards[0]}::{shards[1]}",
            "data.resolution=64", "data.buckets=null", "data.min_size=0", "data.num_workers=0", "data.shuffle_buffer=4",
            "train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=1", "train.ckpt_every=2",
            "model.gradient_checkpointing=false", "logging.wandb=disabled", "validation.shards=null",
            "sample.steps=2", "sample.prompts=[a photo of a cat]", f"run.output_dir={tmp}", "run.name=lora",
            timeout=900)
    return tmp / "lora"


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert cli.main(["ckpt", "export", str(lora_run), "--out", str(out / "lora")]) == 0
    assert cli.main(["ckpt", "export", str(lora_run), "--out", str(out / "merged"), "--merge", "--pipeline"]) == 0
    return out / "lora", out / "merged"


def pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, p) -> torch.Tensor:
    noise = sampling.initial_noise(0, len(PROMPTS), SEED, (16, 8, 8), "cpu", torch.float32)  # t2i's noise
    return pipe(PROMPTS, latents=noise, num_inference_steps=p.steps, guidance_scale=p.guidance, height=64, width=64,
                max_sequence_length=256, output_type="pt").images


def test_the_run_trained_adapters_only_and_its_tag_records_the_base(lora_run, sd35_folder):
    log = (lora_run / "train.log").read_text()
    assert "ZeRO-1" in log and f"LoRA rank {RANK} (alpha {ALPHA:g}): 19 modules" in log
    meta = store.read_meta(lora_run / "checkpoints", "step00000002")
    assert meta["world_size"] == 2 and meta["zero_stage"] == 1
    assert meta["config"]["train"]["objective"] == "mixflow"
    assert meta["lora"]["base"] == str(sd35_folder.resolve()) and len(meta["lora"]["base_sha256"]) == 64
    assert (lora_run / "samples" / "step00000002.png").is_file()  # the final grid, from base + EMA adapters
    # the optimizer held the adapters only: DeepSpeed's fp32 partitions put together are the 38 adapter tensors,
    # the parameter count the log states (the base stayed in bf16, outside the optimizer)
    raw = store.load_weights(lora_run / "checkpoints", "step00000002", ema=False)
    adapters = {k: t for k, t in raw.items() if ".lora_" in k}
    assert len(adapters) == 38 and sum(t.numel() for t in adapters.values()) == 2432
    assert "2,432 adapter parameters" in log
    assert not [k for k in raw if ".lora_" not in k]  # no base weight, no buffer


def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run, exported):
    """train.init_from a LoRA run: the base with the adapters folded in, what `t2i ckpt export --merge` writes."""
    from t2i.config import load_config
    from t2i.models.mmdit import load_pretrained
    from t2i.checkpoint.parents import init_from_parent

    model = load_pretrained(str(exported[1]))  # the merged folder's architecture; its weights are overwritten
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    parent = init_from_parent(model, load_config(overrides=[f"train.init_from={lora_run}"]))
    assert parent["kind"] == "checkpoint" and parent["step"] == 2
    merged = load_pretrained(str(exported[1])).state_dict()
    for k, t in model.state_dict().items():
        assert torch.equal(t, merged[k]), k


def test_diffusers_loads_every_key_and_draws_t2is_image_the_merged_folders_and_not_the_bases(
        lora_run, exported, sd35_folder):
    lora_dir, merged = exported
    state, config = read_lora(lora_dir)
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    side = json.loads((lora_dir / SIDECAR).read_text())
    meta = store.read_meta(lora_run / "checkpoints", "step00000002")
    assert side["provenance"]["base_sha256"] == meta["lora"]["base_sha256"] and side["provenance"]["step"] == 2
    with safe_open(str(lora_dir / WEIGHT_NAME), "pt") as f:
        n_keys = len(list(f.keys()))
    assert n_keys == len(state) == 38  # 19 modules x (A, B): attn + attn2 of the dual-attention blocks

    # EMA adapters on the recorded base, hash-checked. The run's text encoders run in bf16 (text.dtype of the
    # SD3.5 configs); diffusers' pipeline here runs them in fp32, so the comparison builds them in fp32
    import dataclasses

    from t2i.config import from_dict
    from t2i.models.build import build_frozen
    cfg = from_dict(meta["config"])
    text, vae = build_frozen(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dtype="float32")))
    loaded = loading.load(lora_run, text=text, vae=vae)
    assert loaded.lora["base_sha256"] == meta["lora"]["base_sha256"] and loaded.lora["modules"] == 19
    p = plan(loaded, steps=STEPS, explicit=set())  # the folder's guidance, shift and diffusers grid
    ours = ((sampling.generate(loaded.model, loaded.text, loaded.vae, PROMPTS, resolution=p.resolution, steps=p.steps,
                               guidance=p.guidance, sigmas=p.sigmas, seed=SEED) + 1) / 2).clamp(0, 1)

    pipe = pipeline(sd35_folder)
    base = diffusers_images(pipe, p)
    pipe.load_lora_weights(lora_dir)
    assert count_lora_keys(pipe) == n_keys  # every key arrived (diffusers#9950: a load can bring none)
    (_, cfg), = pipe.transformer.peft_config.items()
    assert (cfg.r, cfg.lora_alpha) == (RANK, ALPHA)
    theirs = diffusers_images(pipe, p)
    fused = diffusers_images(pipeline(merged), p)
    print(f"LoRA vs t2i {(theirs - ours).abs().max().item():.2e}, vs merged {(theirs - fused).abs().max().item():.2e}"
          f", vs base {(theirs - base).abs().max().item():.2e}")
    assert float(ours.std()) > 0.02
    assert (theirs - ours).abs().max().item() <= TOL
    assert (fused - ours).abs().max().item() <= TOL
    assert (theirs - base).abs().max().item() > 1e-2  # the adapter changed the image


def test_sample_eval_and_slowflow_on_the_run_and_lora_file_on_the_base_record_base_and_adapter(
        lora_run, exported, sd35_folder, tmp_path):
    lora_dir, _ = exported
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--prompts", str(tmp_path / "p.txt"), "--images-per-prompt", "1", "--steps", "2"]
    assert cli.main(["sample", "--ckpt", str(lora_run), "--out", str(tmp_path / "run"), *common]) == 0
    assert cli.main(["sample", "--ckpt", str(sd35_folder), "--lora", str(lora_dir), "--out", str(tmp_path / "file"),
                     *common]) == 0
    by_run, by_file = (json.loads((tmp_path / k / "manifest.json").read_text())["lora"] for k in ("run", "file"))
    meta = store.read_meta(lora_run / "checkpoints", "step00000002")
    # the same adapter tensors and the same base, whichever way they arrived
    assert by_run["adapter_sha256"] == by_file["adapter_sha256"]
    assert by_run["base_sha256"] == by_file["base_sha256"] == meta["lora"]["base_sha256"]
    assert by_file["adapter_file_sha256"] == json.loads((lora_dir / SIDECAR).read_text())["sha256"]
    assert by_run["adapter"].endswith("step00000002 (ema)") and (by_run["rank"], by_run["alpha"]) == (RANK, ALPHA)

    out = tmp_path / "eval"
    assert cli.main(["eval", "--ckpt", f"run={lora_run}", "--ckpt", f"file={sd35_folder}", "--lora", f"file={lora_dir}",
                     "--out", str(out), "--per-tag", "1", "--images-per-prompt", "1", "--steps", "1",
                     "--batch-size", "8"]) == 0
    rows = json.loads((out / "report.json").read_text())["checkpoints"]
    assert rows["run"]["lora"]["adapter_sha256"] == rows["file"]["lora"]["adapter_sha256"] == by_run["adapter_sha256"]

    from pipelines import slowflow
    results = slowflow.main(["--ckpt", f"lora={lora_run}", "--steps", "2", "--n", "2", "--ref-steps", "0",
                             "--guidance", "1", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "sf")])
    assert set(results["lora"]) == {2}


def test_a_changed_base_folder_is_refused_naming_both_hashes(lora_run, sd35_folder, tmp_path):
    """The run records its base by content hash: a base folder whose transformer changed is refused on sampling,
    and so is a base that is gone; --lora on a wrong model is refused naming the module."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "sd35"
    shutil.copytree(sd35_folder, copy)
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    for tag_meta in (run / "checkpoints").glob("*/meta.json"):
        meta = json.loads(tag_meta.read_text())
        meta["config"]["train"]["init_from"] = meta["config"]["model"]["pretrained"] = str(copy)
        for key in ("sd3_folder",):
            meta["config"]["text"][key] = str(copy)
        meta["config"]["vae"]["path"] = str(copy)
        tag_meta.write_text(json.dumps(meta))
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"the base rebuilt from .* has sha256 [0-9a-f]{64}, not the "
                                              r"[0-9a-f]{64} the LoRA run trained on"):
        loading.load(run)
    shutil.rmtree(copy)
    with pytest.raises(CheckpointError, match="the base of this LoRA run is gone"):
        loading.load(run)


def test_an_adapter_of_another_model_is_refused(exported):
    from t2i.checkpoint.parents import apply_file
    from t2i.config import load_config
    from t2i.models.build import build_for, build_frozen

    cfg = load_config()
    tiny = build_for(cfg, *build_frozen(cfg))  # the tiny CPU model: no attn2, other widths
    with pytest.raises(CheckpointError, match=r"--lora .*: \d+ of its 19 modules are not in the model|does not fit"):
        apply_file(tiny, exported[0])


def test_export_options_that_do_not_apply_to_an_adapter_file_are_refused(lora_run, tmp_path, capsys):
    assert cli.main(["ckpt", "export", str(lora_run), "--out", str(tmp_path / "x"), "--pipeline"]) == 2
    assert "it exports as an adapter file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["ckpt", "export", str(lora_run), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    side = json.loads((tmp_path / "raw" / SIDECAR).read_text())
    assert side["provenance"]["weights"] == "raw" and side["tensors"] == 38
