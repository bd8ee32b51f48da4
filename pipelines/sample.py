"""Sampling at scale: a prompt set -> images in GenEval's folder layout, split over ranks and array tasks.

    t2i sample --ckpt runs/x --prompts prompts.jsonl --out samples/x                # one process
    t2i sample --ckpt runs/x --prompts prompts.jsonl --out samples/x --nproc 8      # torchrun ranks
    t2i sample ... --shard 3/16                                                     # SLURM array task 3

Output layout, work split and seeding: t2i/eval/sample_folder.py (GenEval's layout plus manifest.json;
the same images however the work is split; a restart skips finished batches).
"""

from __future__ import annotations

import os

import torch

from t2i.checkpoint import loading
from t2i.eval.prompts import load_prompts
from t2i.eval import sample_folder
from t2i.eval.sampling import plan


def explicit_keys(args) -> set | None:
    """The config keys the user set: None when --config was given (all of them), else the overrides'."""
    if getattr(args, "config", None):
        return None
    return {item.split("=", 1)[0].strip() for item in getattr(args, "overrides", None) or []}


def plan_for(loaded, args):
    """The sampling settings (t2i.eval.sampling.plan) from the flags, the config and the checkpoint."""
    return plan(loaded, steps=args.steps, guidance=args.guidance, shift=args.shift, resolution=args.resolution,
                guidance_interval=getattr(args, "guidance_interval", None), explicit=explicit_keys(args),
                config_name=f"--config {args.config}" if getattr(args, "config", None) else "command-line override")


def lora_lines(lora: dict | None) -> list[str]:
    """What the sampled model's adapter is, for the log (the manifest records the same)."""
    if not lora:
        return []
    return [f"LoRA rank {lora['rank']} (alpha {lora['alpha']:g}, {lora['modules']} modules) from {lora['adapter']} "
            f"(sha256 {lora['adapter_sha256'][:12]}...) on the base {lora['base']} (sha256 "
            f"{(lora['base_sha256'] or '?')[:12]}...)"]


def main(args, cfg) -> int:
    """`t2i sample` (see t2i/cli.py for the arguments)."""
    entries = load_prompts(args.prompts, limit=args.limit, max_caption_bytes=cfg.data.max_caption_bytes)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    loaded = loading.load_any(args.ckpt, cfg, ema=not args.raw, device=device, lora=args.lora)
    if args.dtype != "float32":
        loaded.model.to(getattr(torch, args.dtype))
    rank = int(os.environ.get("RANK", 0))
    chosen = plan_for(loaded, args)
    if rank == 0:
        for line in chosen.describe() + lora_lines(loaded.lora):
            print(f"[sample] {line}", flush=True)
    stats = sample_folder.run(loaded, entries, args.out, prompts_source=str(args.prompts),
                              images_per_prompt=args.images_per_prompt, steps=chosen.steps, guidance=chosen.guidance,
                              shift=chosen.shift, resolution=chosen.resolution, seed=args.seed,
                              batch_size=args.batch_size, shard=args.shard, plan=chosen)
    print(f"[sample] rank {rank}: {stats['images']} images in {stats['seconds']:.1f} s "
          f"({stats['images_per_s']:.2f} img/s), {stats['skipped']} already there -> {args.out}", flush=True)
    return 0
