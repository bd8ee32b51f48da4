"""Issue 14 item 5: `model.pretrained=<SD3/SD3.5 folder>` alone gives its text encoders, VAE and scheduler
(each still overridable), and a folder lacking a part is one line naming the subfolder, before any
from_pretrained (which would read the missing path as a hub repo id)."""

import os

import pytest
import torch

from t2i import cli
from t2i.checkpoint.loading import read_scheduler_config
from t2i.config import DEFAULT_CONFIG, load_config
from t2i.errors import ConfigError
from t2i.eval.sampling import config_sigmas
from t2i.sd3_folder import LAYOUT

SD35 = DEFAULT_CONFIG.parent / "sd3.5-medium-512.yaml"


def partial_copy(src, dst, leave_out=(), empty=()):
    """The release-shaped folder by symlinks, without the parts in `leave_out` and with those in `empty`
    present but empty."""
    dst.mkdir()
    for entry in os.listdir(src):
        if entry in leave_out:
            continue
        if entry in empty:
            (dst / entry).mkdir()
        else:
            os.symlink(src / entry, dst / entry)
    return dst


def test_one_key_resolves_the_same_text_vae_and_scheduler_as_the_three_keys(sd35_folder):
    f = str(sd35_folder)
    one = load_config(SD35, [f"model.pretrained={f}"])
    three = load_config(SD35, [f"model.pretrained={f}", f"text.sd3_folder={f}", f"vae.path={f}"])
    assert one == three
    assert (one.text.preset, one.text.sd3_folder, one.text.clip_context, one.text.max_t5_tokens) == ("sd3", f, 77, 256)
    assert (one.vae.kind, one.vae.path) == ("pretrained", f)
    assert read_scheduler_config(one.model.pretrained) == read_scheduler_config(three.model.pretrained)
    torch.testing.assert_close(config_sigmas(one, latent_size=8), config_sigmas(three, latent_size=8), rtol=0, atol=0)
    # without any config file: the folder gives everything, the scheduler's shift included
    bare = load_config(None, [f"model.pretrained={f}"])
    spelled = load_config(None, [f"model.pretrained={f}", "text.preset=sd3", f"text.sd3_folder={f}",
                                 "text.clip_context=77", "text.max_t5_tokens=256", "vae.kind=pretrained",
                                 f"vae.path={f}", "sample.shift=3.0", "train.timesteps.shift=3.0"])
    assert bare == spelled and bare.sample.shift == bare.train.timesteps.shift == 3.0
    assert bare.sample.guidance_interval == [0.0, 1.0]  # the pipeline guides every step, not the toy's sigma <= 0.4


def test_what_the_config_sets_wins_over_what_the_folder_implies(sd35_folder):
    f = str(sd35_folder)
    cfg = load_config(None, [f"model.pretrained={f}", "text.preset=tiny", "vae.kind=identity", "sample.shift=1.5",
                             "sample.guidance_interval=[0.1, 0.7]"])
    assert (cfg.text.preset, cfg.text.sd3_folder, cfg.vae.kind, cfg.vae.path) == ("tiny", None, "identity", None)
    assert (cfg.sample.shift, cfg.train.timesteps.shift, cfg.sample.guidance_interval) == (1.5, 3.0, [0.1, 0.7])
    # a bare transformer folder implies nothing
    cfg = load_config(None, [f"model.pretrained={sd35_folder / 'transformer'}"])
    assert (cfg.text.preset, cfg.vae.kind, cfg.sample.shift) == ("tiny", "identity", 1.0)


def test_the_one_key_config_builds_the_folders_encoders(sd35_folder):
    from t2i.models.build import build_frozen
    text, vae = build_frozen(load_config(None, [f"model.pretrained={sd35_folder}", "text.dtype=float32"]))
    assert (text.context_dim, text.pooled_dim, vae.latent_channels, vae.downsample) == (32, 32, 16, 8)


def test_a_folder_without_a_part_is_one_line_naming_the_subfolder(sd35_folder, tmp_path, capsys):
    broken = partial_copy(sd35_folder, tmp_path / "no-t5", leave_out=("text_encoder_3",))
    expected = (f"model.pretrained={broken}: no text_encoder_3/ (T5) in {broken}; an SD3/SD3.5 folder has "
                f"{LAYOUT}")
    with pytest.raises(ConfigError) as e:
        load_config(SD35, [f"model.pretrained={broken}"])
    assert str(e.value) == expected
    assert cli.main(["config", f"model.pretrained={broken}"]) == 2
    assert capsys.readouterr().err == f"t2i config: ConfigError: {expected}\n"
    # sampling the folder directly: the same check, naming the flag
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    assert cli.main(["sample", "--ckpt", str(broken), "--prompts", str(tmp_path / "p.txt"), "--out",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"--ckpt={broken}: no text_encoder_3/ (T5) in {broken}; an SD3/SD3.5 folder has {LAYOUT}\n")
    assert "Repo id" not in err and err.count("\n") == 1
    no_vae = partial_copy(sd35_folder, tmp_path / "no-vae", leave_out=("vae",))
    with pytest.raises(ConfigError, match=rf"^model.pretrained={no_vae}: no vae/ \(VAE\) in "):
        load_config(None, [f"model.pretrained={no_vae}"])
    with pytest.raises(ConfigError, match=r"^model.pretrained=/no/such/folder: folder not found; an SD3/SD3.5 "):
        load_config(None, ["model.pretrained=/no/such/folder"])


def test_an_empty_part_is_refused_before_from_pretrained(sd35_folder, tmp_path):
    """Subfolders present but empty (a copy still running): the encoders' own check names the part."""
    from t2i.config import TextEncoderConfig
    from t2i.models.text_encoders import TextEncoders

    empty = partial_copy(sd35_folder, tmp_path / "empty-t5", empty=("text_encoder_3",))
    with pytest.raises(ConfigError) as e:
        TextEncoders(TextEncoderConfig(preset="sd3", sd3_folder=str(empty), clip_context=77))
    assert str(e.value).startswith(f"text.sd3_folder={empty}: text_encoder_3/ has no config.json (T5 weights")
