"""A damaged checkpoint ends in one line that names the file and the complete tags that remain, and
`--resume TAG` continues from one of them."""

import shutil

import pytest

from helpers import run_t2i, tiny_train_args
from t2i.checkpoint import store
from t2i.errors import CheckpointError

OLD_RUN = __import__("conftest").REPO / "tests" / "assets" / "pre-layout-run"


def test_latest_naming_a_missing_tag_suggests_the_newest_complete_one(tmp_path):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    root = run / "checkpoints"
    (root / "latest").write_text("step00000009")
    with pytest.raises(CheckpointError) as err:
        store.latest_tag(root)
    assert "names 'step00000009', which is missing" in str(err.value)
    assert f"--resume {root / 'step00000002'}" in str(err.value)


def test_latest_naming_an_incomplete_tag_suggests_the_newest_complete_one(tmp_path):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    root = run / "checkpoints"
    (root / "step00000004" / "t2i").mkdir(parents=True)
    (root / "latest").write_text("step00000004")
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint .*complete tags: step00000002"):
        store.latest_tag(root)


@pytest.mark.slow
def test_a_truncated_latest_is_named_and_resume_continues_from_the_previous_tag(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=16)
    args = tiny_train_args(f"{shards[0]}::{shards[1]}", tmp_path / "runs", "r",
                           **{"train.steps": 6, "train.ckpt_every": 2})
    run_t2i("train", *args, "--stop-at", "4")
    root = tmp_path / "runs" / "r" / "checkpoints"
    assert store.complete_tags(root) == ["step00000002", "step00000004"]
    model = root / "step00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])

    failed = run_t2i("train", *args, "--resume", check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert str(model) in failed.stderr and f"--resume {root / 'step00000002'}" in failed.stderr

    resumed = run_t2i("train", *args, "--resume", str(root / "step00000002"))
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert store.latest_tag(root) == "step00000006"
