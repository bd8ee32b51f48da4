"""torchrun for `--nproc N`, minus its failure report, plus the ranks' exit code.

`python -m torch.distributed.run` answers any rank that exits non-zero with a ~40-line
ChildFailedError traceback and exit code 1. For t2i that buries the one line the rank printed
(`t2i train: DataError: ...`) and loses the exit code that matters: 2 for a user error, 99 for
"checkpointed on a signal, requeue me". This module runs torchrun's own `run()` (same arguments, same
elastic agent) and, when ranks fail, prints one line and exits with their code:

    every failed rank exited 99  -> 99 (preempted and checkpointed)
    any rank exited 2            -> 2  (a user error; its message is above)
    otherwise                    -> the first failed rank's code (1 for a bug; its traceback is above)

    python -m t2i.launch --standalone --nproc_per_node=2 -m t2i.cli train ...   (t2i.runtime.relaunch)
"""

from __future__ import annotations

import gc
import logging
import sys

from t2i.errors import EXIT_BUG, EXIT_PREEMPTED, EXIT_USER


def exit_code(codes: list[int]) -> int:
    """One exit code for the ranks' codes (in order of failure), as the table above."""
    codes = [c for c in codes if c != 0]
    if not codes:
        return 0
    if all(c == EXIT_PREEMPTED for c in codes):
        return EXIT_PREEMPTED
    if EXIT_USER in codes:
        return EXIT_USER
    return codes[0] if codes[0] > 0 else EXIT_BUG  # a signal shows as a negative code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent's own "failed (exitcode: 2) local_rank: 0 ..." error line: the summary below says it once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        failures = sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)
        codes = [f.exitcode for _, f in failures]
        code = exit_code(codes)
        ranks = ", ".join(f"rank {r}: {f.exitcode}" for r, f in sorted(e.failures.items()))
        what = {EXIT_PREEMPTED: "checkpointed and stopped", EXIT_USER: "stopped on a user error (above)"}
        print(f"t2i: {len(failures)} rank(s) exited ({ranks}); {what.get(code, 'failed (see above)')}",
              file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    rc = main()
    gc.freeze()  # the process ends now: no collector pass over torch's objects at exit (as t2i.cli.main)
    sys.exit(rc)
