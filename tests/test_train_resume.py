"""Exact resume on 2 gloo ranks under real DeepSpeed: k steps + stop + resume k == 2k straight."""

import glob

import pytest

from helpers import losses, run_t2i, sample_keys, tiny_train_args
from t2i.geneval_spec import TAGS
from t2i.train.logger import read_records

K = 3  # odd, so a 2-worker loader stops mid round-robin


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,num_workers,grad_accum", [(2, 2, 1), (3, 0, 2)])
def test_stop_and_resume_gives_the_same_losses_and_samples(make_shards, tmp_path, zero_stage, num_workers,
                                                            grad_accum):
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    shards = make_shards(n_shards=4, per_shard=12)
    common = {"deepspeed.zero_stage": zero_stage, "data.num_workers": num_workers, "train.steps": 2 * K,
              "train.grad_accum": grad_accum,
              "logging.sample_keys": "true", "text.dropout_t5": 0.3}
    straight = tmp_path / "runs" / "straight"
    # The straight run also evaluates in training (sample grid + shapes GenEval of the gathered EMA every
    # 2 steps); that must not perturb training: its losses still equal the stopped-and-resumed run's.
    run_t2i("train", "--nproc", 2, *tiny_train_args(shards, tmp_path / "runs", "straight", **common,
                                                    **{"sample.every": 2, "sample.geneval_per_tag": 1}))
    run_t2i("train", "--nproc", 2, "--stop-at", K, *tiny_train_args(shards, tmp_path / "runs", "split", **common))
    split = tmp_path / "runs" / "split"
    assert len(losses(split)) == K and not (split / "samples").exists()
    run_t2i("train", "--nproc", 2, "--resume", *tiny_train_args(shards, tmp_path / "runs", "split", **common))

    a, b = losses(straight), losses(split)
    assert len(a) == len(b) == 2 * K
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert a[0] != a[1]  # the losses are real numbers from different batches, not a constant
    for rank in range(2):
        assert sample_keys(straight, rank) == sample_keys(split, rank)
        assert all(len(keys) == 4 * grad_accum for keys in sample_keys(straight, rank))
    assert (split / "samples").is_dir() and (split / "loss.png").is_file()
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before   # DeepSpeed's CPU shm: removed
    assert [p.name for p in sorted((straight / "samples").glob("*.png"))] == [
        "step00000002.png", "step00000004.png", "step00000006.png"]
    evals = [r for r in read_records(straight) if "geneval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(set(r["geneval"]) == {"overall", *TAGS} and 0 <= r["geneval"]["overall"] <= 1 for r in evals)
