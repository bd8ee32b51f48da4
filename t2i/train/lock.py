"""One run per run folder: an exclusive lock file, taken before any start-up work.

`<run>/.lock` is created with O_CREAT | O_EXCL (atomic on local and NFS v3+ file systems) and holds
{"host", "pid", "started"} of the process that owns the run (rank 0). A second start on the same
run name fails at once with a one-line error naming the holder. A lock whose holder is a dead
process on this host (a kill -9, an OOM kill, a node reboot of a single-node job) is stale: it is
moved aside and taken over. A lock written by an earlier run of the same SLURM
job (a requeue, possibly on another node) is taken over too. A lock held from another host is
respected, since this host cannot tell whether that process lives; the message says which file to
remove once the user knows it does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from t2i.errors import ConfigError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(other: dict, me: dict) -> bool:
    """The holder is gone: a dead process on this host, or an earlier run of this same SLURM job (a
    requeued job keeps its id and Slurm runs one instance of a job at a time, on any node)."""
    if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
        return True
    return bool(me.get("slurm_job")) and other.get("slurm_job") == me["slurm_job"] and (
        other.get("host") != me["host"] or other.get("pid") != me["pid"])


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


class RunLock:
    """`with RunLock(run_dir):` or acquire() / release(). Owned by one process (rank 0)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def check_free(self) -> None:
        """Raise the ConfigError `acquire` would raise if the folder is held by a live run, without
        taking the lock (t2i.train.plan: a busy run folder is named before any rank starts)."""
        other = self.holder()
        if other and not _stale(other, _me()):
            raise ConfigError(self._busy_message(other))

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    other = self.holder()
                if other and _stale(other, me):
                    # stale: its process is gone. Move it aside under a unique name (only one taker wins
                    # the rename), then race for the O_EXCL create like everyone else.
                    try:
                        os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                    except FileNotFoundError:
                        pass
                    continue
                raise ConfigError(self._busy_message(other))
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            for stale in self.path.parent.glob(f"{LOCK_NAME}.stale-*"):
                stale.unlink(missing_ok=True)
            return self
        raise ConfigError(self._busy_message(self.holder()))

    def _busy_message(self, other: dict | None) -> str:
        if not other:
            return f"{self.path.parent} is locked by another start ({self.path} is unreadable); retry in a moment"
        where = (f"process {other.get('pid')} on {other.get('host')}, started {other.get('started')}")
        local = other.get("host") == socket.gethostname()
        hint = ("wait for it or stop it" if local else
                f"if that job is gone, remove {self.path} (its host cannot be checked from here)")
        return f"run folder {self.path.parent} is in use by {where}; {hint}, or choose another run.name"

    def release(self) -> None:
        if self.held:
            current = self.holder()
            if current and current.get("pid") == os.getpid() and current.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(run_dir: str | Path, rank: int):
    """Rank 0 takes the run folder's lock, every rank learns the outcome (a collective), and rank 0
    releases it when the block ends, however it ends."""
    import torch.distributed as dist

    lock, error = RunLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except ConfigError as e:
            error = str(e)
    box = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])
    try:
        yield lock
    finally:
        lock.release()
