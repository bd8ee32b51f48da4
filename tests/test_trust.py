"""No file t2i reads can run code: a pickle planted in any kind of checkpoint file is refused, by
name, before anything unpickles it, through every command that reads checkpoints."""

import os
import shutil

import pytest
import torch

from helpers import run_t2i, tiny_train_args
from t2i import cli, trust
from t2i.errors import CheckpointError

OLD_RUN = __import__("conftest").REPO / "tests" / "assets" / "pre-layout-run"
TAG = "step00000002"


class Planted:
    """Unpickling this runs a shell command that creates `marker` (what an attacker would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(run, kind: str, marker) -> str:
    """Put a Planted object into one file of the run's checkpoint; returns that file's path."""
    tag_dir = run / "checkpoints" / TAG
    path = {"client": tag_dir / "t2i" / "rank00000.pt", "ema": tag_dir / "t2i" / "rank00000.pt",
            "model": tag_dir / "mp_rank_00_model_states.pt",
            "optimizer": tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"}[kind]
    trust.allow_globals()
    state = torch.load(path, weights_only=True)
    if kind == "ema":
        state["ema"]["shadow"] = Planted(marker)
    else:
        state["extra"] = Planted(marker)
    torch.save(state, path)
    return str(path)


@pytest.fixture
def planted(tmp_path):
    def _make(kind):
        run = tmp_path / f"run-{kind}"
        shutil.copytree(OLD_RUN, run)
        marker = tmp_path / f"ran-{kind}"
        return run, plant(run, kind, marker), marker
    return _make


def test_the_allowlist_accepts_what_t2i_and_deepspeed_write():
    files = sorted((OLD_RUN / "checkpoints" / TAG).rglob("*.pt"))
    assert len(files) == 3 and all(trust.unsafe_globals(f) == [] for f in files)
    assert trust.verify_tree(OLD_RUN / "checkpoints" / TAG) == 3


@pytest.mark.parametrize("kind", ["client", "ema", "model", "optimizer"])
def test_a_planted_pickle_is_refused_by_name_without_running(planted, kind):
    run, path, marker = planted(kind)
    with pytest.raises(CheckpointError) as err:
        trust.verify_tree(run / "checkpoints" / TAG)
    assert path in str(err.value) and "posix.system" in str(err.value) and trust.TRUST_ENV in str(err.value)
    with pytest.raises(CheckpointError, match="posix.system"):
        trust.load(path)
    assert not marker.exists()


COMMANDS = {
    "sample": lambda run, out: ["sample", "--ckpt", str(run), "--prompts", str(out / "p.txt"), "--out", str(out / "s"),
                                "--images-per-prompt", "1", "--steps", "2"],
    "sample --raw": lambda run, out: ["sample", "--ckpt", str(run), "--raw", "--prompts", str(out / "p.txt"),
                                      "--out", str(out / "s"), "--images-per-prompt", "1", "--steps", "2"],
    "eval": lambda run, out: ["eval", "--ckpt", f"x={run}", "--out", str(out / "e"), "--per-tag", "1",
                              "--images-per-prompt", "1", "--steps", "2"],
    "slowflow": lambda run, out: ["slowflow", "--ckpt", f"x={run}", "--steps", "2", "--n", "2", "--prompts",
                                  str(out / "p.txt"), "--out", str(out / "sf")],
    "ckpt consolidate": lambda run, out: ["ckpt", "consolidate", str(run), "--out", str(out / "c"), "--weights", "both"],
    "ckpt export": lambda run, out: ["ckpt", "export", str(run), "--out", str(out / "x")],
    "ckpt universal": lambda run, out: ["ckpt", "universal", str(run)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["client", "model", "optimizer"])
def test_every_reading_command_refuses_a_planted_checkpoint(planted, tmp_path, capsys, command, kind):
    run, path, marker = planted(kind)
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    assert cli.main(COMMANDS[command](run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and path in err and "posix.system" in err
    assert not marker.exists()


def test_trusting_a_class_is_explicit_by_name_and_never_lets_code_run(planted, tmp_path, monkeypatch):
    import types

    path = tmp_path / "extra.pt"
    torch.save({"w": torch.ones(2), "extra": types.SimpleNamespace(a=2)}, path)
    with pytest.raises(CheckpointError, match=r"types.SimpleNamespace.*name them in T2I_TRUST_GLOBALS"):
        trust.load(path)
    monkeypatch.setenv(trust.TRUST_ENV, "types.SimpleNamespace")
    loaded = trust.load(path)  # still weights-only: the named class is rebuilt from its state
    assert loaded["extra"].a == 2 and torch.equal(loaded["w"], torch.ones(2))
    run, planted_file, marker = planted("client")  # vouching for one class does not admit others
    with pytest.raises(CheckpointError, match="posix.system"):
        trust.load(planted_file)
    assert not marker.exists()


def test_a_truncated_checkpoint_file_names_itself_and_the_other_tags(planted, tmp_path, capsys):
    run = tmp_path / "cut"
    shutil.copytree(OLD_RUN, run)
    model = run / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert cli.main(["ckpt", "consolidate", str(run), "--out", str(tmp_path / "c"), "--weights", "raw"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "truncated" in err and "no other complete checkpoint" in err


@pytest.mark.slow
def test_resume_and_init_from_refuse_a_planted_checkpoint(planted, make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=8)
    run, path, marker = planted("optimizer")
    args = tiny_train_args(f"{shards[0]}::{shards[1]}", run.parent, run.name, **{"train.steps": 3})
    resumed = run_t2i("train", "--config", run / "config.yaml", "--resume", "--force-override", *args, check=False)
    assert resumed.returncode == 2 and path in resumed.stderr and "posix.system" in resumed.stderr
    child = run_t2i("train", "--config", run / "config.yaml", *tiny_train_args(
        shards[0], tmp_path / "runs", "child", **{"train.steps": 2, "train.init_from": run,
                                                   "train.init_weights": "raw"}), check=False)
    assert child.returncode == 2 and path in child.stderr and "posix.system" in child.stderr
    assert not marker.exists()
