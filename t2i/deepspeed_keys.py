"""Which DeepSpeed JSON keys t2i sets itself, so that `deepspeed.extra` cannot set them a second time.

Every DeepSpeed setting t2i decides comes from one typed key (train.micro_batch_size, deepspeed.zero_stage,
deepspeed.overlap_comm, ...; t2i.train.ds_config builds the JSON). `deepspeed.extra` is merged on top for
everything else DeepSpeed offers, but a key that one of ours already sets is refused: two places for one
setting would let the YAML say one thing while the run did another. An `optimizer` or `scheduler` block is
refused too: t2i hands DeepSpeed its own optimizer (t2i.train.optim) and sets the learning rate every step,
and DeepSpeed silently ignores a config optimizer when a client optimizer is given.

A core module (no torch, no DeepSpeed): the config checks `deepspeed.extra` when it is loaded, before any
launch.
"""

from __future__ import annotations

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
