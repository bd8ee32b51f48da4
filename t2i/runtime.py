"""Process set-up shared by every command: offline model libraries, DeepSpeed's CPU accelerator on a
machine without CUDA, and re-launching a command under torchrun with N local ranks."""

from __future__ import annotations

import os
import subprocess
import sys


def configure_environment() -> None:
    """Process-wide settings that must precede the heavy imports (transformers, DeepSpeed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")           # weights come from local folders only
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_allocator_default()
    put_environment_tools_first()
    import logging
    import warnings
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
    # bitsandbytes (imported by diffusers / transformers) warns on CPUs with AVX512-BF16 that an optional
    # 4-bit kernel package is missing; t2i never runs 4-bit kernels, and the line would precede every
    # one-line error of a command that builds a model
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")      # DeepSpeed's CPU accelerator + gloo
    from t2i import trust
    trust.protect_process()                                # every torch.load is weights-only (t2i.trust)


def put_environment_tools_first() -> None:
    """Put the Python environment's own bin/ first on PATH when it has `ninja`. DeepSpeed builds its C++
    ops just in time (cpu_adam for ZeRO-Offload, even on GPU machines) with whatever `ninja` PATH finds
    first. A run started as `.venv/bin/t2i` found the system's ninja (Debian: 1.11); the same run in a SLURM
    job, whose script activates the environment, found the one pip installed with DeepSpeed (1.13). The
    two keep their build logs differently, so each took the other's build for stale and rebuilt the op
    (25-40 s each time; 19 times in 20 minutes of one test run). Activating the environment or not now
    makes no difference."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bindir] and os.path.isfile(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in path if p != bindir)])


# The CUDA caching allocator's settings t2i starts with (a user's PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF wins).
ALLOCATOR_DEFAULT = "expandable_segments:True"


def set_allocator_default() -> None:
    """expandable_segments: the allocator grows a segment in place instead of caching many fixed-size
    blocks, so the memory freed between forward, backward and DeepSpeed's step is reused without
    fragmentation (PyTorch's CUDA memory notes recommend it when the batch shapes vary or memory is tight).
    It is read when CUDA's allocator starts, so it is set before torch is imported; harmless on a CPU."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT


def under_launcher() -> bool:
    """True inside torchrun / srun ranks (RANK is set)."""
    return "RANK" in os.environ


def relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run `t2i <argv>` under torchrun with `nproc` local ranks (--nproc removed); the ranks' exit
    code (t2i.launch: 2 for a user error, 99 when preempted, without torchrun's failure report)."""
    cmd = [sys.executable, "-m", "t2i.launch", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "t2i.cli", *strip_nproc(argv)]
    return subprocess.call(cmd)


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
