"""Distributed setup and the DeepSpeed engine: ZeRO stage, precision, the optimizer, LR schedule.

Launch with torchrun (or srun -> torchrun). On a machine without CUDA, DeepSpeed runs on its CPU
accelerator with the gloo backend (`DS_ACCELERATOR=cpu`, set by t2i/cli.py before the import).
"""

from __future__ import annotations

import math
import os
import socket

import torch

from t2i.config import Config, TrainConfig
from t2i.errors import ConfigError
from t2i.train import optim
from t2i.train.ds_config import deepspeed_config  # noqa: F401  (the generated DeepSpeed JSON; re-exported)


def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Works under torchrun/srun and as a plain single process."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python`: a world of one, on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index())
    else:
        skip_shm_allreduce()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_device_index() -> int:
    """This rank's GPU: LOCAL_RANK modulo the GPUs it can see. Sites that bind one GPU per task
    (srun --gpu-bind, CUDA_VISIBLE_DEVICES set per task) show each rank a single device 0, where
    set_device(LOCAL_RANK) would fail for every rank but the first."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def skip_shm_allreduce() -> None:
    """On the CPU accelerator DeepSpeed's process-group set-up builds (a JIT C++ compile, ~25 s the first
    time) and loads its shared-memory all-reduce, and maps a 69 MB /dev/shm segment per rank that it never
    removes. Only DeepSpeed-inference's tensor parallelism calls it (`inference_all_reduce`, which falls
    back to the process group without it); training's collectives are torch.distributed's (gloo). Marking
    the op incompatible before the set-up skips all three, as on a GPU, where the op does not exist. The
    mark goes into DeepSpeed's table of compatible ops without filling the rest of it (DeepSpeed fills it
    on first use by probing every op's build)."""
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(model: torch.nn.Module, cfg: Config):
    """(engine, optimizer). The optimizer is t2i's choice (t2i.train.optim: fused torch AdamW by default);
    ZeRO partitions it. hpZ's secondary partition must divide the world size."""
    import deepspeed

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    hpz = cfg.deepspeed.zero_hpz_partition_size
    if hpz > 1 and world % hpz:
        raise ConfigError(f"deepspeed.zero_hpz_partition_size={hpz} must divide the world size {world} "
                          f"(set it to the GPUs per node)")
    if cfg.deepspeed.zero_quantized_weights and not torch.cuda.is_available():
        raise ConfigError("deepspeed.zero_quantized_weights needs a GPU: DeepSpeed's weight quantizer has no CPU "
                          "kernel (zero_quantized_gradients and zero_hpz_partition_size do run on the CPU)")
    optimizer = optim.build([p for p in model.parameters() if p.requires_grad], cfg, device())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    if cfg.deepspeed.overflow_check == "grad_norm":
        overflow_from_grad_norm(optimizer)
    return engine, optimizer


def overflow_from_grad_norm(optimizer) -> bool:
    """bf16 ZeRO-1/2: let the gradient norm alone decide that a step is non-finite. True if applied.

    With `bf16.check_grad_overflow` (which t2i sets, so that a non-finite step is skipped), DeepSpeed's
    ZeRO-1/2 step first checks every gradient for inf/NaN (`check_overflow`: an amax and an amin per tensor,
    an all-reduce and a host sync), then computes the global gradient norm and skips the step when that
    norm is not finite either (deepspeed.runtime.zero.stage_1_and_2, `step`). A gradient holding inf or
    NaN makes the norm inf or NaN, so the first pass decides nothing the second does not; ZeRO-3 and fp32
    ZeRO-1/2 already use the norm alone. The pass is not free: 349 of a 533 ms optimizer step in the CPU
    dry run of tools/gpu_bench.sh (docs/performance.md §5). This replaces the instance's `check_overflow`
    by one that leaves `overflow` False; the norm check that follows flags the step. Not applied with
    ZeRO-Offload (its norm is computed on another path) or when DeepSpeed would not compute the norm."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    applies = (type(optimizer) is DeepSpeedZeroOptimizer and getattr(optimizer, "dtype", None) == torch.bfloat16
               and getattr(optimizer, "check_grad_overflow", False) and getattr(optimizer, "compute_grad_norm", False)
               and not getattr(optimizer, "cpu_offload", True))
    if applies:
        def check_overflow(partition_gradients=True):
            optimizer.overflow = False
        optimizer.check_overflow = check_overflow
    return applies


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to lr·min_lr_ratio."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Values over ranks, for the log line
# ----------------------------------------------------------------------------------------------


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the accelerator when the backend is NCCL), returned on the CPU."""
    value = value.detach().to(device()).clone()
    torch.distributed.all_reduce(value)
    return value.cpu()


def mean_over_ranks(value: torch.Tensor) -> float:
    return sum_over_ranks(value.float()).item() / torch.distributed.get_world_size()


def step_values_over_ranks(losses: list[torch.Tensor], counts: dict, bad_keys, note_keys) -> tuple[float, dict, dict]:
    """The log line's values over ranks in one all-reduce (and one host sync) instead of one per value:
    (mean loss, {bad reason: total}, {caption note: total}); reasons with a zero total are left out.
    `counts` is the loader's per-rank counts (TrainLoader.counts)."""
    keys = [*bad_keys, *note_keys]
    local = torch.cat([torch.stack(losses).mean().double().reshape(1).to(device()),
                       torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device())])
    total = sum_over_ranks(local).tolist()
    by_key = dict(zip(keys, (int(n) for n in total[1:])))
    return (total[0] / torch.distributed.get_world_size(), {k: by_key[k] for k in bad_keys if by_key[k]},
            {k: by_key[k] for k in note_keys if by_key[k]})


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
