"""Exponential moving average of the weights, kept as this rank's slice (every ZeRO stage).

Each rank holds, updates and saves only its slice of every flattened parameter, so the EMA's memory
and its bytes in a checkpoint scale with 1/world:

* ZeRO-1/2 (`source` "fp32_master"): the slice is the fragment of the fp32 master partition this rank's
  optimizer owns. DeepSpeed links every low-precision parameter to it (`param._hp_mapping`, a
  deepspeed.utils.tensor_fragment.tensor_fragment: `get_hp_fragment()` is the fp32 fragment,
  `lp_fragment_address.start/numel` where it lies in the flattened parameter; DeepSpeed's own
  `safe_get_full_fp32_param` reads the same object, and its `safe_get_local_*` API is ZeRO-3 only).
  A parameter with no fragment on this rank (`_hp_mapping` None) has an empty slice here. In bf16
  the EMA therefore follows the fp32 master, not the bf16 module weights.
* ZeRO-3 (`source` "zero3"): the slice is this rank's partition, elements [rank·k, rank·k + k) of the
  flattened parameter (DeepSpeed pads the last partition; the padding is not kept), read from the fp32
  master partition (`deepspeed.utils.safe_get_local_fp32_param`), or `param.ds_tensor` for a parameter
  the optimizer does not own.
* anything else (`source` "even_split": a model outside DeepSpeed, a parameter without a fragment
  mapping): an even split of the flattened module weight, k = ceil(numel / world) elements per rank.

    shadow ← d·shadow + (1 − d)·θ,   d = min(decay, (1 + n) / (10 + n))   (n = applied updates)

State format 2 (`state_dict`), one per rank, readable without knowing DeepSpeed's layout:

    {"format": 2, "decay", "updates", "zero3": True (legacy key: the shadow holds slices), "source",
     "rank", "world", "shapes": {name: full shape},
     "slices": {name: (offset, length)}   in the flattened parameter,
     "shadow": {name: fp32 1-D tensor of `length` elements}}

Older states (format 1, no "format" key) still load and consolidate: `zero3` False holds full tensors
(ZeRO-1/2: every rank had the whole EMA), `zero3` True a ZeRO-3 partition of k padded elements (rank
given by the position in the list). `consolidate` assembles full tensors from the states in rank
order, one state at a time (pass a generator and each rank's file is read once); `load_state_dict`
takes this rank's own state, a full-tensor state, or every rank's state of another world size (then
it copies only the overlap of each old slice with its own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

FORMAT = 2


def _numel(shape) -> int:
    return math.prod(shape)


class ShardedEMA:
    def __init__(self, model: torch.nn.Module, decay: float, rank: int | None = None, world: int | None = None,
                 trainable_only: bool = False):
        """`trainable_only`: average only the parameters with requires_grad (a LoRA run: the adapters; the
        frozen base is not kept, not saved, and `update` skips it). Default: every parameter."""
        self.decay = decay
        self.updates = 0
        ddp = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        self.world = world if world is not None else (dist.get_world_size() if ddp else 1)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        self.zero3 = any(hasattr(p, "ds_tensor") for _, p in params)
        mapped = any(hasattr(p, "_hp_mapping") for _, p in params)
        self.source = "zero3" if self.zero3 else "fp32_master" if mapped else "even_split"
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params}
        self.slices: dict[str, tuple[int, int]] = {}
        self.padded: dict[str, int] = {}  # ZeRO-3: elements of this rank's (padded) partition
        for n, p in params:
            numel = _numel(self.shapes[n])
            if hasattr(p, "ds_tensor"):
                k = p.ds_tensor.numel()
                self.padded[n] = k
                start = min(self.rank * k, numel)
                self.slices[n] = (start, min(k, numel - start))
            elif hasattr(p, "_hp_mapping"):
                m = p._hp_mapping
                self.slices[n] = (0, 0) if m is None else (int(m.lp_fragment_address.start),
                                                         int(m.lp_fragment_address.numel))
            else:
                k = -(-numel // self.world)
                start = min(self.rank * k, numel)
                self.slices[n] = (start, min(k, numel - start))
        with torch.no_grad():
            self.shadow = {n: self._current(p, n).float().clone() for n, p in params}

    def _current(self, p: torch.nn.Parameter, name: str) -> torch.Tensor:
        """This rank's slice of the current weights, flat (fp32 master where DeepSpeed has one)."""
        start, length = self.slices[name]
        if hasattr(p, "ds_tensor"):
            local = None
            if hasattr(p, "_z3_optimizer") and p.requires_grad:
                from deepspeed.utils import safe_get_local_fp32_param
                local = safe_get_local_fp32_param(p)
            local = p.ds_tensor if local is None else local
            return local.detach().reshape(-1)[:length]
        if hasattr(p, "_hp_mapping"):
            m = p._hp_mapping
            if m is None:
                return p.detach().new_empty(0)
            return m.get_hp_fragment().detach().reshape(-1)
        return p.detach().reshape(-1)[start:start + length]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step over every parameter slice of this rank, as one multi-tensor lerp (torch's
        _foreach_lerp_: one kernel launch per device and dtype instead of one per parameter)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows, currents = [], []
        for n, p in model.named_parameters():
            if self.slices.get(n, (0, 0))[1]:  # (not kept: a frozen parameter of a trainable_only EMA)
                shadows.append(self.shadow[n])
                currents.append(self._current(p, n).float())
        if shadows:
            torch._foreach_lerp_(shadows, currents, 1.0 - d)
        self.updates += 1
        return d

    def state_dict(self) -> dict:
        return {"format": FORMAT, "decay": self.decay, "updates": self.updates, "zero3": True,
                "source": self.source, "rank": self.rank, "world": self.world, "shapes": self.shapes,
                "slices": dict(self.slices), "shadow": self.shadow}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    @torch.no_grad()
    def load_state_dict(self, state: dict | list[dict]) -> None:
        """This rank's own saved state; a full-tensor state (format 1 `zero3` False, any world size or
        stage); or a list of every rank's state (rank order) of another world size, from which only the
        overlap with this rank's slice is copied."""
        if isinstance(state, (list, tuple)):
            return self._reslice(state)
        if {n: tuple(s) for n, s in state["shapes"].items()} != self.shapes:
            raise ValueError("EMA state does not match this model's parameters")
        fmt = state.get("format", 1)
        if fmt > FORMAT:
            raise ValueError(f"EMA state format {fmt} is newer than this t2i reads ({FORMAT})")
        if fmt == 1 and not state["zero3"]:  # full tensors: keep this rank's slice
            own = {n: t.reshape(-1)[s:s + k] for n, t in state["shadow"].items() for s, k in [self.slices[n]]}
        elif fmt == 1:  # a format-1 ZeRO-3 partition: must be this rank's partition of this world
            if self.source != "zero3" or any(state["shadow"][n].numel() != k for n, k in self.padded.items()):
                raise ValueError("EMA state is a ZeRO-3 shard of another partitioning (world size); load every "
                                 "rank's state (a list) or the consolidated state instead "
                                 "(t2i.checkpoint.store.consolidated_ema_state)")
            own = {n: t.reshape(-1)[:self.slices[n][1]] for n, t in state["shadow"].items()}
        else:
            if {n: tuple(s) for n, s in state["slices"].items()} != self.slices:
                raise ValueError("EMA state is a slice of another partitioning (world size or ZeRO stage); load "
                                 "every rank's state (a list) or the consolidated state instead "
                                 "(t2i.checkpoint.store.consolidated_ema_state)")
            own = state["shadow"]
        self.decay, self.updates = state["decay"], state["updates"]
        for n, t in own.items():
            self.shadow[n].copy_(t.reshape(-1))

    def _reslice(self, states: Iterable[dict]) -> None:
        covered = {n: 0 for n in self.shadow}
        first = None
        for index, state in enumerate(states):
            if first is None:
                first = state
                if {n: tuple(s) for n, s in state["shapes"].items()} != self.shapes:
                    raise ValueError("EMA state does not match this model's parameters")
            for n, offset, flat in pieces(state, index):
                start, length = self.slices[n]
                lo, hi = max(offset, start), min(offset + flat.numel(), start + length)
                if lo < hi:
                    self.shadow[n][lo - start:hi - start].copy_(flat[lo - offset:hi - offset])
                    covered[n] += hi - lo
            if _is_full(state):
                break
        if first is None:
            raise ValueError("no EMA state to load")
        short = [n for n, c in covered.items() if c != self.slices[n][1]]
        if short:
            raise ValueError(f"the EMA states do not cover this rank's slice of {short[0]} "
                             f"({len(short)} parameter(s)): a rank's state is missing")
        self.decay, self.updates = first["decay"], first["updates"]


def _is_full(state: dict) -> bool:
    return state.get("format", 1) == 1 and not state["zero3"]


def pieces(state: dict, index: int) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(name, offset in the flattened parameter, flat fp32 slice) of everything a saved EMA state holds;
    `index` is the state's rank (needed for format-1 ZeRO-3 partitions, which do not record it)."""
    fmt = state.get("format", 1)
    if fmt > FORMAT:
        raise ValueError(f"EMA state format {fmt} is newer than this t2i reads ({FORMAT})")
    for n, t in state["shadow"].items():
        flat = t.reshape(-1)
        if fmt >= 2:
            offset, length = state["slices"][n]
            yield n, offset, flat[:length]
        elif not state["zero3"]:
            yield n, 0, flat
        else:
            numel = _numel(state["shapes"][n])
            offset = min(index * flat.numel(), numel)
            yield n, offset, flat[:min(flat.numel(), numel - offset)]


def consolidate(states: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors from the per-rank states in rank order. The states are consumed one at a time
    (a generator that loads each rank's file reads it once and can drop it before the next); the slices
    are copied into preallocated full tensors. A format-1 full-tensor state ends the reading (it holds all)."""
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for index, state in enumerate(states):
        if not full:
            full = {n: torch.empty(tuple(s), dtype=torch.float32) for n, s in state["shapes"].items()}
            covered = {n: 0 for n in full}
        for n, offset, flat in pieces(state, index):
            full[n].view(-1)[offset:offset + flat.numel()].copy_(flat)
            covered[n] += flat.numel()
        if _is_full(state):
            break
    short = [n for n, c in covered.items() if c != full[n].numel()]
    if short:
        raise ValueError(f"the EMA states cover {covered[short[0]]} of {full[short[0]].numel()} elements of "
                         f"{short[0]} ({len(short)} parameter(s)): a rank's state is missing")
    return full
