"""Exact resume on 2 gloo ranks under real DeepSpeed: k steps + stop + resume k == 2k straight."""

import glob
import shlex

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
    # DeepSpeed's CPU shared-memory all-reduce is skipped (t2i.train.engine.skip_shm_allreduce): no segment is made
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before
    resumed_log = (split / "train.log").read_text()
    assert "optimizer after resume: torch.optim.adamw.AdamW fused, betas (0.9, 0.99)" in resumed_log
    assert [p.name for p in sorted((straight / "samples").glob("*.png"))] == [
        "step00000002.png", "step00000004.png", "step00000006.png"]
    evals = [r for r in read_records(straight) if "geneval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(set(r["geneval"]) == {"overall", *TAGS} and 0 <= r["geneval"]["overall"] <= 1 for r in evals)


@pytest.mark.slow
def test_a_resume_takes_the_runs_own_config_and_an_allowed_override_extends_it(make_shards, tmp_path):
    """The issue's case: a run on the user's data, stopped, resumed with only its name (the command
    --stop-at prints) from a folder where the default config's data does not exist: it continues on
    its own data with the same losses as a straight run. Then train.steps is extended (logged), and a
    data override is refused naming the key."""
    shards = make_shards(n_shards=2, per_shard=12)
    runs = tmp_path / "runs"
    common = {"train.steps": 4, "validation.shards": "null"}  # + the tiny settings of tiny_train_args
    run_t2i("train", *tiny_train_args(f"{shards[0]}::{shards[1]}", runs, "straight", **common))
    stopped = run_t2i("train", *tiny_train_args(f"{shards[0]}::{shards[1]}", runs, "split", **common), "--stop-at", 2)
    hint = [line for line in stopped.stderr.splitlines() if "(--stop-at); resume with: " in line]
    assert len(hint) == 1 and hint[0].endswith(f"stopped at step 2 of 4 (--stop-at); resume with: t2i train "
                                               f"run.name=split run.output_dir={runs} --resume")
    command = shlex.split(hint[0].split("resume with: ")[1])
    assert command[:2] == ["t2i", "train"]

    resumed = run_t2i(*command[1:], cwd=tmp_path)  # no data/ here: the default data.shards does not exist
    assert f"resumed from {runs / 'split/checkpoints/step00000002'} at step 2" in resumed.stderr
    a, b = losses(runs / "straight"), losses(runs / "split")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)

    extended = run_t2i(*command[1:], "train.steps=6", cwd=tmp_path)
    log = (runs / "split" / "train.log").read_text()
    assert f"config: the run's own {runs / 'split/config.yaml'} + 1 change(s)" in log
    assert "resume: train.steps 4 -> 6 (command line); the cosine schedule now ends at step 6" in log
    assert "resumed from" in extended.stderr and len(losses(runs / "split")) == 6
    assert "steps: 6" in (runs / "split" / "config.yaml").read_text()  # the next resume starts from 6

    refused = run_t2i(*command[1:], f"data.shards={shards[0]}", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "would change what" in refused.stderr and "data.shards '/" in refused.stderr
    assert f"shard-000001.tar' -> '{shards[0]}'; start a new run" in refused.stderr


def _optimizer_available(kind: str) -> tuple[bool, str, dict]:
    """(runs here, why not, extra env for the subprocess) for an optimizer kind."""
    if kind == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            return False, "bitsandbytes is not installed (optional: pip install 't2i[bnb]')", {}
        from pathlib import Path
        from helpers import REPO
        site = str(Path(bitsandbytes.__file__).resolve().parent.parent)
        return True, "", {"PYTHONPATH": f"{REPO}:{site}"}
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
    builder = {"cpu_adam": CPUAdamBuilder, "deepspeed_adam": FusedAdamBuilder}[kind]()
    if not builder.is_compatible():
        return False, f"DeepSpeed cannot build {builder.NAME} here (its JIT C++ build needs a compiler)", {}
    return True, "", {}


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", [("cpu_adam", "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"),
                                       ("deepspeed_adam", "deepspeed.ops.adam.fused_adam.FusedAdam"),
                                       ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW8bit")])
def test_every_optimizer_that_runs_on_a_cpu_resumes_exactly(make_shards, tmp_path, kind, name):
    """The same k + resume k == 2k check for the other optimizer kinds (ZeRO-2, 2 gloo ranks): DeepSpeedCPUAdam
    under ZeRO-Offload, DeepSpeed's FusedAdam (its CPU build) and bitsandbytes' AdamW8bit. The first use builds
    DeepSpeed's op (a JIT C++ build, minutes; cached in ~/.cache/torch_extensions)."""
    ok, why, env = _optimizer_available(kind)
    if not ok:
        pytest.skip(why)
    shards = make_shards(n_shards=4, per_shard=12)
    common = {"optimizer.kind": kind, "train.steps": 2 * K, "text.dropout_t5": 0.3}
    run_t2i("train", "--nproc", 2, *tiny_train_args(shards, tmp_path / "runs", "straight", **common), env=env,
            timeout=1800)
    run_t2i("train", "--nproc", 2, "--stop-at", K, *tiny_train_args(shards, tmp_path / "runs", "split", **common),
            env=env, timeout=1800)
    run_t2i("train", "--nproc", 2, "--resume", *tiny_train_args(shards, tmp_path / "runs", "split", **common), env=env,
            timeout=1800)
    a, b = losses(tmp_path / "runs" / "straight"), losses(tmp_path / "runs" / "split")
    assert len(a) == len(b) == 2 * K and a[0] != a[1]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert f"optimizer after resume: {name}, betas (0.9, 0.99)" in (tmp_path / "runs" / "split" / "train.log").read_text()
