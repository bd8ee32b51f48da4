"""Sampling at scale: a prompt set -> images in GenEval's folder layout, split over ranks and array tasks.

    t2i sample --ckpt runs/x --prompts prompts.jsonl --out samples/x                # one process
    t2i sample --ckpt runs/x --prompts prompts.jsonl --out samples/x --nproc 8      # torchrun ranks
    t2i sample ... --shard 3/16                                                     # SLURM array task 3

Output (what GenEval's evaluate_images.py reads), plus our manifest:

    <out>/manifest.json                 settings (resolution, width, height, ...); a restart with other
                                        settings is refused
    <out>/00000/metadata.jsonl          the prompt's metadata (one JSON object)
    <out>/00000/samples/0000.png ...    images_per_prompt images

Work is the list of (prompt, image) items in order, cut into batches of `batch_size`; batch b belongs
to worker b mod W (W = shards × ranks). Image k of prompt p starts from noise seeded by
(seed, p, k) alone and every batch holds the same items however many workers there are, so the
output does not depend on how the work was split. A PNG is written to a dot-file (t2i.io) and renamed, so a
kill never leaves a half-written `NNNN.png`; a restart skips batches whose PNGs all exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2i import flow
from t2i.errors import EvalError
from t2i.eval.image_source import size_of, size_record
from t2i.eval.sampling import latent_shape, sample_batch
from t2i.io import atomic_write, write_json, write_text
from t2i.viz import to_pil


@dataclass
class Settings:
    checkpoint: str
    weights: str                    # ema | raw | diffusers
    prompts: str
    prompts_sha256: str
    num_prompts: int
    images_per_prompt: int
    steps: int
    guidance: float
    shift: float
    resolution: int | str           # an int for a square (as always), "WxH" (e.g. "1216x832") otherwise
    width: int                      # pixels (= resolution for a square)
    height: int
    seed: int
    batch_size: int
    dtype: str
    grid: str = "t2i"               # t2i | diffusers (t2i.flow.inference_sigmas)
    sigmas: list = None             # the σ grid sampled on, [steps + 1], 1 -> 0
    scheduler: dict = None          # the diffusers grid's full FlowMatchEulerDiscreteScheduler config
    model: str = None               # the per-model defaults row (t2i.eval.sampling.MODEL_DEFAULTS), if any
    sources: dict = None            # where each setting came from (informational: not compared on restart)
    lora: dict = None               # an adapted model: base, adapter, their sha256, rank, alpha (t2i.checkpoint.parents)
    guidance_interval: list = field(default_factory=lambda: [0.0, 1.0])  # [σ_lo, σ_hi]: CFG only there
    seed_rule: str = "noise of image k of prompt p: torch.Generator seeded SeedSequence([seed, p, k])"


INFORMATIONAL = ("sources",)  # manifest keys a restart may change


# ----------------------------------------------------------------------------------------------
# Pure helpers: the work split, seeds, file names
# ----------------------------------------------------------------------------------------------


def parse_shard(spec: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise EvalError(f"--shard must look like i/n (e.g. 3/16), got {spec!r}") from None
    if not 0 <= i < n:
        raise EvalError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def item_seed(seed: int, prompt: int, image: int) -> int:
    return int(np.random.SeedSequence([seed, prompt, image]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batches(num_prompts: int, images_per_prompt: int, batch_size: int) -> list[list[tuple[int, int]]]:
    items = [(p, k) for p in range(num_prompts) for k in range(images_per_prompt)]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def my_batches(all_batches: list, worker: int, workers: int) -> list:
    return [b for i, b in enumerate(all_batches) if i % workers == worker]


def digits(num_prompts: int) -> int:
    return max(5, len(str(num_prompts - 1)))


def image_path(out: Path, prompt: int, image: int, width: int) -> Path:
    return out / f"{prompt:0{width}d}" / "samples" / f"{image:04d}.png"


def prompts_digest(entries: list[dict]) -> str:
    return hashlib.sha256("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()).hexdigest()


def check_manifest(out: Path, settings: Settings) -> None:
    """Write <out>/manifest.json, or refuse when it already holds different settings."""
    path = out / "manifest.json"
    mine = asdict(settings)
    if path.exists():
        theirs = json.loads(path.read_text())
        theirs.setdefault("guidance_interval", [0.0, 1.0])  # written before the key existed: every step guided
        if "width" not in theirs and theirs.get("resolution") is not None:  # before width/height: a square
            theirs["width"], theirs["height"] = size_of(theirs["resolution"])
        diff = [k for k in mine if k not in INFORMATIONAL and theirs.get(k) != mine[k]]
        if diff:
            detail = "; ".join(f"{k}: folder has {theirs.get(k)!r}, this run {mine[k]!r}" for k in diff)
            raise EvalError(f"{out} holds samples made with other settings ({detail}); "
                              f"use another --out or the same settings")
        return
    write_json(path, mine)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def run(loaded, entries: list[dict], out: str | Path, *, prompts_source: str, images_per_prompt: int = 4,
        steps: int = 30, guidance: float = 3.0, shift: float = 1.0, resolution=None, seed: int = 0,
        batch_size: int = 16, shard: str | None = None, progress: bool = True, plan=None,
        guidance_interval=(0.0, 1.0)) -> dict:
    """Sample this worker's share of the prompt set into `out`; returns {"images", "seconds", "skipped"}.

    With `plan` (t2i.eval.sampling.plan) its steps, guidance, guidance interval, shift, resolution and σ grid
    are used and the arguments of the same names ignored; without it, t2i's grid sampling_sigmas(steps, shift).
    `resolution`: an int side (square) or (width, height) in pixels; default data.resolution."""
    from tqdm import tqdm

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    shard_i, shard_n = parse_shard(shard)
    worker, workers = shard_i * world + rank, shard_n * world
    out = Path(out)
    model, text, vae = loaded.model, loaded.text, loaded.vae
    param = next(model.parameters())
    if plan is not None:
        steps, guidance, shift, resolution = plan.steps, plan.guidance, plan.shift, plan.resolution
        guidance_interval = plan.guidance_interval
        sigmas = plan.sigmas
    resolution = resolution or loaded.cfg.data.resolution
    if plan is None:
        sigmas = flow.inference_sigmas(steps, "t2i", shift)
    settings = Settings(checkpoint=loaded.source.rsplit(" (", 1)[0], weights=loaded.source.rsplit("(", 1)[1][:-1],
                        prompts=prompts_source, prompts_sha256=prompts_digest(entries), num_prompts=len(entries),
                        images_per_prompt=images_per_prompt, steps=steps, guidance=guidance, shift=shift,
                        **size_record(resolution), seed=seed, batch_size=batch_size, dtype=str(param.dtype),
                        grid=plan.grid if plan else "t2i", sigmas=[float(x) for x in sigmas],
                        scheduler=plan.scheduler if plan else None, model=plan.model if plan else None,
                        sources=plan.sources if plan else None, lora=getattr(loaded, "lora", None),
                        guidance_interval=[float(v) for v in flow.check_interval(guidance_interval)])
    check_manifest(out, settings)

    width = digits(len(entries))
    mine = my_batches(batches(len(entries), images_per_prompt, batch_size), worker, workers)
    todo = [b for b in mine if not all(image_path(out, p, k, width).exists() for p, k in b)]
    for p in sorted({p for b in mine for p, _ in b}):
        meta = out / f"{p:0{width}d}" / "metadata.jsonl"
        if not meta.exists():
            write_text(meta, json.dumps(entries[p]) + "\n")

    shape = latent_shape(vae, resolution)
    total = sum(len(b) for b in todo)
    bar = tqdm(total=total, desc=f"sample [{worker}/{workers}]", unit="img", disable=not progress or rank != 0,
               dynamic_ncols=True)
    t0 = time.time()
    for batch in todo:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(item_seed(seed, p, k)))
                             for p, k in batch]).to(param.device, param.dtype)
        latents = sample_batch(model, text, [entries[p]["prompt"] for p, _ in batch], noise, sigmas, guidance,
                               interval=guidance_interval)
        images = vae.decode(latents.float()).float().cpu()
        for (p, k), image in zip(batch, images, strict=True):
            atomic_write(image_path(out, p, k, width), lambda tmp, im=image: to_pil(im).save(tmp, format="PNG"))
        bar.update(len(batch))
    bar.close()
    seconds = time.time() - t0
    return {"images": total, "seconds": seconds, "skipped": sum(len(b) for b in mine) - total,
            "images_per_s": total / seconds if seconds > 0 and total else 0.0}


