"""Small things a first run shows: warnings for valid but odd values, a log cadence that suits short
runs, a loss curve smoothed to the run's length and labelled so, the resume command after --stop-at."""

import pytest

from helpers import REPO
from t2i import cli
from t2i.config import load_config, log_interval
from t2i.config_warnings import odd_values
from t2i.train.run import resume_command
from t2i.viz import plot_loss, smoothing_window


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# the SD3.5 configs' placeholder paths, neutralised (only the schedule keys matter here)
NO_PATHS = ["text.preset=tiny", "text.sd3_folder=null", "model.pretrained=null", "vae.kind=identity",
            "vae.path=null", "train.init_from=null"]


def test_the_shipped_defaults_are_not_odd():
    assert odd_values(load_config()) == []
    for path in CONFIGS:
        assert odd_values(load_config(path, NO_PATHS)) == [], path


def test_a_short_run_of_the_default_config_warns_about_each_odd_value():
    lines = odd_values(load_config(overrides=["train.steps=20"]))
    assert lines == [
        "train.warmup_steps=50 >= train.steps=20: the learning rate never leaves warm-up (at most 40% of "
        "train.lr=0.003, at the last step); lower train.warmup_steps",
        "train.ckpt_every=300 > train.steps=20: no periodic checkpoint, only the one at the last step (or on a "
        "stop signal)",
        "sample.every=300 > train.steps=20: no sample grid during training, only the final one",
        "validation.every=100 > train.steps=20: the validation loss is computed at the last step only",
    ]
    assert odd_values(load_config(overrides=["sample.every=0"])) == [
        "sample.geneval_per_tag=4 without sample.every: the live GenEval never runs (it scores at every "
        "sample.every steps)"]
    no_dropout = ["text.dropout_clip_l=0", "text.dropout_clip_g=0", "text.dropout_t5=0"]
    assert odd_values(load_config(overrides=no_dropout))[0].startswith(
        "sample.guidance=3 but no caption dropout (text.dropout_clip_l / _clip_g / _t5 are 0)")
    assert odd_values(load_config(overrides=[*no_dropout, "sample.guidance=1"])) == []
    assert odd_values(load_config(overrides=[*no_dropout, "train.init_from=runs/x"])) == []  # post-training
    assert odd_values(load_config(overrides=["train.log_every=1000"]))[0].startswith(
        "train.log_every=1000 > train.steps=900: one log line")


def test_t2i_config_prints_the_warnings_to_stderr(capsys):
    assert cli.main(["config", "train.steps=20", "train.warmup_steps=5"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("t2i config: warning: train.ckpt_every=300 > train.steps=20")
    assert not any("warmup" in line for line in err)


@pytest.mark.parametrize("steps,every,expected", [(900, 0, 25), (600, 0, 25), (100, 0, 10), (20, 0, 2), (5, 0, 1),
                                                  (100, 50, 50), (20, 1, 1)])
def test_log_interval_logs_at_least_about_ten_times(steps, every, expected):
    assert log_interval(load_config(overrides=[f"train.steps={steps}", f"train.log_every={every}"]).train) == expected


def test_every_shipped_config_logs_at_least_ten_times_also_on_a_short_run():
    for path in CONFIGS:
        for steps in (100, None):
            cfg = load_config(path, NO_PATHS + ([f"train.steps={steps}"] if steps else []))
            lines = cfg.train.steps // log_interval(cfg.train)
            assert lines >= 10 and log_interval(cfg.train) <= 25, (path, steps)


@pytest.mark.parametrize("n,window", [(1, 1), (7, 1), (8, 2), (20, 5), (60, 5), (100, 5), (900, 18), (5000, 100)])
def test_the_loss_smoothing_window_adapts_to_the_run(n, window):
    assert smoothing_window(n) == window


def test_the_loss_plot_labels_its_smoothing(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    for n in (4, 40):
        plot_loss([{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(n)], tmp_path / f"loss{n}.png")
        assert (tmp_path / f"loss{n}.png").stat().st_size > 0
    assert labels == ["per step", "per step", "running mean over 5 steps"]


def test_the_resume_command_names_the_run():
    cfg = load_config(overrides=["run.name=my run"])
    assert resume_command(cfg, world=2) == "t2i train --nproc 2 'run.name=my run' --resume"
    cfg = load_config(overrides=["run.name=r", "run.output_dir=/scratch/runs"])
    assert resume_command(cfg, world=1) == "t2i train run.name=r run.output_dir=/scratch/runs --resume"
