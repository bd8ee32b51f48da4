"""Config: strict YAML -> dataclasses, overrides, clear errors, the resolved config round-trips."""

import pytest
import yaml

from t2i.config import DEFAULT_CONFIG, Config, from_dict, load_config, save_config, to_dict
from t2i.errors import ConfigError


def test_the_embedded_default_loads_and_is_the_tiny_cpu_setup():
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "tiny-cpu.yaml"
    assert (cfg.model.preset, cfg.vae.kind, cfg.text.preset, cfg.deepspeed.zero_stage) == ("tiny", "identity", "tiny", 2)
    assert cfg.data.shards == "data/shapes/shapes-{000000..000007}.tar"


def test_every_key_of_the_schema_is_spelled_out_in_the_tiny_yaml():
    def leaves(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and v and not k in ("kwargs", "extra"):
                out |= leaves(v, prefix + k + ".")
            else:
                out.add(prefix + k)
        return out
    assert leaves(yaml.safe_load(DEFAULT_CONFIG.read_text())) == leaves(to_dict(Config()))


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'\?"):
        load_config(overrides=["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"'ema_decay'.*did you mean 'train.ema_decay'"):
        from_dict({"ema_decay": 0.9})                       # right leaf, wrong section
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        from_dict({"trian": {}})


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"config key 'train.steps' expects int, got 'ten' \(str\)"):
        load_config(overrides=["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"'train.lr' expects float, got True \(bool\)"):
        load_config(overrides=["train.lr=true"])
    with pytest.raises(ConfigError, match=r"'model.pretrained' expects str or null"):
        load_config(overrides=["model.pretrained=3"])
    with pytest.raises(ConfigError, match=r"section 'train' must be a mapping"):
        from_dict({"train": 5})


def test_overrides_are_parsed_as_yaml_and_win_over_the_file():
    cfg = load_config(overrides=["train.steps=7", "train.lr=2e-4", "logging.wandb=disabled",
                                 "data.shards=[a.tar, b.tar]", "model.kwargs={num_layers: 2}"])
    assert (cfg.train.steps, cfg.train.lr, cfg.logging.wandb) == (7, 2e-4, "disabled")
    assert cfg.data.shards == ["a.tar", "b.tar"] and cfg.model.kwargs == {"num_layers": 2}
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["train.steps"])


def test_invalid_values_fail_with_the_key():
    for override, pattern in [("deepspeed.zero_stage=4", r"deepspeed.zero_stage must be one of \[1, 2, 3\]"),
                              ("train.mixflow_gamma=1.5", r"train.mixflow_gamma must be in \[0, 1\]"),
                              ("vae.kind=pretrained", r"vae.kind=pretrained needs vae.path"),
                              ("text.dropout_t5=-0.1", r"text.dropout_t5"),
                              ("train.timesteps.kind=cosine", r"train.timesteps.kind must be one of")]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(overrides=[override])


def test_resolved_config_round_trips_through_the_run_folder_file(tmp_path):
    cfg = load_config(overrides=["train.steps=11", "run.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_the_gpu_example_config_is_valid(tmp_path):
    """It loads with its placeholder path (so `t2i config` can show it); using it is refused, naming the key."""
    from t2i.models.geometry import check_geometry

    placeholder = load_config(DEFAULT_CONFIG.parent / "sd3.5-medium-512.yaml")
    with pytest.raises(ConfigError, match="^model.pretrained: set this to your local SD3/SD3.5 folder"):
        check_geometry(placeholder)
    folder = tmp_path / "sd35"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
        (folder / sub).mkdir(parents=True)
    cfg = load_config(DEFAULT_CONFIG.parent / "sd3.5-medium-512.yaml", [f"model.pretrained={folder}"])
    assert (cfg.model.preset, cfg.text.preset, cfg.vae.kind, cfg.deepspeed.precision) == \
        ("sd3.5-medium", "sd3", "pretrained", "bf16")
    assert cfg.text.sd3_folder == cfg.vae.path == str(folder)


def test_a_config_can_state_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "stage.yaml").write_text(f"base: {DEFAULT_CONFIG}\ntrain:\n  steps: 5\n  timesteps: {{shift: 3.0}}\n")
    cfg = load_config(tmp_path / "stage.yaml")
    assert (cfg.train.steps, cfg.train.timesteps.shift, cfg.train.timesteps.kind) == (5, 3.0, "auto")
    assert cfg.sample == load_config().sample
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
