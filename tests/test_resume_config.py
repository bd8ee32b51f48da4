"""--resume / --auto-resume take the run's own config.yaml; overrides that may change mid-run apply
(logged), ones that change what the run is are refused by name unless --force-override; an override
equal to the stored value is no change (SLURM requeues repeat their command line). All decided by
t2i.train.plan before any rank starts: run in-process here on a run folder with a checkpoint tag."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_sample_shards
from helpers import REPO, run_t2i
from t2i.checkpoint import store
from t2i.config import save_config, to_dict
from t2i.errors import ConfigError, DataError
from t2i.train.engine import lr_at
from t2i.train.plan import plan_training


@pytest.fixture
def started(tmp_path, monkeypatch):
    """A run `r` started as `t2i train data.shards=<own shards> run.output_dir=... run.name=r
    train.steps=20 [extra]`, with a checkpoint at step 10. The working directory holds no data/, so
    the default config's shards do not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    shards = write_sample_shards(tmp_path / "mine", 2, 6, prefix="images")

    def _start(*extra, config=None, step=10):
        where = [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"]
        argv = [f"data.shards={tmp_path / 'mine'}", *where, "train.steps=20", *extra]
        cfg, _ = plan_training(config, argv)
        run = tmp_path / "runs" / "r"
        save_config(cfg, run / "config.yaml")  # what `accept` writes when a run starts
        (run / "checkpoints" / store.tag_for(step)).mkdir(parents=True)
        (run / "checkpoints" / store.tag_for(step) / "meta.json").write_text(json.dumps({"step": step}))
        (run / "checkpoints" / "latest").write_text(store.tag_for(step))
        return cfg, where, argv
    _start.shards = shards
    return _start


def messages(notes, level=None) -> list[str]:
    return [m for lv, m in notes if level is None or lv == level]


def test_resume_without_overrides_continues_on_the_runs_own_data(started, tmp_path):
    cfg0, where, _ = started()
    with pytest.raises(DataError, match=r"^data\.shards: 8 shard\(s\) not found"):  # the default config's data
        plan_training(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=other"])
    for resume in (True, "auto", "step00000010"):
        cfg, notes = plan_training(None, where, resume)
        assert to_dict(cfg) == to_dict(cfg0)
        assert cfg.data.shards == str(tmp_path / "mine") and cfg.validation.shards is None
        assert messages(notes, logging.INFO)[0] == f"config: the run's own {tmp_path / 'runs/r/config.yaml'} (unchanged)"


def test_allowed_overrides_apply_and_are_logged(started, tmp_path):
    cfg0, where, _ = started("train.warmup_steps=2")
    cfg, notes = plan_training(None, [*where, "train.steps=40", "sample.every=5", "train.log_every=2"], True)
    assert (cfg.train.steps, cfg.sample.every, cfg.train.log_every) == (40, 5, 2)
    before, after = lr_at(10, cfg0.train), lr_at(10, cfg.train)
    assert after > before  # the schedule stretched: at step 10 of 40 the cosine has decayed less than of 20
    assert messages(notes, logging.INFO) == [
        f"config: the run's own {tmp_path / 'runs/r/config.yaml'} + 3 change(s)",
        f"resume: train.steps 20 -> 40 (command line); the cosine schedule now ends at step 40: "
        f"lr at step 10 {before:.3g} -> {after:.3g}",
        "resume: train.log_every 0 -> 2 (command line)",
        "resume: sample.every 300 -> 5 (command line)",
    ]


@pytest.mark.parametrize("override,key", [
    ("data.shards=elsewhere/x.tar", "data.shards"),
    ("model.kwargs={num_layers: 2}", "model.kwargs.num_layers None -> 2"),
    ("train.objective=mixflow", "train.objective 'flow_matching' -> 'mixflow'"),
    ("run.seed=1", "run.seed 0 -> 1"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage 2 -> 3"),
    ("train.micro_batch_size=8", "train.micro_batch_size 32 -> 8"),
    ("train.lr=2e-4", "train.lr 0.003 -> 0.0002"),
])
def test_an_identity_override_is_refused_naming_the_key(started, tmp_path, override, key):
    _, where, _ = started()
    with pytest.raises(ConfigError) as err:
        plan_training(None, [*where, "train.steps=40", override], True)
    message = str(err.value)
    assert key in message and "--force-override" in message and "\n" not in message
    assert "train.steps" not in message  # the allowed one is not listed
    assert message.startswith(f"--resume: this would change what {tmp_path / 'runs/r'} is (model, data,")


def test_force_override_applies_an_identity_change_with_a_warning(started, tmp_path):
    _, where, _ = started()
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "mine", moved)
    cfg, notes = plan_training(None, [*where, f"data.shards={moved}"], True, force_override=True)
    assert cfg.data.shards == str(moved)
    assert messages(notes, logging.WARNING)[0] == (
        f"resume: data.shards {str(tmp_path / 'mine')!r} -> {str(moved)!r} (command line; --force-override: "
        f"this changes what the run is)")


def test_a_requeue_repeating_its_command_line_is_no_change(started, tmp_path):
    """slurm/train.sbatch re-runs `--config X <overrides> --auto-resume`: the same values, a config file
    that lists every key (the shapes defaults included, which followed the data at the start), and
    values spelled differently (3e-3 for 0.003) are not changes."""
    config = str(REPO / "configs/tiny-cpu.yaml")
    _, where, argv = started(config=config)
    cfg, notes = plan_training(config, [*argv, "train.lr=3e-3"], "auto")
    assert messages(notes)[0].endswith("(unchanged)")
    assert cfg.validation.shards is None and cfg.sample.geneval_per_tag == 0
    assert cfg.sample.prompts == [f"caption 0 {i}" for i in range(6)]


def test_a_stage_config_requeue_is_no_change(started, tmp_path):
    config = str(REPO / "configs/stages/control.yaml")
    _, where, argv = started("train.init_from=runs/parent", config=config)
    _, notes = plan_training(config, argv, "auto")
    assert messages(notes)[0].endswith("(unchanged)")


def test_steps_below_the_checkpoint_are_refused(started):
    _, where, _ = started(step=10)
    with pytest.raises(ConfigError, match=r"train.steps=5 is below the step of the checkpoint it resumes from \(10\)"):
        plan_training(None, [*where, "train.steps=5"], True)


def test_a_run_without_config_yaml_is_named(started, tmp_path):
    _, where, _ = started()
    (tmp_path / "runs/r/config.yaml").unlink()
    with pytest.raises(ConfigError, match="config.yaml not found"):
        plan_training(None, where, True)


def test_a_resume_whose_data_is_gone_names_the_runs_config(started, tmp_path):
    _, where, _ = started()
    shutil.rmtree(tmp_path / "mine")
    with pytest.raises(DataError) as err:
        plan_training(None, where, True)
    key = f"data.shards (from {tmp_path / 'runs/r/config.yaml'})"
    assert str(err.value).startswith(f"{key}: 1 shard(s) not found: [{str(tmp_path / 'mine')!r}]; {key} takes a "
                                     "brace range")


def test_auto_resume_without_a_checkpoint_starts_fresh_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    write_sample_shards(tmp_path / "mine", 1, 4)
    argv = [f"data.shards={tmp_path / 'mine'}", f"run.output_dir={tmp_path}", "run.name=new", "train.steps=7"]
    cfg, notes = plan_training(None, argv, "auto")
    assert cfg.train.steps == 7 and cfg.validation.shards is None
    assert not any("config: the run's own" in m for m in messages(notes))
    with pytest.raises(ConfigError, match="no checkpoint in"):
        plan_training(None, argv, True)


def test_the_command_refuses_with_one_line_and_exit_2_before_any_rank(started, tmp_path):
    _, where, _ = started()
    proc = run_t2i("train", "--nproc", 2, *where, "--resume", "model.kwargs={num_layers: 2}", "train.steps=40",
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert proc.stderr.startswith("t2i train: ConfigError: --resume: this would change what")
    assert "model.kwargs.num_layers None -> 2" in proc.stderr
    assert Path(tmp_path / "runs/r/config.yaml").is_file()


def test_planning_a_run_imports_no_model_library(tmp_path):
    """The process a user starts plans the run (config, geometry, data, resume) before torchrun starts
    the ranks; importing diffusers / open_clip / DeepSpeed there cost ~5 s per launch for nothing."""
    write_sample_shards(tmp_path, 1, 4)
    script = ("import sys; from t2i.train.plan import plan_training; "
              f"plan_training(None, ['data.shards={tmp_path}', 'run.output_dir={tmp_path / 'runs'}', 'run.name=r']); "
              "print(sorted(m for m in ('diffusers', 'open_clip', 'deepspeed', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


SHAPES_SHARDS = "data/shapes/shapes-{000000..000007}.tar"  # configs/tiny-cpu.yaml's data.shards


def test_a_config_file_that_differs_from_the_runs_is_named_before_any_data_is_read(started, tmp_path, monkeypatch):
    """The user report: started `--config configs/tiny-cpu.yaml data.shards=mine ...`, resumed with the
    same --config but without data.shards=mine. The file's shapes shards are not the run's data: the
    error names the file and the key (old -> new), not "data.shards: 8 shard(s) not found"."""
    config = str(REPO / "configs/tiny-cpu.yaml")
    _, where, _ = started(config=config)

    def no_data(*_a, **_k):
        raise AssertionError("data read before the config was reviewed")
    monkeypatch.setattr("t2i.train.follow_data.peek_data", no_data)
    with pytest.raises(ConfigError) as err:
        plan_training(config, where, True)
    message = str(err.value)
    assert message.startswith(f"--resume: --config {config} differs from the run's own "
                              f"{tmp_path / 'runs/r/config.yaml'} in what makes the run what it is (model, data,")
    assert f"data.shards {str(tmp_path / 'mine')!r} -> {SHAPES_SHARDS!r}; " in message
    assert (f"a resume needs no --config: `t2i train run.output_dir={tmp_path / 'runs'} run.name=r --resume` "
            f"reads the run's own config") in message
    assert message.endswith("or pass --force-override to apply it anyway") and "\n" not in message
    assert "validation.shards" not in message and "sample." not in message  # the shapes values the data may drop
    assert "not found" not in message


def test_a_config_file_and_an_override_both_refused_are_listed_by_source(started, tmp_path):
    config = str(REPO / "configs/tiny-cpu.yaml")
    _, where, _ = started(config=config)
    with pytest.raises(ConfigError) as err:
        plan_training(config, [*where, "run.seed=1"], True)
    message = str(err.value)
    assert message.startswith(f"--resume: --config {config} differs from the run's own")
    assert "run.seed 0 -> 1 (command line)" in message
    assert f"data.shards {str(tmp_path / 'mine')!r} -> {SHAPES_SHARDS!r}" in message
    assert message.endswith("apply them anyway")


def test_an_identity_override_next_to_an_equal_config_file_is_named_as_an_override(started, tmp_path):
    config = str(REPO / "configs/tiny-cpu.yaml")
    _, where, argv = started(config=config)
    with pytest.raises(ConfigError) as err:
        plan_training(config, [*argv, "run.seed=1"], True)
    assert str(err.value).startswith(f"--resume: this would change what {tmp_path / 'runs/r'} is")
    assert "run.seed 0 -> 1" in str(err.value) and "differs from" not in str(err.value)


def test_an_equal_config_file_resumes_and_a_mutable_difference_applies(started, tmp_path):
    config = str(REPO / "configs/tiny-cpu.yaml")
    cfg0, where, argv = started(config=config)
    cfg, notes = plan_training(config, argv, True)
    assert to_dict(cfg) == to_dict(cfg0) and messages(notes)[0].endswith("(unchanged)")
    cfg, notes = plan_training(config, [*argv, "train.steps=40"], True)
    assert cfg.train.steps == 40 and messages(notes)[0].endswith("+ 1 change(s)")


def test_force_override_of_a_differing_config_file_applies_it_and_checks_its_data(started, tmp_path):
    """--force-override takes the file's values as it takes an override's: then its data must exist."""
    config = str(REPO / "configs/tiny-cpu.yaml")
    _, where, _ = started(config=config)
    with pytest.raises(DataError, match=r"^data\.shards: 8 shard\(s\) not found"):
        plan_training(config, where, True, force_override=True)


def test_the_resume_hint_names_the_output_dir_only_when_not_the_default():
    from t2i.train.resume_config import _resume_command
    assert _resume_command(Path("runs") / "r") == "t2i train run.name=r --resume"
    assert _resume_command(Path("/x/my runs") / "r") == "t2i train 'run.output_dir=/x/my runs' run.name=r --resume"


def test_the_reported_command_refuses_with_one_line_and_exit_2(started, tmp_path):
    """As reported: `t2i train --config configs/tiny-cpu.yaml ... --resume` in a folder without data/."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/tiny-cpu.yaml", tmp_path / "configs/tiny-cpu.yaml")
    _, where, _ = started(config="configs/tiny-cpu.yaml")
    proc = run_t2i("train", "--config", "configs/tiny-cpu.yaml", *where, "--resume", check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"t2i train: ConfigError: --resume: --config configs/tiny-cpu.yaml differs from "
                                  f"the run's own {tmp_path / 'runs/r/config.yaml'}")
    assert f"data.shards {str(tmp_path / 'mine')!r} -> {SHAPES_SHARDS!r}" in proc.stderr
