"""The optimizer DeepSpeed wraps: which AdamW implementation runs the update, and keeping it after a resume.

Why this is its own module: under ZeRO-1/2/3, DeepSpeed calls the client optimizer's `step()` on each rank's
flat fp32 partition, so the optimizer's kernel is most of DeepSpeed's optimizer phase. torch's AdamW without
`fused` takes the foreach path (several passes over the partition per step); `fused=True` is one pass. On the
CPU (one rank's 1.15 M-element partition of the tiny model) fused is ~6x faster than foreach; on an H100 the
plain loop's fused step was 44-56 ms against DeepSpeed's 260-290 ms with foreach (docs/performance.md).

Kinds (`optimizer.kind`), all the same AdamW update (decoupled weight decay, bias correction):

* `adamw`: torch.optim.AdamW; `optimizer.implementation` auto = fused wherever torch has the fused kernel
  (CUDA, CPU, ...), else foreach.
* `deepspeed_adam`: DeepSpeed's FusedAdam (a JIT-built multi-tensor kernel; on the CPU accelerator its
  AVX kernel).
* `cpu_adam`: DeepSpeedCPUAdam with ZeRO-Offload (`zero_optimization.offload_optimizer.device: cpu`):
  fp32 master weights, Adam state and the update live on the CPU; the GPU keeps bf16 weights and
  gradients. For GPUs short of memory; slower per step.
* `adamw_8bit`: bitsandbytes' AdamW8bit (blockwise 8-bit Adam state, 2 instead of 8 bytes per parameter).
  Optional dependency (`pip install t2i[bnb]`).

A checkpoint restores the optimizer's param groups as they were saved (torch's `load_state_dict` copies
every group key), so a run resumed from a checkpoint written with another implementation, or with other
betas, would silently keep the old ones. `restore_settings` puts the configured ones back after a load.
"""

from __future__ import annotations

import logging

import torch

from t2i.config import Config
from t2i.errors import ConfigError

log = logging.getLogger("t2i")

# The group keys t2i's config decides; `lr` is set every step by the schedule (t2i.train.engine.set_lr).
CONFIGURED = ("betas", "eps", "weight_decay")


def fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device type (CUDA, CPU, XPU, MPS in torch >= 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return device.type in _get_fused_kernels_supported_devices()


def implementation(cfg: Config, device: torch.device) -> str:
    """torch AdamW's code path: fused | foreach | for_loop (`optimizer.implementation`, auto resolved)."""
    chosen = cfg.optimizer.implementation
    if chosen == "auto":
        return "fused" if fused_supported(device) else "foreach"
    if chosen == "fused" and not fused_supported(device):
        raise ConfigError(f"optimizer.implementation=fused: this torch has no fused AdamW for {device.type}; "
                          f"use 'auto' or 'foreach'")
    return chosen


def settings(cfg: Config, device: torch.device) -> dict:
    """The param-group values the config decides, for the configured kind."""
    t, o = cfg.train, cfg.optimizer
    out = {"betas": tuple(float(b) for b in t.betas), "eps": float(o.eps), "weight_decay": float(t.weight_decay)}
    if o.kind == "adamw":
        impl = implementation(cfg, device)
        out.update(fused=impl == "fused", foreach=impl == "foreach")
    return out


def build(params: list, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer for `params` (the trainable parameters); DeepSpeed's ZeRO then takes it over."""
    kind, t = cfg.optimizer.kind, cfg.train
    s = settings(cfg, device)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, **s)
    if kind == "deepspeed_adam":
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, lr=t.lr, adam_w_mode=True, **s)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=t.lr, adamw_mode=True, **s)
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError(f"optimizer.kind=adamw_8bit needs bitsandbytes (pip install 't2i[bnb]'): {e}") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, **s)
    raise ConfigError(f"optimizer.kind {kind!r} is not one of adamw, deepspeed_adam, cpu_adam, adamw_8bit")


def zero_offload(cfg: Config) -> dict | None:
    """DeepSpeed's `zero_optimization.offload_optimizer` block (ZeRO-Offload) for `cpu_adam`, else None."""
    if cfg.optimizer.kind != "cpu_adam":
        return None
    return {"device": "cpu", "pin_memory": cfg.optimizer.offload_pin_memory}


def base_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


@torch.no_grad()
def restore_settings(optimizer, cfg: Config, device: torch.device) -> dict:
    """Put the configured settings back into every param group after a checkpoint load; returns
    {key: (checkpoint's value, configured value)} for what differed (logged). A switch to fused moves each
    state's `step` counter to the parameter's device as float32, where torch's fused kernel expects it."""
    base = base_optimizer(optimizer)
    want = settings(cfg, device)
    changed = {}
    for group in base.param_groups:
        for key, value in want.items():
            old = group.get(key)
            if (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
                changed[key] = (old, value)
            group[key] = value
        if want.get("fused"):
            for p in group["params"]:
                state = base.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device, torch.float32)
    base.defaults.update(want)
    if changed:
        log.info("optimizer: the checkpoint had %s; using the configured values",
                 ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items()))
    return changed


def describe(optimizer) -> str:
    """One line for the log: class, code path and hyperparameters of the first param group."""
    base = base_optimizer(optimizer)
    g = base.param_groups[0]
    path = ""
    if isinstance(base, torch.optim.AdamW):
        path = " fused" if g.get("fused") else " foreach" if g.get("foreach") else " for-loop"
    return (f"{type(base).__module__}.{type(base).__name__}{path}, betas {tuple(g['betas'])}, eps {g['eps']}, "
            f"weight_decay {g['weight_decay']}")
