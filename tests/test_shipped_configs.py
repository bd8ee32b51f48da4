"""Every shipped config resolves (with its placeholder paths pointed at a folder of the right shape),
trains CFG's unconditional branch on at least 10 % of samples, the SD3.5 stage pairs differ in the
objective only, and the documented SLURM commands name them."""

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
            "stages/sd3.5-large-mixflow.yaml", "stages/sd3.5-large-control.yaml"} <= names


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


@pytest.mark.parametrize("size,preset,resolution", [("medium", "sd3.5-medium", 512), ("large", "sd3.5-large", 1024)])
def test_the_sd35_stage_configs_differ_in_the_objective_only(size, preset, resolution, tmp_path):
    folder = _release_folder(tmp_path)
    paths = [f"{k}={folder}" for k in ("model.pretrained", "text.sd3_folder", "vae.path", "train.init_from")]
    stages = DEFAULT_CONFIG.parent / "stages"
    mix = to_dict(load_config(stages / f"sd3.5-{size}-mixflow.yaml", paths))
    control = to_dict(load_config(stages / f"sd3.5-{size}-control.yaml", paths))
    assert mix["model"]["preset"] == preset and mix["data"]["resolution"] == resolution
    assert mix["train"]["init_from"] == str(folder) and mix["train"]["timesteps"]["shift"] == 3.0
    assert mix["train"].pop("objective") == "mixflow" and control["train"].pop("objective") == "flow_matching"
    assert mix["run"].pop("name") == f"sd35-{size}-mixflow" and control["run"].pop("name") == f"sd35-{size}-control"
    assert mix == control


def test_the_slurm_readme_commands_name_shipped_configs():
    readme = (DEFAULT_CONFIG.parent.parent / "slurm" / "README.md").read_text()
    named = set(re.findall(r"configs/[\w./-]+\.yaml", readme))
    assert {"configs/stages/sd3.5-medium-mixflow.yaml", "configs/stages/sd3.5-medium-control.yaml"} <= named
    assert all((DEFAULT_CONFIG.parent.parent / n).is_file() for n in named), named


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


@pytest.mark.parametrize("name", ["sd3.5-medium-512.yaml", "stages/sd3.5-large-control.yaml"])
def test_training_with_a_placeholder_is_a_one_line_error_naming_the_key(name):
    from helpers import run_t2i

    proc = run_t2i("train", "--config", f"configs/{name}", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.splitlines()[-1]  # (a library may warn on import, e.g. bitsandbytes without `kernels`)
    assert error.startswith("t2i train: ConfigError: model.pretrained: set this to your local SD3/SD3.5 "
                            "folder (e.g. /models/stable-diffusion-3.5-")
    assert [line for line in proc.stderr.splitlines() if "ConfigError" in line] == [error]
    assert ("also: train.init_from" in error) == ("stages" in name)
