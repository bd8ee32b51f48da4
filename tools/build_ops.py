"""Build DeepSpeed's CPU ops once, at set-up, instead of inside the first run that needs them.

DeepSpeed compiles its C++ ops just in time (ninja, into ~/.cache/torch_extensions) the first time a
process loads one. On a CPU machine t2i may load two: DeepSpeedCPUAdam (`optimizer.kind=cpu_adam`) and
the CPU build of FusedAdam (`optimizer.kind=deepspeed_adam`); it skips DeepSpeed's shared-memory
all-reduce (t2i.train.engine.skip_shm_allreduce). Built inside a run, that first compile (30-40 s each
on 2 cores) lands in the middle of a training job or a test. `make setup` runs this module so they are
built with the rest of the install; a later load finds them cached.

    python -m tools.build_ops            # builds what is missing; a no-op when all are cached

With a GPU (a CUDA accelerator) it builds nothing: DeepSpeed's CUDA ops are built at install time
(DS_BUILD_OPS=1) or just in time on the cluster, where the compiler and the GPU are.
"""

from __future__ import annotations

import sys
import time

OPS = ("CPUAdamBuilder", "FusedAdamBuilder")


def main() -> int:
    from t2i.runtime import configure_environment

    configure_environment()  # DS_ACCELERATOR=cpu without CUDA; this environment's ninja first on PATH
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"build_ops: accelerator {accelerator.device_name()}: nothing to build here (DeepSpeed builds its "
              "CUDA ops at install with DS_BUILD_OPS=1, or when first used)")
        return 0
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"build_ops: {name}: not buildable here (skipped; a run that needs it says why)")
            continue
        t0 = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as e:  # set-up goes on: the run that needs the op builds it, or says why it cannot
            print(f"build_ops: {builder.absolute_name()} did not build ({type(e).__name__}: {e}); skipped")
            continue
        print(f"build_ops: {builder.absolute_name()} ready ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
