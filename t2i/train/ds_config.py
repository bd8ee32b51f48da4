"""The DeepSpeed JSON config generated from ours: `zero_optimization` from the typed deepspeed.* keys (and
ZeRO-Offload for optimizer.kind=cpu_adam), then `deepspeed.extra` merged on top after t2i.ds_keys
has refused any key a typed key already sets.
"""

from __future__ import annotations

import copy

from t2i.ds_keys import check_extra


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
