"""No checkpoint file t2i reads can run code.

A `.pt` file is a pickle: loading one with `torch.load(weights_only=False)` (what DeepSpeed's
loaders do) runs whatever objects it names, so a planted object in a downloaded run would run
`os.system` the moment it is read. t2i therefore

1. scans every pickle before anything opens it (`torch.serialization.get_unsafe_globals_in_checkpoint`
   reads the pickle's opcodes, it does not execute them) and refuses a file that names any global
   outside `ALLOWED`: exactly what t2i and DeepSpeed write (numpy arrays for RNG states, DeepSpeed's
   ZeRO stage enum, loss scaler and fragment addresses). The message names the file and the global;
2. loads its own files with `weights_only=True` and those globals allowlisted; and
3. sets `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` for the process (`protect_process`), which turns every
   `torch.load` in it, DeepSpeed's included, into a weights-only load with the same allowlist.

A checkpoint the user trusts (one they wrote with another tool that pickles more) can be loaded
with `T2I_TRUST_CHECKPOINTS=1`: the scan is skipped and torch's default applies. Never set it
for a checkpoint downloaded from someone else. docs/reliability.md has the security model.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from t2i.errors import CheckpointError

TRUST_ENV = "T2I_TRUST_CHECKPOINTS"
# Globals beyond torch's own weights-only set that t2i's and DeepSpeed's checkpoint files contain.
ALLOWED = (
    "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
UNREADABLE = "cannot be read as a torch checkpoint"


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "0").lower() in ("1", "true", "yes")


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # another numpy / DeepSpeed version: that name cannot occur in its files


def safe_globals() -> list:
    return [g for g in (_resolve(n) for n in ALLOWED) if g is not None]


def allow_globals() -> None:
    """Register ALLOWED with torch's weights-only unpickler for this process (idempotent). Not torch's
    `safe_globals` context manager: its exit removes the globals again, also for everyone else."""
    import torch

    torch.serialization.add_safe_globals(safe_globals())


def protect_process() -> None:
    """Every torch.load in this process becomes weights-only with t2i's allowlist (unless trusted)."""
    allow_globals()
    if not trusted():
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a pickle names that are neither torch's weights-only set nor ALLOWED (not executed)."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 -- not a readable torch zip file: refused like a planted one
        raise CheckpointError(f"{path}: {UNREADABLE} ({type(e).__name__}: {e}); "
                              f"the file is truncated or not a checkpoint") from None
    return [g for g in found if g not in ALLOWED]


def verify_file(path: str | Path) -> None:
    if trusted():
        return
    bad = unsafe_globals(path)
    if bad:
        raise CheckpointError(
            f"{path}: refusing to load: it pickles {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}, which "
            f"neither t2i nor DeepSpeed writes; loading it could run code. If you wrote this checkpoint "
            f"yourself and trust it, set {TRUST_ENV}=1 (docs/reliability.md)")


_verified: set[tuple[str, int, float]] = set()  # (file, size, mtime) already scanned by this process


def verify_tree(folder: str | Path) -> int:
    """Verify every pickle under `folder` (a checkpoint tag, with its universal/ form), whichever file a
    reader will open; returns the number of files scanned. Only the pickles' opcodes are read (not the
    tensor data), so a large checkpoint takes a fraction of a second."""
    if trusted():
        return 0
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime)
        if key not in _verified:
            verify_file(f)
            _verified.add(key)
    return len(files)


def load(path: str | Path, map_location="cpu", mmap: bool = False):
    """torch.load of one of t2i's own files: verified first, then weights-only with the allowlist.
    `mmap=True` maps the tensors' storage from the file instead of reading it (torch.load(mmap=True)):
    only the pages a reader touches become resident, and they go when the tensors are dropped."""
    import torch

    verify_file(path)
    if trusted():
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    allow_globals()
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
