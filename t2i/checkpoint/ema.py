"""Exponential moving average of the weights, kept as this rank's shard.

Under ZeRO-1/2 every rank holds full parameters and its shadow is the full model; under ZeRO-3
each rank updates a shadow of its own parameter partition (`param.ds_tensor`), so an update never
gathers. `consolidate` rebuilds full tensors from the per-rank shards (ZeRO-3 partitions are the
flattened parameter split in rank order, zero-padded at the end).

    shadow ← d·shadow + (1 − d)·θ,   d = min(decay, (1 + n) / (10 + n))   (n = applied updates)

A consolidated (full-tensor) state loads under any ZeRO stage and world size: a ZeRO-3 rank keeps
its own slice of it. That is how a resume at another world size carries the EMA over.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.zero3 = any(hasattr(p, "ds_tensor") for p in model.parameters())
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
        self.shadow = {n: _local(p).detach().float().clone() for n, p in model.named_parameters()}
        # ZeRO-3 partition index: rank r holds elements [r·k, (r+1)·k) of each flattened parameter.
        self.rank = dist.get_rank() if self.zero3 and dist.is_initialized() else 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(_local(p).detach().float(), 1.0 - d)
        self.updates += 1
        return d

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "zero3": self.zero3, "shapes": self.shapes,
                "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state, or a consolidated one (`zero3` False: full tensors) from any
        world size or ZeRO stage."""
        if {n: tuple(s) for n, s in state["shapes"].items()} != self.shapes:
            raise ValueError("EMA state does not match this model's parameters")
        if state["zero3"] and any(state["shadow"][n].shape != t.shape for n, t in self.shadow.items()):
            raise ValueError("EMA state is a ZeRO-3 shard of another partitioning (world size); load the "
                             "consolidated state instead (t2i.checkpoint.store.consolidated_ema_state)")
        self.decay, self.updates = state["decay"], state["updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(self._own_slice(n, t) if self.zero3 and not state["zero3"] else t)

    def _own_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a full tensor, zero-padded like DeepSpeed's."""
        k = self.shadow[name].numel()
        part = full.reshape(-1)[self.rank * k:(self.rank + 1) * k]
        return torch.cat([part, part.new_zeros(k - part.numel())]).view_as(self.shadow[name])


def consolidate(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the per-rank states (rank order)."""
    first = states[0]
    if not first["zero3"]:
        return {n: t.clone() for n, t in first["shadow"].items()}
    full = {}
    for n, shape in first["shapes"].items():
        flat = torch.cat([s["shadow"][n].reshape(-1) for s in states])
        numel = 1
        for k in shape:
            numel *= k
        full[n] = flat[:numel].view(shape).clone()
    return full
