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
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        _unlink_shm_segment()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_device_index() -> int:
    """This rank's GPU: LOCAL_RANK modulo the GPUs it can see. Sites that bind one GPU per task
    (srun --gpu-bind, CUDA_VISIBLE_DEVICES set per task) show each rank a single device 0, where
    set_device(LOCAL_RANK) would fail for every rank but the first."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def _unlink_shm_segment() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (69 MB per rank) and never removes it, so every CPU run leaked it until /dev/shm (RAM)
    filled up. Once every rank has mapped every segment (DeepSpeed's init opens all peers'; the barrier
    waits for all ranks), the name can go: the mappings stay valid until the processes exit."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


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
    return engine, optimizer


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


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
