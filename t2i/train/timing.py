"""Where a training step's time goes: per-phase wall times, DeepSpeed's collective time, peak memory.

    phases = Phases(enabled=True, device=device, comm=comm_seconds)
    with phases("data"):
        batch = next(loader)
    ...
    metrics.update(phases.collect())    # {"time": {"data": s, ..., "comm": s}} since the last collect

`loop` (the training loop's own bookkeeping after a step: the log line's all-reduce, metrics.jsonl,
checkpoint and preemption checks) is added by the loop and reported with the next step's phases.

On a GPU the phases synchronise the device at their boundaries (otherwise a phase would only
measure kernel launches), which removes some overlap: a few % of throughput, so it is off unless
`logging.phase_times` is set (`t2i bench` sets it). `comm` is the time DeepSpeed's collectives took
(its comms logger, which also synchronises each op); it lies *inside* backward and step, so it is
a breakdown of them, not an extra phase.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Phases:
    def __init__(self, enabled: bool, device: torch.device, comm=None):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.comm = comm if enabled else None
        self.times: dict[str, float] = defaultdict(float)
        self._comm0 = comm() if self.comm else 0.0

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.times[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Add a span timed by the caller (e.g. the loop's bookkeeping, which contains collect itself)."""
        if self.enabled:
            self.times[name] += seconds

    def collect(self) -> dict:
        """{"time": {phase: seconds}} accumulated since the last call (empty when disabled)."""
        if not self.enabled:
            return {}
        out = dict(self.times)
        if self.comm:
            now = self.comm()
            out["comm"], self._comm0 = now - self._comm0, now
        self.times.clear()
        return {"time": out}


def comm_seconds() -> float:
    """Total time spent in DeepSpeed collectives so far, from its comms logger (0 if it is off).

    The logger records, per op, `timers(name).elapsed(reset=False)`: the running total of that op
    name's timer, not the op's own latency (DeepSpeed 0.19). So the latest (largest) record of each
    name is its total; summing the records, as DeepSpeed's own summary does, over-counts."""
    from deepspeed.comm import comms_logger

    if not comms_logger.enabled:
        return 0.0
    totals = [max(max(entry[1]) for entry in sizes.values()) for sizes in comms_logger.comms_dict.values() if sizes]
    return sum(totals) / 1e3


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
