"""Sharded checkpoints: DeepSpeed's state plus ours, a `latest` pointer written last, retention, and
resuming at another world size.

    <run>/checkpoints/<tag>/                 DeepSpeed files (model + optimizer shards, per rank)
    <run>/checkpoints/<tag>/t2i/rankNNNNN.pt per-rank client state: RNG states, data position, this rank's
                                             EMA slice (t2i.checkpoint.ema, format 2: 1/world of the EMA)
    <run>/checkpoints/<tag>/meta.json        step, world size, resolved config; written after every rank
                                             has finished, so its presence marks a complete tag
    <run>/checkpoints/<tag>/universal/       DeepSpeed's universal form of the tag, made on demand (a
                                             resume at another world size, `t2i ckpt universal`)
    <run>/checkpoints/latest                 the tag name (DeepSpeed's own format), replaced atomically
                                             after meta.json; a half-written tag is never `latest`

Integrity. A rank killed at any point of `save` leaves `latest` at the previous complete tag; the
half-written tag has no meta.json, so `incomplete_tags` reports it and a resume ignores it. Saving a
step whose folder already exists (left by a killed save, or a complete tag that never became
`latest`) first discards that folder, so a tag never mixes two saves. Retention (`train.keep_last`)
runs on rank 0 after `latest` moved: the oldest complete tags beyond N go, never the one `latest`
names and never an incomplete one. A tag is discarded by renaming it to `.trash-<tag>` (atomic) and
then deleting it, so a crash mid-delete cannot leave a tag that looks complete but is not.

Another world size. `load` notices that meta.json's world size differs from this run's and then
(automatically, with a log line):

* model + optimizer: DeepSpeed's universal checkpoint. Rank 0 converts the tag once with
  `deepspeed.checkpoint.ds_to_universal` (per-parameter fp32 weights, Adam exp_avg / exp_avg_sq and
  step) into `<tag>/universal/`, and every rank loads it with DeepSpeed's `load_universal`, which
  re-partitions all of it for the new world. Works for ZeRO-1/2/3 on CPU/gloo and GPU/NCCL. The
  engine's config switch is set only for that one load, so engine.py needs no universal option.
* EMA: every rank maps the old ranks' client files (torch.load mmap) and copies only the overlap of
  each old slice with its own new slice (ShardedEMA.load_state_dict of the list); no rank builds the
  full EMA.
* data position: the per-(rank, worker) stream positions of the old world do not map onto the new
  one. Every new stream starts at the beginning of the furthest epoch any old stream had reached
  (samples already seen in that epoch are seen again; no later sample is skipped); the bad-sample
  counts are carried over in total.
* RNG: the generator and the global RNGs are re-seeded from (run.seed, step, rank).

So a resume at another world size continues the same model and optimizer exactly, but its data
order and noise differ from a run that had kept the world size. The ZeRO stage must stay the one
the checkpoint was written with (DeepSpeed's universal loader reads that stage's file layout; a
ZeRO-2 -> ZeRO-3 load fails inside DeepSpeed), so `load` refuses a stage change by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from t2i import trust
from t2i.errors import CheckpointError
from t2i.io import atomic_write, fsync_dir, write_text

UNIVERSAL = "universal"  # <tag>/universal: DeepSpeed's universal checkpoint of the tag
log = logging.getLogger("t2i")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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


def reseed(generator: torch.Generator, seed: int, step: int, rank: int) -> int:
    """Seed `generator` and the global RNGs from (seed, step, rank): a resume at another world size,
    where the saved per-rank RNG states have no counterpart. Returns the derived seed."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}-{step}-{rank}".encode()).digest()[:8], "little") >> 1
    generator.manual_seed(derived)
    torch.manual_seed(derived)
    np.random.seed(derived % 2**32)
    random.seed(derived)
    return derived


# ----------------------------------------------------------------------------------------------
# Saving, retention
# ----------------------------------------------------------------------------------------------


def save(engine, root: Path, step: int, client: dict, meta: dict, keep_last: int = 0,
         after_rank_files=None, exclude_frozen: bool = False) -> tuple[str, list[str]]:
    """Collective: every rank calls it. Returns (the tag, the tags retention deleted).
    `after_rank_files(tag_dir, step, rank)`, if given, runs once this rank's files are written and
    before the tag is marked complete (the test suite's kill-mid-save hook, t2i.train.faults).
    `exclude_frozen` (a LoRA run): DeepSpeed leaves the parameters without requires_grad (the frozen
    base) out of the model file; the base is reloaded from its source on a resume."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if latest_pointer(root) == tag:  # every rank sees the same files, so every rank raises
        raise CheckpointError(f"refusing to overwrite {root / tag}: it is the complete checkpoint `latest` names")
    if rank == 0 and (root / tag).exists():
        _discard(root, tag)  # an earlier attempt at this step (killed mid-save, or never made `latest`)
    dist.barrier()
    frozen = {"exclude_frozen_parameters": True} if exclude_frozen else {}
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False, **frozen)
    own = root / tag / "t2i"
    own.mkdir(parents=True, exist_ok=True)
    atomic_write(own / f"rank{rank:05d}.pt", lambda tmp: torch.save(client, tmp), fsync=True)
    if after_rank_files is not None:
        after_rank_files(root / tag, step, rank)
    dist.barrier()
    deleted = []
    if rank == 0:
        write_text(root / tag / "meta.json", json.dumps(dict(meta, step=step, tag=tag), indent=1), fsync=True)
        write_text(root / "latest", tag, fsync=True)
        deleted = prune(root, keep_last)
    dist.barrier()
    return tag, deleted


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete the oldest complete tags beyond the newest `keep_last` (0 keeps all); never the tag
    `latest` names, never an incomplete tag. Also clears `.trash-*` left by an interrupted delete.
    Single process (rank 0). Returns the deleted tags, oldest first."""
    for leftover in root.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return []
    latest = latest_pointer(root)
    tags = complete_tags(root)
    doomed = [t for t in tags[:-keep_last] if t != latest]
    for tag in doomed:
        _discard(root, tag)
    return doomed


def _discard(root: Path, tag: str) -> None:
    trash = root / f".trash-{tag}-{os.getpid()}"
    os.replace(root / tag, trash)
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------


def is_complete(root: Path, tag: str) -> bool:
    return (root / tag / "meta.json").is_file()


def _tag_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def incomplete_tags(root: Path) -> list[str]:
    """Tag folders without meta.json: a save that never finished (or one in progress)."""
    return sorted(p.name for p in _tag_dirs(root) if not is_complete(root, p.name))


def complete_tags(root: Path) -> list[str]:
    """Complete tags, oldest (lowest step) first."""
    tags = [p.name for p in _tag_dirs(root) if is_complete(root, p.name)]
    return sorted(tags, key=lambda t: (read_meta(root, t).get("step", -1), t))


def latest_pointer(root: Path) -> str | None:
    """The tag name `latest` holds (complete or not), or None."""
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_tag(root: Path) -> str | None:
    """The tag `latest` points to, or None when there is no checkpoint yet."""
    tag = latest_pointer(root)
    if tag is None:
        return None
    if not is_complete(root, tag):
        what = "is missing" if not (root / tag).exists() else f"is not a complete checkpoint (no {root / tag / 'meta.json'})"
        raise CheckpointError(f"{root / 'latest'} names {tag!r}, which {what}; {_usable(root)}")
    return tag


def point_latest(root: Path, tag: str) -> list[str]:
    """Make `latest` name the complete `tag` (a resume from an older tag); returns the newer complete
    tags it abandons (a later save at their step replaces them). Single process (rank 0)."""
    if not is_complete(root, tag):
        raise CheckpointError(f"{root / tag} is not a complete checkpoint; {_usable(root)}")
    step = read_meta(root, tag)["step"]
    newer = [t for t in complete_tags(root) if read_meta(root, t)["step"] > step]
    write_text(root / "latest", tag, fsync=True)
    return newer


def resume_from(root: Path, tag: str) -> list[str]:
    """Collective: make `latest` name `tag` when a resume names an older tag than `latest`; returns, on rank 0,
    the newer complete tags it abandons. Only rank 0 reads and moves `latest`, and every rank meets at one
    barrier whatever it would have read: a rank that looked at `latest` after rank 0 had moved it would skip
    a conditional barrier and hang the job in its next collective."""
    newer = point_latest(root, tag) if dist.get_rank() == 0 and tag != latest_pointer(root) else []
    dist.barrier()
    return newer


def _usable(root: Path) -> str:
    """How to continue from what is there: the complete tags, newest first, and how to pick one."""
    tags = complete_tags(root)
    if not tags:
        return f"{root} holds no complete checkpoint"
    newest = ", ".join(reversed(tags[-3:]))
    return (f"complete tags: {newest}{' ...' if len(tags) > 3 else ''}; resume from the newest with "
            f"--resume {root / tags[-1]}")


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for a run folder, its checkpoints/ folder (-> latest) or a tag folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "meta.json").is_file():
        return p.parent, p.name
    if (p / "t2i").is_dir() or any(p.glob("*_optim_states.pt")):
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json: its save did not finish)")
    tag = latest_tag(p) if p.is_dir() else None
    if tag is None:
        raise CheckpointError(f"{path}: not a checkpoint (no checkpoints/latest, latest or meta.json)")
    return p, tag


def read_meta(root: Path, tag: str) -> dict:
    return json.loads((root / tag / "meta.json").read_text())


# ----------------------------------------------------------------------------------------------
# Loading into a training run
# ----------------------------------------------------------------------------------------------


def load(engine, root: Path, tag: str, strict: bool = True) -> tuple[dict, dict]:
    """(meta, this rank's client state) after loading DeepSpeed's model and optimizer shards.
    `strict` False (a LoRA run's tag, saved without the frozen base): the model file's keys need not
    cover the module (DeepSpeed's load_module_strict); the caller has loaded the base already.

    Collective. At the checkpoint's own world size this is DeepSpeed's native load and the client
    state is this rank's own. At another world size (see the module docstring) the model and optimizer
    come from DeepSpeed's universal checkpoint and the client state is rebuilt for this rank:
    {"resharded_from": old world size, "step", "ema" (the old world's per-rank EMA states in rank order,
    memory-mapped: ShardedEMA.load_state_dict re-slices them), "data" (restarted epoch), "rng": None
    (the caller re-seeds), "skipped_nonfinite"}."""
    meta = read_meta(root, tag)
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = engine.zero_optimization_stage()
    if meta.get("zero_stage", stage) != stage:  # DeepSpeed's universal load needs the same stage's file names
        raise CheckpointError(f"{root / tag} was written under ZeRO-{meta['zero_stage']}; this run uses "
                              f"ZeRO-{stage}. Resume with deepspeed.zero_stage={meta['zero_stage']} (any world "
                              f"size), or start a new run from its weights with train.init_from")
    _verify(root, tag)  # before DeepSpeed unpickles anything in it
    if meta["world_size"] == world:
        try:
            lenient = {} if strict else {"load_module_strict": False}
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, **lenient)
        except Exception as e:  # noqa: BLE001 -- DeepSpeed's errors name no file: say which tag, what else there is
            raise CheckpointError(f"{root / tag} could not be loaded ({type(e).__name__}: {_first_line(e)}); "
                                  f"{_other_tags(root, tag)}") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {root / tag}; {_other_tags(root, tag)}")
        return meta, read_client_state(root, tag, rank, mmap=True)

    log.warning("%s was written by %d rank(s) under ZeRO-%s; this run has %d rank(s) under ZeRO-%d: loading "
                "model and optimizer through DeepSpeed's universal checkpoint (%s); EMA consolidated and "
                "re-sliced; data streams restart their epoch; RNG re-seeded from (seed, step, rank)",
                root / tag, meta["world_size"], meta.get("zero_stage", "?"), world, stage,
                root / tag / UNIVERSAL)
    error = None
    if rank == 0:
        try:
            ensure_universal(root, tag)
        except CheckpointError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])
    _load_universal(engine, root / tag)
    states = read_client_states(root, tag, mmap=True)  # mapped: a rank touches only its overlap of the EMA
    if len(states) != meta["world_size"]:
        raise CheckpointError(f"{root / tag / 't2i'} has {len(states)} rank files; meta.json says "
                              f"{meta['world_size']} ranks")
    client = {"resharded_from": meta["world_size"], "step": meta["step"], "rng": None,
              "ema": [s["ema"] for s in states], "data": reshard_data_state([s["data"] for s in states], rank),
              "skipped_nonfinite": states[0].get("skipped_nonfinite", 0)}
    return meta, client


def _load_universal(engine, folder: Path) -> None:
    """engine.load_checkpoint of <folder>/universal with DeepSpeed's `load_universal` switched on for
    this load only (it is read from the engine's config at load time)."""
    config = engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        raise CheckpointError("this DeepSpeed has no `load_universal_checkpoint` config attribute; "
                              "resume at the checkpoint's world size instead")
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=UNIVERSAL, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = previous
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {folder / UNIVERSAL}")


def ensure_universal(root: Path, tag: str, workers: int | None = None) -> Path:
    """<root>/<tag>/universal, converted with deepspeed.checkpoint.ds_to_universal unless already there.
    Single process. Converted into a temporary folder and renamed, so its presence means complete."""
    out = root / tag / UNIVERSAL
    if out.is_dir():
        return out
    if not is_complete(root, tag):
        raise CheckpointError(f"{root / tag} is not a complete checkpoint (no meta.json)")
    _verify(root, tag)  # the converter unpickles every file of the tag
    tmp = root / tag / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    # --inject_missing_state: our engine does not record UNIVERSAL_CHECKPOINT_INFO (no tensor parallelism).
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers",
           str(workers), "--inject_missing_state"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"}  # files verified above
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    (root / tag / "latest_universal").unlink(missing_ok=True)  # its pointer to the temporary folder
    if proc.returncode != 0 or not (tmp / "zero").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"ds_to_universal failed on {root / tag} ({proc.returncode}):\n"
                              f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


def consolidated_ema_state(states: list[dict]) -> dict:
    """The EMA of every rank's client state (rank order) as one full-tensor EMA state (format 1,
    `zero3` False), which ShardedEMA.load_state_dict takes under any ZeRO stage and world size."""
    from t2i.checkpoint.ema import consolidate

    first = states[0]["ema"]
    return {"decay": first["decay"], "updates": first["updates"], "zero3": False, "shapes": first["shapes"],
            "shadow": consolidate(s["ema"] for s in states)}


def reshard_data_state(states: list[dict], rank: int) -> dict:
    """TrainLoader state for `rank` of a new world from the old world's per-rank states: every logical
    worker restarts the furthest epoch any old stream had reached, from its first sample; rank 0's
    worker 0 carries the summed bad-sample counts (so the run's totals continue), the others start at 0."""
    n_workers = states[0]["num_workers"]
    streams = [w for s in states for w in s["workers"].values()]
    epoch = max((w["epoch"] for w in streams), default=0)
    keys = sorted({k for w in streams for k in w.get("counts", {})})
    total = {k: sum(w.get("counts", {}).get(k, 0) for w in streams) for k in keys}
    zeros = {k: 0 for k in keys}
    workers = {w: {"epoch": epoch, "index": 0, "counts": dict(total if (rank, w) == (0, 0) else zeros)}
               for w in range(n_workers)}
    extra = {"buckets": states[0]["buckets"]} if "buckets" in states[0] else {}  # (bucket buffers: dropped)
    return {"num_workers": n_workers, "next_worker": 0, "workers": workers, **extra}


# ----------------------------------------------------------------------------------------------
# Reading checkpoints in one process (tools, inference)
# ----------------------------------------------------------------------------------------------


def read_client_state(root: Path, tag: str, rank: int, mmap: bool = False) -> dict:
    """One rank's client state: verified, then loaded weights-only (t2i.trust); `mmap` maps its
    tensors (the EMA slice) from the file instead of reading them."""
    path = root / tag / "t2i" / f"rank{rank:05d}.pt"
    try:
        return trust.load(path, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- a truncated or corrupt file
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {_first_line(e)}); "
                              f"{_other_tags(root, tag)}") from e


def client_ranks(root: Path, tag: str) -> list[int]:
    return sorted(int(f.stem.removeprefix("rank")) for f in (root / tag / "t2i").glob("rank*.pt"))


def read_client_states(root: Path, tag: str, mmap: bool = False) -> list[dict]:
    """Every rank's client state, in rank order (single process, or a resume at another world size).
    With `mmap` the tensors stay in the files until touched."""
    _verify(root, tag)
    return [read_client_state(root, tag, r, mmap=mmap) for r in client_ranks(root, tag)]


def iter_ema_states(root: Path, tag: str):
    """The EMA state of each rank's client file in rank order, each file memory-mapped and read once,
    one at a time (the caller copies what it needs and drops it before the next is opened)."""
    _verify(root, tag)
    ranks = client_ranks(root, tag)
    meta = read_meta(root, tag)
    if ranks != list(range(meta.get("world_size", len(ranks)))):
        raise CheckpointError(f"{root / tag / 't2i'} has rank files {ranks[:8]}; meta.json says "
                              f"{meta.get('world_size')} ranks; {_other_tags(root, tag)}")
    for r in ranks:
        yield read_client_state(root, tag, r, mmap=True)["ema"]


def _verify(root: Path, tag: str) -> None:
    """Every pickle of the tag scanned before anything unpickles it (t2i.trust); an unreadable file's
    error also says which complete tags remain."""
    try:
        trust.verify_tree(root / tag)
    except CheckpointError as e:
        if trust.UNREADABLE not in str(e):
            raise
        raise CheckpointError(f"{e}; {_other_tags(root, tag)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _other_tags(root: Path, tag: str) -> str:
    others = [t for t in complete_tags(root) if t != tag]
    if not others:
        return "no other complete checkpoint is there"
    return (f"other complete tags: {', '.join(reversed(others[-3:]))}; resume from one with "
            f"--resume {root / others[-1]}")


def load_weights(root: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a checkpoint, single process: the EMA (each rank's slice read once,
    memory-mapped, into preallocated full tensors: peak memory is one full copy plus one rank's file)
    or the raw weights (DeepSpeed's zero_to_fp32 over the optimizer's fp32 partitions)."""
    from t2i.checkpoint.ema import consolidate

    _verify(root, tag)  # every file of the tag, whichever this reader opens
    if ema:
        try:
            return consolidate(iter_ema_states(root, tag))
        except ValueError as e:
            raise CheckpointError(f"{root / tag}: {e}; {_other_tags(root, tag)}") from e
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
    except Exception as e:  # noqa: BLE001 -- a truncated or corrupt DeepSpeed file
        raise CheckpointError(f"{root / tag} could not be read ({type(e).__name__}: {_first_line(e)}); "
                              f"{_other_tags(root, tag)}") from e
