"""Every shipped config resolves (with its placeholder paths pointed at a folder of the right shape),
trains CFG's unconditional branch on at least 10 % of samples, the SD3.5 stage pairs (full and LoRA) differ in
the objective only, the LoRA stages differ from the full ones in their LoRA settings only, and the documented
SLURM commands name them and hand them to `t2i train` unchanged."""

import re

import pytest

from t2i.config import DEFAULT_CONFIG, load_config, to_dict

CONFIGS = sorted(DEFAULT_CONFIG.parent.rglob("*.yaml"))
PLACEHOLDER = re.compile(r"/path/to/[\w.-]+")


def _release_folder(tmp_path):
    """A folder with an SD3.5 release's subfolders (empty: resolving a config reads no weights)."""
    root = tmp_path / "sd35"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                "tokenizer_2", "tokenizer_3", "scheduler"):
        (root / sub).mkdir(parents=True)
    return root


def _chain_text(path) -> str:
    """The config and the files its `base:` chain names."""
    text = path.read_text()
    base = re.search(r"^base:\s*(\S+)", text, flags=re.M)
    return text + (_chain_text((path.parent / base.group(1)).resolve()) if base else "")


def _overrides(path, folder) -> list[str]:
    """The release-folder keys a config with placeholder paths needs (init_from only where it is set)."""
    text = _chain_text(path)
    if not PLACEHOLDER.search(text):
        return []
    keys = ["model.pretrained", "text.sd3_folder", "vae.path"] + ["train.init_from"] * ("init_from:" in text)
    return [f"{k}={folder}" for k in keys]


def test_every_config_is_found():
    names = {str(p.relative_to(DEFAULT_CONFIG.parent)) for p in CONFIGS}
    assert {"tiny-cpu.yaml", "sd3.5-medium-512.yaml", "sd3.5-large-1024.yaml", "stages/mixflow.yaml",
            "stages/control.yaml", "stages/sd3.5-medium-mixflow.yaml", "stages/sd3.5-medium-control.yaml",
            "stages/sd3.5-large-mixflow.yaml", "stages/sd3.5-large-control.yaml",
            "stages/sd3.5-medium-lora-mixflow.yaml", "stages/sd3.5-medium-lora-control.yaml",
            "stages/sd3.5-large-lora-mixflow.yaml", "stages/sd3.5-large-lora-control.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEFAULT_CONFIG.parent)))
def test_every_shipped_config_resolves(path, tmp_path):
    folder = _release_folder(tmp_path)
    cfg = load_config(path, _overrides(path, folder))
    if cfg.text.preset == "sd3":
        assert cfg.text.max_t5_tokens == 256 and cfg.text.clip_context == 77
        assert cfg.model.preset.startswith("sd3") and cfg.deepspeed.precision == "bf16"
    from t2i.models.geometry import check_geometry
    check_geometry(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEFAULT_CONFIG.parent)))
def test_every_shipped_config_drops_all_text_in_at_least_10_percent_of_samples(path, tmp_path):
    from t2i.caption_dropout import config_probabilities, unconditional_fraction

    cfg = load_config(path, _overrides(path, _release_folder(tmp_path)))
    p_all, (p_l, p_g, p_t5) = config_probabilities(cfg.text)
    implied = p_all + (1 - p_all) * p_l * p_g * p_t5          # the formula, written out independently
    assert unconditional_fraction(p_all, (p_l, p_g, p_t5)) == pytest.approx(implied)
    assert implied >= 0.10, (path.name, implied)


def _stage(name: str, folder) -> dict:
    paths = [f"{k}={folder}" for k in ("model.pretrained", "text.sd3_folder", "vae.path", "train.init_from")]
    return to_dict(load_config(DEFAULT_CONFIG.parent / "stages" / name, paths))


@pytest.mark.parametrize("lora", ["", "-lora"], ids=["full", "lora"])
@pytest.mark.parametrize("size,preset,resolution", [("medium", "sd3.5-medium", 512), ("large", "sd3.5-large", 1024)])
def test_the_sd35_stage_configs_differ_in_the_objective_only(size, preset, resolution, lora, tmp_path):
    folder = _release_folder(tmp_path)
    mix = _stage(f"sd3.5-{size}{lora}-mixflow.yaml", folder)
    control = _stage(f"sd3.5-{size}{lora}-control.yaml", folder)
    assert mix["model"]["preset"] == preset and mix["data"]["resolution"] == resolution
    assert mix["train"]["init_from"] == str(folder) and mix["train"]["timesteps"]["shift"] == 3.0
    assert mix["train"].pop("objective") == "mixflow" and control["train"].pop("objective") == "flow_matching"
    assert mix["run"].pop("name") == f"sd35-{size}{lora}-mixflow"
    assert control["run"].pop("name") == f"sd35-{size}{lora}-control"
    assert mix == control
    assert mix["lora"]["rank"] == (16 if lora else 0)


@pytest.mark.parametrize("size", ["medium", "large"])
@pytest.mark.parametrize("objective", ["mixflow", "control"])
def test_a_lora_stage_is_its_full_stage_with_rank_16_adapters_and_a_lora_learning_rate(size, objective, tmp_path):
    """Same data, steps, sigma sampling, gamma, batch, EMA, seed and ZeRO stage as the full stage; only lora.*,
    train.lr and run.name differ: rank 16, alpha = rank, the default targets on every block, lr 1e-4."""
    from t2i.config import LORA_TARGETS
    from t2i.models.lora import DEFAULT_TARGETS

    folder = _release_folder(tmp_path)
    full = _stage(f"sd3.5-{size}-{objective}.yaml", folder)
    lora = _stage(f"sd3.5-{size}-lora-{objective}.yaml", folder)
    assert lora["lora"] == {"rank": 16, "alpha": None, "targets": list(DEFAULT_TARGETS), "blocks": None,
                            "dropout": 0.0, "init": "gaussian"}
    assert lora["lora"]["targets"] == LORA_TARGETS
    assert full["lora"]["rank"] == 0  # the full stage trains every weight
    assert (full["train"]["lr"], lora["train"]["lr"]) == ((1.0e-5, 1.0e-4) if size == "medium" else (5.0e-6, 1.0e-4))
    assert lora["deepspeed"]["zero_stage"] == full["deepspeed"]["zero_stage"] == 2
    # a LoRA run needs its base: the release folder, loaded once (init_from = model.pretrained)
    assert lora["train"]["init_from"] == lora["model"]["pretrained"] == str(folder)
    assert lora["train"]["ema_decay"] == 0.9999 and lora["train"]["steps"] == 10000
    assert full["run"].pop("name") == f"sd35-{size}-{objective}"
    assert lora["run"].pop("name") == f"sd35-{size}-lora-{objective}"
    for cfg in (full, lora):
        cfg.pop("lora")
        cfg["train"].pop("lr")
    assert lora == full


def test_the_slurm_readme_commands_name_shipped_configs():
    readme = (DEFAULT_CONFIG.parent.parent / "slurm" / "README.md").read_text()
    named = set(re.findall(r"configs/[\w./-]+\.yaml", readme))
    assert {"configs/stages/sd3.5-medium-mixflow.yaml", "configs/stages/sd3.5-medium-control.yaml",
            "configs/stages/sd3.5-medium-lora-mixflow.yaml", "configs/stages/sd3.5-medium-lora-control.yaml",
            "configs/stages/sd3.5-large-lora-mixflow.yaml", "configs/stages/sd3.5-large-lora-control.yaml"} <= named
    assert all((DEFAULT_CONFIG.parent.parent / n).is_file() for n in named), named


@pytest.mark.parametrize("script,via", [("train.sbatch", "--config"), ("mixflow.sbatch", "--config"),
                                        ("mixflow.sbatch", "CONFIG")])
@pytest.mark.parametrize("stage", ["sd3.5-medium-lora-mixflow.yaml", "sd3.5-large-lora-control.yaml"])
def test_the_slurm_scripts_hand_a_lora_stage_to_t2i_train_unchanged(script, via, stage, tmp_path):
    """slurm/*.sbatch run as the batch shell would (no SLURM needed: `srun` and `scontrol` are stand-ins that
    record the rank command): the command each rank would exec resolves to the LoRA stage's config, with
    --auto-resume, whether the stage comes as `--config` (after mixflow.sbatch's own default) or as CONFIG=."""
    import os
    import subprocess
    import sys

    from t2i.cli import parse

    repo = DEFAULT_CONFIG.parent.parent
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$T2I_TEST_ARGV"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    config = f"configs/stages/{stage}"
    args = ["--config", config, "run.name=lora"] if via == "--config" else ["run.name=lora"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONFIG", "PARENT"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", T2I_ROOT=str(repo), T2I_VENV=sys.prefix,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node0", SLURM_NTASKS="8", T2I_TEST_ARGV=str(tmp_path / "argv"))
    if via == "CONFIG":
        env["CONFIG"] = config
    proc = subprocess.run(["bash", str(repo / "slurm" / script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "ranks exited with 0" in proc.stdout, proc.stdout + proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    command = argv[argv.index("t2i") + 1:]  # srun <options> bash -c '<rank env>' t2i <command>
    assert command[:4] == ["python", "-m", "t2i.cli", "train"]
    ns = parse(command[3:])
    assert ns.auto_resume and ns.config == config
    folder = _release_folder(tmp_path)
    paths = [f"{k}={folder}" for k in ("model.pretrained", "train.init_from")]
    resolved = to_dict(load_config(repo / ns.config, list(ns.overrides) + paths))
    assert resolved == to_dict(load_config(DEFAULT_CONFIG.parent / "stages" / stage, paths + ["run.name=lora"]))
    assert resolved["lora"]["rank"] == 16


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEFAULT_CONFIG.parent)))
def test_t2i_config_prints_every_shipped_config_as_shipped_and_names_the_paths_to_set(path, capsys):
    """Issue 14: before any path is filled in, `t2i config` prints the config; each placeholder left is a
    comment naming its key, and the keys model.pretrained implies follow it (they are not listed)."""
    import yaml

    from t2i.cli import main

    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model"]["preset"]  # still YAML: the notes are comments
    todo = [line for line in out.splitlines() if line.startswith("# TO SET: ")]
    if not PLACEHOLDER.search(_chain_text(path)):
        assert todo == []
        return
    keys = [line.split()[3].rstrip(":") for line in todo]
    assert keys == ["model.pretrained"] + ["train.init_from"] * ("init_from:" in _chain_text(path))
    assert "set this to your local SD3/SD3.5 folder" in todo[0]
    assert "# model.pretrained implies (set any of them to override): text.sd3_folder=/path/to/" in out


@pytest.mark.parametrize("name", ["sd3.5-medium-512.yaml", "stages/sd3.5-large-control.yaml",
                                  "stages/sd3.5-medium-lora-mixflow.yaml"])
def test_training_with_a_placeholder_is_a_one_line_error_naming_the_key(name):
    from helpers import run_t2i

    proc = run_t2i("train", "--config", f"configs/{name}", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.splitlines()[-1]  # (a library may warn on import, e.g. bitsandbytes without `kernels`)
    assert error.startswith("t2i train: ConfigError: model.pretrained: set this to your local SD3/SD3.5 "
                            "folder (e.g. /models/stable-diffusion-3.5-")
    assert [line for line in proc.stderr.splitlines() if "ConfigError" in line] == [error]
    assert ("also: train.init_from" in error) == ("stages" in name)
