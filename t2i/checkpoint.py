"""Sharded checkpoints: DeepSpeed's state plus ours, and a `latest` pointer written last.

    <run>/checkpoints/<tag>/                 DeepSpeed files (model + optimizer shards, per rank)
    <run>/checkpoints/<tag>/t2i/rankNNNNN.pt per-rank client state: RNG states, data position, EMA shard
    <run>/checkpoints/<tag>/meta.json        step, world size, resolved config; written after every rank
                                             has finished, so its presence marks a complete tag
    <run>/checkpoints/latest                 the tag name (DeepSpeed's own format), replaced atomically
                                             after meta.json; a half-written tag is never `latest`
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, client: dict, meta: dict) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    own = root / tag / "t2i"
    own.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(client, own / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_text(root / tag / "meta.json", json.dumps(dict(meta, step=step, tag=tag), indent=1))
        atomic_write_text(root / "latest", tag)
    dist.barrier()
    return tag


def is_complete(root: Path, tag: str) -> bool:
    return (root / tag / "meta.json").is_file()


def incomplete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not is_complete(root, p.name))


def latest_tag(root: Path) -> Optional[str]:
    """The tag `latest` points to, or None when there is no checkpoint yet."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not is_complete(root, tag):
        raise CheckpointError(f"{pointer} points to {tag!r}, which is not a complete checkpoint "
                              f"(no {root / tag / 'meta.json'})")
    return tag


def load(engine, root: Path, tag: str) -> tuple[dict, dict]:
    """(meta, this rank's client state) after loading DeepSpeed's model and optimizer shards."""
    meta = json.loads((root / tag / "meta.json").read_text())
    world = dist.get_world_size()
    if meta["world_size"] != world:
        raise CheckpointError(f"{root / tag} was written by {meta['world_size']} ranks; this run has {world}")
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    client = torch.load(root / tag / "t2i" / f"rank{dist.get_rank():05d}.pt", weights_only=False)
    return meta, client


def read_client_states(root: Path, tag: str) -> list[dict]:
    """Every rank's client state, in rank order (for consolidation tools, single process)."""
    files = sorted((root / tag / "t2i").glob("rank*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


def load_weights(root: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a checkpoint, single process: the EMA (from the per-rank shards)
    or the raw weights (DeepSpeed's zero_to_fp32 over the optimizer's fp32 partitions)."""
    from t2i.ema import consolidate

    if ema:
        return consolidate([c["ema"] for c in read_client_states(root, tag)])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for a run folder, its checkpoints/ folder (-> latest) or a tag folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "meta.json").is_file():
        return p.parent, p.name
    tag = latest_tag(p) if p.is_dir() else None
    if tag is None:
        raise CheckpointError(f"{path}: not a checkpoint (no checkpoints/latest, latest or meta.json)")
    return p, tag


def read_meta(root: Path, tag: str) -> dict:
    return json.loads((root / tag / "meta.json").read_text())
