"""Train an MMDiT with flow matching or MixFlow under DeepSpeed ZeRO.

    t2i train                                   # the tiny CPU config, one rank
    t2i train --nproc 2 train.steps=100         # two ranks on this machine (re-launches under torchrun)
    t2i train run.name=r --resume               # continue from <run>/checkpoints/latest with its config.yaml
    sbatch --nodes 2 slurm/train.sbatch --config my.yaml   # a cluster: one srun task per rank (slurm/README.md)

Reads top to bottom: distributed setup -> run folder -> frozen encoders + VAE -> model under
DeepSpeed -> EMA -> resume -> data -> loop (loss, step, EMA, log, evaluate, checkpoint) -> samples + plots.
The pieces live in t2i.train (step, checkpointer, run folder, diagnostics, logging, preemption).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from t2i.checkpoint.ema import ShardedEMA
from t2i.config import Config, log_interval
from t2i.data import cache as cache_lib
from t2i.data.loader import BAD_REASONS, CAPTION_NOTES, TrainLoader, bucket_counts
from t2i.errors import Preempted
from t2i.io import write_json
from t2i.models.build import build_for, build_frozen
from t2i.models import attention
from t2i.models.mmdit import ShapeWatch, checkpointed_blocks, count_parameters
from t2i.train import engine as engine_lib, faults, optim, step_profile
from t2i.checkpoint.parents import init_from_parent, lora_base
from t2i.train.checkpointer import Checkpointer
from t2i.train.diagnostics import FixedSigmaValidation, SigmaStats
from t2i.train.live_eval import LiveEval
from t2i.train.logger import RunLogger, log, setup_logging
from t2i.train.preemption import PreemptionGuard
from t2i.train.lock import run_lock
from t2i.train.run import accept, finish, prepare_run_dir, resume_command, run_dir_of
from t2i.train.step import NonFiniteGuard, compute_loss
from t2i.train.timing import Phases, comm_seconds, peak_memory_gb


def main(cfg: Config, resume: bool | str = False, stop_at: int | None = None, save_last: bool = True,
         notes: Sequence[tuple[int, str]] = (), force: bool = False) -> Path:
    """Train to cfg.train.steps (or stop and checkpoint at `stop_at`; `t2i bench` passes save_last=False).
    `resume="auto"` continues from the run's latest checkpoint when there is one (what a requeued SLURM
    job does). SIGUSR1 / SIGTERM checkpoint at the next step boundary and raise `Preempted`. `notes`:
    (level, line) pairs from t2i.train.plan (resume changes, settings that followed the data, odd
    values), logged by rank 0 into the run's log. `force` (--force-override): a resume of a bucketed run
    at another world size is allowed (its bucket buffers are dropped; t2i.train.checkpointer)."""
    guard = PreemptionGuard()  # first: a signal during start-up must not kill the process half-way
    rank, world = engine_lib.init_distributed()
    with run_lock(run_dir_of(cfg), rank):  # one run per folder; the second start fails at once
        return train(cfg, guard, rank, world, resume, stop_at, save_last, notes, force)


def train(cfg: Config, guard: PreemptionGuard, rank: int, world: int, resume: bool | str, stop_at: int | None,
          save_last: bool, notes: Sequence[tuple[int, str]] = (), force: bool = False) -> Path:
    device = engine_lib.device()
    run_dir, resume_tag = prepare_run_dir(cfg, rank, resume)
    setup_logging(run_dir, rank)
    log.info("run %s: stage %s, %d rank(s), device %s, ZeRO-%d, %s", run_dir, cfg.stage, world, device.type,
             cfg.deepspeed.zero_stage, cfg.deepspeed.precision)
    for level, line in notes if rank == 0 else ():
        log.log(level, line)

    # Frozen conditioning and autoencoder: built identically on every rank, never optimised.
    text, vae = build_frozen(cfg, device)
    model = build_for(cfg, text, vae)
    log.info("MMDiT %s: %.2fM parameters; text context %d x %d, pooled %d; latents %d x %d^2",
             cfg.model.preset, count_parameters(model) / 1e6, text.seq_len, text.context_dim, text.pooled_dim,
             vae.latent_channels, vae.latent_size(cfg.data.resolution))
    use_lora = cfg.lora.rank > 0
    # post-training: weights from the parent, all else fresh. A LoRA run's checkpoints hold no base: it is
    # loaded on a resume too.
    if cfg.train.init_from and (not resume_tag or use_lora):
        parent = init_from_parent(model, cfg)
        if rank == 0 and not resume_tag:
            write_json(run_dir / "parent.json", parent, indent=1)
        log.info("initialised %s weights from %s", parent.get("weights", "diffusers"), parent["path"])
    base = apply_lora(model, cfg) if use_lora else None
    engine, optimizer = engine_lib.initialize(model, cfg)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    log_speed_setup(cfg, model, optimizer, text, vae, dtype, device)
    ema = ShardedEMA(engine.module, cfg.train.ema_decay, trainable_only=True) if use_lora else \
        ShardedEMA(engine.module, cfg.train.ema_decay)
    generator = torch.Generator().manual_seed(1_000_003 * cfg.run.seed + rank)  # noise, sigma, dropout

    checkpointer = Checkpointer(run_dir / "checkpoints", cfg, engine, ema, generator, world, save_last, force,
                                lora=base)
    faults.install(guard, checkpointer)  # test-suite hooks, only when their variables are set
    step, data_state, skipped = checkpointer.restore(resume_tag) if resume_tag else (0, None, 0)
    if resume_tag:  # the checkpoint restored its own param-group settings; the config's apply
        optim.restore_settings(optimizer, cfg, device)
        log.info("optimizer after resume: %s", optim.describe(optimizer))
    nonfinite = NonFiniteGuard(cfg.train.max_consecutive_nonfinite, skipped)

    cache_identity = cache_lib.identity(text, vae, cfg) if cfg.data.cache else None
    loader = TrainLoader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world,
                         batch_size=cfg.train.micro_batch_size, state=data_state, cache_identity=cache_identity)
    if loader.buckets is not None:
        b, mb = loader.buckets, cfg.train.micro_batch_size
        log.info("data.buckets: %d buckets %s (image aspects %.3g to %.3g); each loader slot's buffers hold at most "
                 "%d samples (%.1f MB)", len(b.sizes), " ".join(b.names), b.min_aspect, b.max_aspect,
                 len(b.sizes) * (mb - 1), sum(w * h * 3 for w, h in b.sizes) * (mb - 1) / 1e6)
    if cfg.data.cache:
        log.info("data.cache: reading text encodings and VAE posteriors from %s (%d shard files checked)",
                 cfg.data.cache, len(loader.urls))
    logger = RunLogger(run_dir, cfg, rank, start_step=step)
    live_eval = LiveEval(cfg, text, vae, device, run_dir)
    sigma_stats = SigmaStats(cfg.logging.sigma_bins)
    validation = FixedSigmaValidation(cfg.validation, cfg.data, text, vae, device) if cfg.validation.shards else None
    if validation and step == 0 and cfg.train.init_from:  # the parent's validation loss, for reference
        logger.validation(0, validation(engine, dtype))
    accept(cfg, run_dir, rank)  # everything is built: the start is accepted, config.yaml written
    keys_file = open(run_dir / f"sample_keys.rank{rank}.jsonl", "a") if cfg.logging.sample_keys else None
    images_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    phases = Phases(cfg.logging.phase_times, device, comm=comm_seconds)  # off by default: it syncs the GPU
    step_profile.install(optimizer, phases)  # DeepSpeed's step by part (opt.* phases), with phase_times only

    # model.compile with buckets: one static graph per bucket shape; each first batch is logged (it compiles)
    shapes = ShapeWatch(len(loader.buckets.sizes)) if cfg.model.compile and loader.buckets is not None else None
    end = min(cfg.train.steps, stop_at or cfg.train.steps)
    log_every = log_interval(cfg.train)
    t_loop, cpu_loop = time.perf_counter(), time.process_time()
    if (signum := guard.agreed(device)) and step < end:  # signalled during start-up: nothing new to save
        logger.close()
        raise Preempted(step, signum, saved=False)
    while step < end:
        t0 = time.perf_counter()
        lr = engine_lib.lr_at(step, cfg.train)
        engine_lib.set_lr(optimizer, lr)
        losses, keys = [], []
        for _ in range(cfg.train.grad_accum):
            with phases("data"):
                batch = next(loader)
            if shapes is not None and (note := shapes.see(_latent_hw(batch["bucket"], vae), f"bucket {batch['bucket']}")):
                log.info(note)  # (this rank's; every rank compiles each bucket's graphs once)
            loss, stats = compute_loss(engine, text, vae, batch, generator, cfg, device, dtype, phases=phases)
            with phases("backward"):
                engine.backward(loss)
            with phases("step"):
                engine.step()
            losses.append(loss.detach().float())
            sigma_stats.add(stats["sigma"], stats["sigma_in"], stats["per_sample"])
            keys += batch["keys"]
        step += 1

        if nonfinite.update(engine.was_step_applied()):  # else DeepSpeed skipped a non-finite update
            with phases("ema"):
                ema.update(engine.module)
        t_book = time.perf_counter()  # the loop's own bookkeeping from here on: the `loop` phase
        mean_loss, bad, notes = engine_lib.step_values_over_ranks(losses, loader.counts(), BAD_REASONS, CAPTION_NOTES)
        metrics = {"loss": mean_loss, "lr": lr, "images_per_s": images_per_step / (time.perf_counter() - t0),
                   "grad_norm": engine_lib.grad_norm(engine), "skipped_nonfinite": nonfinite.skipped,
                   "bad": bad, "notes": notes, "elapsed_s": time.perf_counter() - t_loop, **phases.collect()}
        if phases.enabled:  # cpu_s: this process's CPU time (all threads) since the loop began (t2i bench)
            metrics.update(peak_mem_gb=peak_memory_gb(device), cpu_s=time.process_time() - cpu_loop)
        if step % log_every == 0 or step == end:
            metrics.update(sigma_stats.summary(device))
            metrics.update(bucket_counts(loader, engine_lib.sum_over_ranks))  # data.buckets: per bucket, waiting
        if validation and ((cfg.validation.every and step % cfg.validation.every == 0) or step == end):
            metrics.update(validation(engine, dtype))
        logger.step(step, metrics)
        if live_eval.due(step):
            live_eval(step, ema, logger)
        if keys_file:
            keys_file.write(json.dumps({"step": step, "keys": keys}) + "\n")
            keys_file.flush()
        nonfinite.check(step, checkpointer.last_good())  # too many non-finite steps in a row: stop, unsaved
        checkpointer.save(step, loader, nonfinite.skipped, last_step=step == end, healthy=nonfinite.streak == 0)
        if (signum := guard.agreed(device)) and step < cfg.train.steps:  # every step: one tiny all-reduce
            checkpointer.save(step, loader, nonfinite.skipped, force=True)
            logger.close()
            raise Preempted(step, signum, saved=True)
        phases.add("loop", time.perf_counter() - t_book)  # reported with the next step's phases

    logger.close()
    guard.restore()
    if keys_file:
        keys_file.close()
    if rank == 0 and step == cfg.train.steps:
        finish(cfg, run_dir, text, vae, checkpointer.root, device)
    elif step == stop_at and checkpointer.last_saved == step:
        log.info("stopped at step %d of %d (--stop-at); resume with: %s", step, cfg.train.steps,
                 resume_command(cfg, world))
    dist.barrier()
    return run_dir


def apply_lora(model, cfg: Config) -> dict:
    """lora.rank > 0: hash the base (t2i.checkpoint.parents.lora_base), inject the adapters (everything else
    frozen) and log their size. Returns the base record the checkpoints keep."""
    from t2i.models import lora

    base = lora_base(model, cfg)
    total = count_parameters(model)
    lo = cfg.lora
    names = lora.apply(model, lo.rank, lo.alpha, lo.targets, lo.blocks, lo.dropout, lo.init)
    lora.buffers_out_of_state_dict(model)  # they come with the base: the tags hold the adapters only
    size = sum(p.numel() for p in lora.adapter_parameters(model))
    log.info("LoRA rank %d (alpha %g): %d modules, %s adapter parameters (%.2f %% of the %s base, sha256 %s...); "
             "the base is frozen", lo.rank, lo.alpha if lo.alpha is not None else lo.rank, len(names), f"{size:,}",
             100 * size / total, f"{total:,}", base["base_sha256"][:12])
    return base


def _latent_hw(bucket: str, vae) -> tuple[int, int]:
    """(height, width) of a bucket's latents ("WxH" in pixels)."""
    w, h = (int(v) for v in bucket.split("x"))
    return vae.latent_size(h), vae.latent_size(w)


def log_speed_setup(cfg: Config, model, optimizer, text, vae, dtype, device) -> None:
    """One line each: the optimizer, the attention kernel (probed at the model's shapes; a forced
    model.attention_backend that cannot run is refused here) and the checkpointed blocks."""
    log.info("optimizer: %s", optim.describe(optimizer))
    shape = attention.model_shape(model.config, vae.latent_size(cfg.data.resolution), text.seq_len)
    probed = attention.probe(**shape, dtype=dtype, device=device)
    log.info(attention.describe(probed, attention.resolve(cfg.model.attention_backend, probed)))
    blocks = checkpointed_blocks(len(model.transformer_blocks), cfg.model.gradient_checkpointing)
    if blocks:
        log.info("activation checkpointing: blocks %s of %d", ",".join(map(str, blocks)), len(model.transformer_blocks))
