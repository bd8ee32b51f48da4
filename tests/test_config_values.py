"""Every value a user can get wrong is refused by name before start-up (no torchrun, DeepSpeed or model)."""

import pytest

from helpers import run_t2i
from t2i.config import load_config
from t2i.errors import ConfigError
from t2i.models.geometry import check_geometry

BAD = {
    "train.lr=-1": "train.lr must be > 0, got -1.0",
    "train.lr=0": "train.lr must be > 0",
    "train.warmup_steps=-3": "train.warmup_steps must be >= 0, got -3",
    "sample.steps=0": "sample.steps must be >= 1, got 0",
    "data.shuffle_buffer=0": "data.shuffle_buffer must be >= 1, got 0",
    "validation.every=-1": "validation.every must be >= 0, got -1",
    "train.timesteps.shift=0": "train.timesteps.shift must be > 0",
    "sample.shift=-2": "sample.shift must be > 0",
    "train.min_lr_ratio=1.5": "train.min_lr_ratio must be in [0, 1]",
    "train.betas=[0.9,1.0]": "train.betas must both be in [0, 1)",
    "train.max_consecutive_nonfinite=0": "train.max_consecutive_nonfinite must be >= 1",
    "data.max_caption_bytes=0": "data.max_caption_bytes must be >= 1",
    "data.max_image_pixels=0": "data.max_image_pixels must be >= 1",
    "validation.num_sigmas=0": "validation.num_sigmas must be >= 1",
    "logging.sigma_bins=0": "logging.sigma_bins must be >= 1",
    "sample.guidance=-1": "sample.guidance must be >= 0",
    "text.dropout_t5=1.5": "text.dropout_t5: caption dropout probability must be in [0, 1]",
    "text.dropout_all=-0.5": "text.dropout_all: caption dropout probability must be in [0, 1]",
}


@pytest.mark.parametrize("override", list(BAD))
def test_a_bad_value_is_refused_by_name(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert BAD[override] in str(err.value)


def test_validation_every_zero_is_allowed_and_means_the_last_step():
    assert load_config(None, ["validation.every=0"]).validation.every == 0


@pytest.mark.parametrize("overrides,message", [
    (["data.resolution=30"], "data.resolution=30 is not a multiple of 4 (VAE downsampling 1 x patch size 4); "
                             "use 28 or 32"),
    (["data.resolution=36", "vae.kind=tiny"], "not a multiple of 8 (VAE downsampling 2 x patch size 4); use 32 or 40"),
    (["data.resolution=33", "model.kwargs={patch_size: 1}", "vae.kind=tiny"], "use 32 or 34"),
])
def test_a_resolution_the_model_cannot_patch_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_geometry(load_config(None, overrides))
    check_geometry(load_config(None, ["data.resolution=32"]))


def test_a_bad_resolution_stops_t2i_train_before_anything_starts(tmp_path):
    proc = run_t2i("train", "--nproc", "2", "data.resolution=30", f"run.output_dir={tmp_path}", "run.name=x",
                   check=False)
    assert proc.returncode == 2 and "data.resolution=30 is not a multiple of 4" in proc.stderr
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "x").exists()
