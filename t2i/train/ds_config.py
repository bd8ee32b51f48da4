"""The DeepSpeed JSON config generated from ours, and what `deepspeed.extra` may add to it.

Every DeepSpeed setting t2i decides comes from one typed key (train.micro_batch_size, deepspeed.zero_stage,
deepspeed.overlap_comm, ...). `deepspeed.extra` is merged on top for everything else DeepSpeed offers, but a
key that one of ours already sets is refused: two places for one setting would let the YAML say one thing
while the run did another. An `optimizer` or `scheduler` block is refused too: t2i hands DeepSpeed its own
optimizer (t2i.train.optim) and sets the learning rate every step, and DeepSpeed silently ignores a config
optimizer when a client optimizer is given.

No torch import here: the config checks `deepspeed.extra` when it is loaded (t2i.config), before any launch.
"""

from __future__ import annotations

import copy
import difflib

from t2i.errors import ConfigError

# DeepSpeed JSON path -> the t2i key that sets it.
OWNED = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("train_batch_size",): "train.micro_batch_size and train.grad_accum (x the world size)",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("gradient_clipping",): "train.grad_clip",
    ("optimizer",): "the optimizer section (optimizer.kind, optimizer.eps) and train.lr / train.betas / "
                    "train.weight_decay",
    ("scheduler",): "train.schedule / train.warmup_steps / train.min_lr_ratio (t2i sets the lr every step)",
    ("bf16", "enabled"): "deepspeed.precision",
    ("fp16",): "deepspeed.precision (t2i trains in fp32 or bf16)",
    ("zero_allow_untested_optimizer",): "optimizer.kind (t2i allows the optimizers it offers)",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "overlap_comm"): "deepspeed.overlap_comm",
    ("zero_optimization", "contiguous_gradients"): "deepspeed.contiguous_gradients",
    ("zero_optimization", "reduce_bucket_size"): "deepspeed.reduce_bucket_size",
    ("zero_optimization", "allgather_bucket_size"): "deepspeed.allgather_bucket_size",
    ("zero_optimization", "zero_hpz_partition_size"): "deepspeed.zero_hpz_partition_size",
    ("zero_optimization", "zero_quantized_weights"): "deepspeed.zero_quantized_weights",
    ("zero_optimization", "zero_quantized_gradients"): "deepspeed.zero_quantized_gradients",
    ("zero_optimization", "offload_optimizer"): "optimizer.kind=cpu_adam (DeepSpeedCPUAdam with ZeRO-Offload)",
}
# Keys this DeepSpeed no longer has, with what to use instead.
REMOVED = {
    ("zero_optimization", "mics_shard_size"):
        "MiCS is not offered: DeepSpeed 0.19 removed MiCS ZeRO-3 sharding and rejects the key; "
        "deepspeed.zero_hpz_partition_size (hpZ) keeps a node-local secondary weight shard instead",
    ("zero_optimization", "mics_hierarchical_params_gather"):
        "MiCS is not offered: DeepSpeed 0.19 removed MiCS ZeRO-3 sharding; see deepspeed.zero_hpz_partition_size",
}


def check_extra(extra: dict) -> None:
    """Refuse `deepspeed.extra` keys that a typed key sets, that DeepSpeed removed, or that are misspelled
    versions of either (one line naming the key to use)."""
    for path, value in _leaves(extra):
        dotted = "deepspeed.extra." + ".".join(path)
        for prefix_len in range(1, len(path) + 1):
            prefix = tuple(path[:prefix_len])
            if prefix in OWNED:
                raise ConfigError(f"{dotted} is set by t2i; use {OWNED[prefix]} instead")
            if prefix in REMOVED:
                raise ConfigError(f"{dotted}: {REMOVED[prefix]}")
        if path[0] == "zero_optimization" and len(path) == 2:
            close = difflib.get_close_matches(path[1], [p[1] for p in OWNED if p[0] == "zero_optimization"],
                                              n=1, cutoff=0.8)
            if close:
                owner = OWNED[("zero_optimization", close[0])]
                raise ConfigError(f"{dotted} looks like zero_optimization.{close[0]}, which t2i sets; use {owner}")


def _leaves(d: dict, prefix: tuple = ()):
    """(path, value) of every leaf, and of every section itself (so a whole `optimizer: {...}` is seen)."""
    for k, v in d.items():
        path = prefix + (str(k),)
        yield path, v
        if isinstance(v, dict):
            yield from _leaves(v, path)


def zero_section(cfg) -> dict:
    """`zero_optimization` from deepspeed.* (and ZeRO-Offload for optimizer.kind=cpu_adam)."""
    from t2i.train.optim import zero_offload

    ds = cfg.deepspeed
    zero = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": contiguous_gradients(ds.contiguous_gradients),
            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage <= 2:
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    else:
        zero.update(zero_hpz_partition_size=ds.zero_hpz_partition_size,
                    zero_quantized_weights=ds.zero_quantized_weights,
                    zero_quantized_gradients=ds.zero_quantized_gradients)
    offload = zero_offload(cfg)
    if offload:
        zero["offload_optimizer"] = offload
    return zero


def contiguous_gradients(setting: bool | None) -> bool:
    """`deepspeed.contiguous_gradients`, null resolved by the device: on a GPU DeepSpeed's default (true: the
    gradients are copied into one reduce buffer as backward produces them, which keeps the allocator from
    fragmenting); on the CPU accelerator false, where that per-parameter copy is pure work (3.5 % less CPU
    time per ZeRO-2 step without it, docs/performance.md §6)."""
    if setting is not None:
        return setting
    import torch
    return torch.cuda.is_available()


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed JSON config generated from ours; `deepspeed.extra` is merged on top (checked first)."""
    from t2i.config import deep_merge

    check_extra(cfg.deepspeed.extra)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero_section(cfg),
        # Skip (and report through was_step_applied) any step whose gradient norm is not finite.
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer.kind == "adamw_8bit":  # not on DeepSpeed's list of ZeRO-tested optimizers; t2i tests it
        ds["zero_allow_untested_optimizer"] = True  # (tests/test_train_resume.py: exact resume under ZeRO-2)
    if cfg.logging.phase_times:  # time DeepSpeed's collectives (t2i.train.timing.comm_seconds); syncs each op
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    return deep_merge(ds, copy.deepcopy(cfg.deepspeed.extra))
