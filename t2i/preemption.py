"""Preemption and time limits: a signal asks for a checkpoint; all ranks agree at a step boundary.

What reaches a training rank (SLURM, measured in ../shared/SLURM_NOTES.md): SIGUSR1 from the batch
script's time-limit trap (`#SBATCH --signal=B:USR1@N`, forwarded with `kill -USR1 $SRUN_PID`), from
`scancel --signal=USR1 <job>` or from `--signal=USR1@N` without `B:`; SIGTERM from `scontrol requeue`,
`scancel`, partition preemption and the time limit itself (SIGKILL follows after KillWait).

The handler only records the signal. After each optimizer step every rank contributes its flag to
one all-reduce (max); if any rank was signalled, all of them save a checkpoint at that same step and
leave with EXIT_CODE, which the batch script turns into a requeue. A signal during a save is seen
only after the save (and its atomic `latest` update) finished; a signal before the first step leaves
without touching the checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import time

EXIT_CODE = 99  # "checkpointed because asked to; requeue me" (slurm/common.sh requeues on it)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Test hook, used by tests/test_slurm.py: T2I_TEST_MIN_STEP_SECONDS=s makes every step last at least s
# seconds, so that Slurm's time-limit warning (1-minute --time granularity, up to 60 s early) lands
# mid-training however fast the machine is. Unset, it costs nothing.
PACE_ENV = "T2I_TEST_MIN_STEP_SECONDS"
log = logging.getLogger("t2i")


class Preempted(Exception):
    """Raised out of the training loop after the checkpoint is saved; the CLI exits with EXIT_CODE."""

    def __init__(self, step: int, signum: int, saved: bool):
        self.step, self.signum, self.saved = step, signum, saved
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: " + (f"checkpointed at step {step}" if saved else
                                                 f"stopped at step {step} (nothing new to save)"))


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
        self._pace = float(os.environ.get(PACE_ENV, 0) or 0)
        self._last = time.monotonic()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            log.warning("received %s: will checkpoint and exit at the next step boundary",
                        signal.Signals(signum).name)
        self.signum = self.signum or signum

    def agreed(self, device) -> int:
        """The signal any rank received (0 if none); every rank must call this at the same point."""
        import torch
        import torch.distributed as dist

        if self._pace:
            time.sleep(max(0.0, self._pace - (time.monotonic() - self._last)))
            self._last = time.monotonic()
        flag = torch.tensor([self.signum], dtype=torch.long, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
