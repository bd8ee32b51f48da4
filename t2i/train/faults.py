"""Fault injection for the test suite, in one place. Production code never reads these variables
itself; `install` attaches a hook only when one is set, and unset they cost nothing.

    T2I_TEST_PAUSE_IN_SAVE="<step>:<rank>"   that rank, saving that step, writes its pid to
                                            <tag>/.paused-rank<rank> once its DeepSpeed and client files
                                            are written (before meta.json / latest), then sleeps 600 s,
                                            so a test can kill -9 it mid-save (tests/test_ckpt_tools.py)
    T2I_TEST_MIN_STEP_SECONDS=s             every step lasts at least s seconds, so that Slurm's
                                            time-limit warning (1-minute --time granularity, up to
                                            60 s early) lands mid-training however fast the machine
                                            is (tests/test_slurm.py)
    T2I_TEST_DUMP_TRAINABLE=<dir>           at every save, once the rank files are written, every rank
                                            gathers the live fp32 master of each trainable parameter
                                            (DeepSpeed's safe_get_full_fp32_param, collective under
                                            ZeRO-3) and rank 0 writes them to <dir>/step<N>.pt, so a test
                                            can compare what a tag holds with what was live
                                            (tests/test_lora_train.py)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from t2i.io import write_text

PAUSE_ENV = "T2I_TEST_PAUSE_IN_SAVE"
PACE_ENV = "T2I_TEST_MIN_STEP_SECONDS"
DUMP_ENV = "T2I_TEST_DUMP_TRAINABLE"


def install(guard, checkpointer) -> None:
    """Attach the hooks the environment asks for to the preemption guard and the checkpointer."""
    pace = float(os.environ.get(PACE_ENV) or 0)
    if pace > 0:
        guard.before_agree = _Pacer(pace)
    want = os.environ.get(PAUSE_ENV)
    if want:
        checkpointer.after_rank_files = _PauseInSave(want)
    dump = os.environ.get(DUMP_ENV)
    if dump:
        checkpointer.after_rank_files = _DumpTrainable(Path(dump), checkpointer.engine)


class _Pacer:
    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> None:
        time.sleep(max(0.0, self.seconds - (time.monotonic() - self.last)))
        self.last = time.monotonic()


class _PauseInSave:
    def __init__(self, want: str):
        self.want = want

    def __call__(self, tag_dir: Path, step: int, rank: int) -> None:
        if self.want == f"{step}:{rank}":
            write_text(tag_dir / f".paused-rank{rank}", str(os.getpid()))
            time.sleep(600)


class _DumpTrainable:
    def __init__(self, folder: Path, engine):
        self.folder, self.engine = folder, engine

    def __call__(self, tag_dir: Path, step: int, rank: int) -> None:
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        live = {n: safe_get_full_fp32_param(p).detach().cpu().clone()
                for n, p in self.engine.module.named_parameters() if p.requires_grad}
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(live, self.folder / f"step{step}.pt")
