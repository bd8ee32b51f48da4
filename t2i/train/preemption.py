"""Preemption and time limits: a signal asks for a checkpoint; all ranks agree at a step boundary.

What reaches a training rank (SLURM; docs/design/slurm.md has the measurements): SIGUSR1 from the batch
script's time-limit trap (`#SBATCH --signal=B:USR1@N`, forwarded with `kill -USR1 $SRUN_PID`), from
`scancel --signal=USR1 <job>` or from `--signal=USR1@N` without `B:`; SIGTERM from `scontrol requeue`,
`scancel`, partition preemption and the time limit itself (SIGKILL follows after KillWait).

The handler only records the signal. After each optimizer step every rank contributes its flag to
one all-reduce (max); if any rank was signalled, all of them save a checkpoint at that same step and
leave with exit code 99 (t2i.errors.EXIT_PREEMPTED), which the batch script turns into a requeue. A signal during a save is seen
only after the save (and its atomic `latest` update) finished; a signal before the first step leaves
without touching the checkpoints.
"""

from __future__ import annotations

import logging
import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
log = logging.getLogger("t2i")


_early = {"signum": 0}


def install_early() -> None:
    """Record SIGUSR1/SIGTERM from process start (before torch is even imported, which takes seconds)
    instead of dying of them; PreemptionGuard takes the recorded signal over."""
    def record(signum, frame):
        _early["signum"] = _early["signum"] or signum
    for s in SIGNALS:
        signal.signal(s, record)


class PreemptionGuard:
    """Install with `PreemptionGuard()`; ask `guard.agreed(device)` at every step boundary (a collective)."""

    def __init__(self, signals=SIGNALS):
        self.signum = _early["signum"]
        if self.signum:
            log.warning("received %s during start-up", signal.Signals(self.signum).name)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self.before_agree = None  # a test hook may pace the steps here (t2i.train.faults)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            log.warning("received %s: will checkpoint and exit at the next step boundary",
                        signal.Signals(signum).name)
        self.signum = self.signum or signum

    def agreed(self, device) -> int:
        """The signal any rank received (0 if none); every rank must call this at the same point."""
        import torch
        import torch.distributed as dist

        if self.before_agree is not None:
            self.before_agree()
        flag = torch.tensor([self.signum], dtype=torch.long, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
