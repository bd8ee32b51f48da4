"""One error model for everything a user can get wrong, and the process exit codes.

Every problem a user can fix (a config key, a path, the data, a checkpoint, evaluation input) raises
a subclass of `T2IError` with a message that names the key, flag or file and says how to fix it.
`t2i.cli` catches `T2IError` in one place and prints one line. Anything else is a bug: it keeps its
traceback. `Preempted` is not an error: the run checkpointed on a signal and asks to be requeued.

    exit 0   success
    exit 1   a bug (uncaught exception, traceback printed)
    exit 2   a user error (T2IError: one line on stderr)
    exit 99  checkpointed and stopped on SIGUSR1 / SIGTERM (SLURM requeues; resume with --auto-resume)
"""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_PREEMPTED = 0, 1, 2, 99


class T2IError(Exception):
    """A problem with the user's input or environment; the message says what to change."""


class ConfigError(T2IError):
    """A config key, value or combination (the message names the key)."""


class DataError(T2IError):
    """Shards not found, no usable samples, too many bad samples, a stale or missing cache."""


class CacheError(DataError):
    """A precomputed `data.cache` that does not match the run (the differing fields are named)."""


class CheckpointError(T2IError):
    """A checkpoint that is missing, incomplete, unreadable or of another layout; export problems."""


class EvalError(T2IError):
    """Input to sampling or scoring: prompts, sample folders, detectors, FID references."""


class NonFiniteError(T2IError):
    """Training stopped after too many consecutive non-finite steps (the last good checkpoint is named)."""


class Preempted(Exception):
    """Raised on every rank after they agreed on a signal and (if there was progress) checkpointed."""

    def __init__(self, step: int, signum: int, saved: bool):
        import signal

        self.step, self.signum, self.saved = step, signum, saved
        what = f"checkpointed at step {step}" if saved else f"stopped at step {step} (nothing new to save)"
        super().__init__(f"{signal.Signals(signum).name} received: {what}")
