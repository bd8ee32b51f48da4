"""Exact resume on 2 gloo ranks under real DeepSpeed: a run resumed at step k repeats steps k+1 .. 2k of the
uninterrupted run exactly (losses, sample keys), for both ZeRO stages and every optimizer that runs on a CPU;
a stopped run resumed with only its name continues on its own config."""

import glob
import shlex
import shutil

import pytest

from helpers import losses, run_t2i, sample_keys, tiny_train_args
from t2i.checkpoint.store import tag_for
from t2i.geneval_spec import TAGS
from t2i.train.logger import read_records

K = 3  # odd, so a 2-worker loader stops mid round-robin


def straight_and_resumed(shards, runs, name: str, common: dict, straight: dict | None = None,
                         resumed: dict | None = None, before_resume=None,
                         **kwargs) -> tuple[list[float], list[float], dict, dict]:
    """One uninterrupted 2k-step 2-rank run that keeps its step-k checkpoint, then the same run resumed from
    that checkpoint (a tag older than `latest`, which moves back to it), so steps k+1 .. 2k run again in a
    fresh set of processes: two runs instead of a straight one, a stopped one and its resume. Returns the
    straight run's 2k losses, the resumed run's k, and each one's per-rank sample keys (logging.sample_keys).
    The resumed run's records follow the straight run's in metrics.jsonl: the straight ones are checked
    unchanged."""
    run = runs / name
    args = tiny_train_args(shards, runs, name, **common, **{"train.steps": 2 * K, "train.ckpt_every": K})
    run_t2i("train", "--nproc", 2, *args, *[f"{k}={v}" for k, v in (straight or {}).items()], **kwargs)
    a = losses(run)
    keys_a = {rank: sample_keys(run, rank) for rank in range(2)}
    assert len(a) == 2 * K and all(len(keys) == 2 * K for keys in keys_a.values())
    if before_resume:
        before_resume()
    proc = run_t2i("train", "--nproc", 2, "--resume", run / "checkpoints" / tag_for(K), *args,
                   *[f"{k}={v}" for k, v in (resumed or {}).items()], **kwargs)
    assert f"resumed from {run / 'checkpoints' / tag_for(K)} at step {K}" in proc.stderr
    both = losses(run)
    assert len(both) == 3 * K and both[:2 * K] == a
    keys_b = {rank: sample_keys(run, rank)[2 * K:] for rank in range(2)}
    return a, both[2 * K:], keys_a, keys_b


# Multi-aspect data for the bucketed case: sample i of every shard has size SIZES[i % 6]; data.resolution=16 and
# data.buckets={step: 4} make the buckets 12x20, 16x16 and 20x12 (t2i.data.buckets), and 40x16 (2.5:1) is out
# of the rule's [0.5, 2] range. Per 12-sample shard: 16x16 x4, 20x12 x4, 12x20 x2 (the rare bucket), 2 dropped.
SIZES = [(16, 16), (24, 16), (16, 24), (16, 16), (40, 16), (24, 16)]
BUCKET_OF = {(16, 16): "16x16", (24, 16): "20x12", (16, 24): "12x20"}


def bucket_of_key(key: str) -> str:
    return BUCKET_OF[SIZES[int(key.rsplit("_", 1)[1]) % len(SIZES)]]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,num_workers,grad_accum,bucketed", [(2, 2, 1, True), (3, 0, 2, False)])
def test_a_resume_mid_run_gives_the_same_losses_and_samples(make_shards, tmp_path, zero_stage, num_workers,
                                                            grad_accum, bucketed):
    """ZeRO-2 with 2 loader workers per rank trains on multi-aspect data in 3 buckets: the stop at step 3 falls
    mid-epoch with partly filled bucket buffers (some of them holding samples of an earlier epoch), which the
    resumed loaders refill exactly. ZeRO-3 with gradient accumulation trains on the square crop."""
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    shards = make_shards(n_shards=4, per_shard=12, sizes=SIZES if bucketed else None)
    common = {"deepspeed.zero_stage": zero_stage, "data.num_workers": num_workers, "train.grad_accum": grad_accum,
              "logging.sample_keys": "true", "text.dropout_t5": 0.3}
    if bucketed:
        common["data.buckets"] = "{step: 4}"
    run = tmp_path / "runs" / "r"
    # The straight run also evaluates in training (sample grid + shapes GenEval of the gathered EMA every
    # 2 steps); the resumed run does not (an allowed override): that must not perturb training, so the
    # losses of steps k+1 .. 2k still agree.
    a, b, keys_a, keys_b = straight_and_resumed(
        shards, tmp_path / "runs", "r", common, straight={"sample.every": 2, "sample.geneval_per_tag": 1},
        resumed={"sample.every": 0, "sample.geneval_per_tag": 0},
        before_resume=lambda: _straight_run_evaluated_and_cleared(run))
    assert max(abs(x - y) for x, y in zip(a[K:], b)) <= 1e-6, (a, b)
    assert a[0] != a[1]  # the losses are real numbers from different batches, not a constant
    for rank in range(2):
        assert keys_b[rank] == keys_a[rank][K:]
        assert all(len(keys) == 4 * grad_accum for keys in keys_a[rank])
    if bucketed:
        _check_buckets(run, keys_a)
        # the same checkpoint at another world size: refused (its buffers belong to those 2 ranks' streams)
        refused = run_t2i("train", "--resume", *tiny_train_args(shards, tmp_path / "runs", "r"), check=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "was written by 2 rank(s) with data.buckets set; resuming with 1 would drop the samples waiting" \
            in refused.stderr and "--force-override" in refused.stderr
    assert (run / "samples").is_dir() and (run / "loss.png").is_file()  # the resumed run drew the final samples
    # DeepSpeed's CPU shared-memory all-reduce is skipped (t2i.train.engine.skip_shm_allreduce): no segment is made
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before
    resumed_log = (run / "train.log").read_text()
    assert "optimizer after resume: torch.optim.adamw.AdamW fused, betas (0.9, 0.99)" in resumed_log


def _check_buckets(run, keys) -> None:
    """Every micro-batch holds one bucket, all three buckets trained, and the checkpointed step had samples
    waiting in the buffers; the counts logged per bucket add up to the images trained."""
    used = set()
    for rank in range(2):
        for step_keys in keys[rank]:
            assert len({bucket_of_key(k) for k in step_keys}) == 1, step_keys
            used.add(bucket_of_key(step_keys[0]))
    assert used == {"12x20", "16x16", "20x12"}
    # the checkpoint at step K: a stream stopped mid-epoch (each slot reads one 12-sample shard per epoch) with
    # samples waiting in its buffers
    from t2i.checkpoint.store import read_client_state
    states = [read_client_state(run / "checkpoints", tag_for(K), rank)["data"] for rank in range(2)]
    assert all(s["buckets"] == ["12x20", "16x16", "20x12"] for s in states)
    assert any(0 < w["index"] < 12 and w.get("waiting") for s in states for w in s["workers"].values()), states
    records = {r["step"]: r for r in read_records(run) if "images_per_bucket" in r}
    at_k = records[K]
    assert at_k["waiting"] > 0 and at_k["dropped_aspect"] > 0 and at_k["bad"].get("aspect") == at_k["dropped_aspect"]
    assert sum(at_k["images_per_bucket"].values()) == K * 4 * 2
    trained = [bucket_of_key(k) for rank in range(2) for step_keys in keys[rank][:K] for k in step_keys]
    assert at_k["images_per_bucket"] == {n: trained.count(n) for n in ("12x20", "16x16", "20x12")}
    assert f"buckets 12x20={at_k['images_per_bucket']['12x20']} " in (run / "train.log").read_text()


def _straight_run_evaluated_and_cleared(run) -> None:
    """The straight run drew a grid and scored GenEval at steps 2, 4, 6; its samples and loss curve are then
    removed, so that the resumed run must draw its own."""
    assert [p.name for p in sorted((run / "samples").glob("*.png"))] == [
        "step00000002.png", "step00000004.png", "step00000006.png"]
    evals = [r for r in read_records(run) if "geneval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(set(r["geneval"]) == {"overall", *TAGS} and 0 <= r["geneval"]["overall"] <= 1 for r in evals)
    shutil.rmtree(run / "samples")
    (run / "loss.png").unlink()


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
    assert len(losses(runs / "split")) == 2 and not (runs / "split" / "samples").exists()  # a stop draws no samples
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
    """The same resume-at-k check for the other optimizer kinds (ZeRO-2, 2 gloo ranks): DeepSpeedCPUAdam
    under ZeRO-Offload, DeepSpeed's FusedAdam (its CPU build) and bitsandbytes' AdamW8bit. The first use builds
    DeepSpeed's op (a JIT C++ build, minutes; cached in ~/.cache/torch_extensions)."""
    ok, why, env = _optimizer_available(kind)
    if not ok:
        pytest.skip(why)
    shards = make_shards(n_shards=4, per_shard=12)
    common = {"optimizer.kind": kind, "text.dropout_t5": 0.3, "logging.sample_keys": "true"}
    a, b, _, _ = straight_and_resumed(shards, tmp_path / "runs", "r", common, env=env, timeout=1800)
    assert a[0] != a[1] and max(abs(x - y) for x, y in zip(a[K:], b)) <= 1e-6, (a, b)
    assert f"optimizer after resume: {name}, betas (0.9, 0.99)" in (tmp_path / "runs" / "r" / "train.log").read_text()
