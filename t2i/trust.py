"""No checkpoint file t2i reads can run code.

A `.pt` file is a pickle: an unrestricted `torch.load` (what DeepSpeed's
loaders do) runs whatever objects it names, so a planted object in a downloaded run would run
`os.system` the moment it is read. t2i therefore

1. scans every pickle before anything opens it (`torch.serialization.get_unsafe_globals_in_checkpoint`
   reads the pickle's opcodes, it does not execute them) and refuses a file that names any global
   outside `ALLOWED`: exactly what t2i and DeepSpeed write (numpy arrays for RNG states, DeepSpeed's
   ZeRO stage enum, loss scaler and fragment addresses). The message names the file and the global;
2. loads its own files with `weights_only=True` and those globals allowlisted; and
3. sets `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` for the process (`protect_process`), which turns every
   `torch.load` in it, DeepSpeed's included, into a weights-only load with the same allowlist.

A checkpoint the user trusts (one they wrote with another tool that pickles more classes) is loaded
by naming those classes: `T2I_TRUST_GLOBALS=mypkg.MyScaler,other.Thing` adds exactly them to the
allowlist. Loads stay weights-only: nothing, trusted or not, is ever unpickled with arbitrary code
(a named class is rebuilt from its state, not called). Never name a function such as `posix.system`. docs/reliability.md has the security model.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from t2i.errors import CheckpointError

TRUST_ENV = "T2I_TRUST_GLOBALS"
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


def trusted_globals() -> tuple[str, ...]:
    """The globals the user vouched for by name (T2I_TRUST_GLOBALS, comma-separated)."""
    return tuple(n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip())


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # another numpy / DeepSpeed version: that name cannot occur in its files


def safe_globals() -> list:
    return [g for g in (_resolve(n) for n in ALLOWED + trusted_globals()) if g is not None]


def allow_globals() -> None:
    """Register ALLOWED with torch's weights-only unpickler for this process (idempotent). Not torch's
    `safe_globals` context manager: its exit removes the globals again, also for everyone else."""
    import torch

    torch.serialization.add_safe_globals(safe_globals())


def protect_process() -> None:
    """Every torch.load in this process becomes weights-only with t2i's allowlist."""
    allow_globals()
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a pickle names that are neither torch's weights-only set nor ALLOWED (not executed)."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 -- not a readable torch zip file: refused like a planted one
        raise CheckpointError(f"{path}: {UNREADABLE} ({type(e).__name__}: {e}); "
                              f"the file is truncated or not a checkpoint") from None
    return [g for g in found if g not in ALLOWED + trusted_globals()]


def verify_file(path: str | Path) -> None:
    bad = unsafe_globals(path)
    if bad:
        raise CheckpointError(
            f"{path}: refusing to load: it pickles {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}, which "
            f"neither t2i nor DeepSpeed writes; loading it could run code. If you wrote this checkpoint "
            f"yourself and trust those classes, name them in {TRUST_ENV} (docs/reliability.md)")


_verified: set[tuple[str, int, float]] = set()  # (file, size, mtime) already scanned by this process


def verify_tree(folder: str | Path) -> int:
    """Verify every pickle under `folder` (a checkpoint tag, with its universal/ form), whichever file a
    reader will open; returns the number of files scanned. Only the pickles' opcodes are read (not the
    tensor data), so a large checkpoint takes a fraction of a second."""
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
    allow_globals()
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
