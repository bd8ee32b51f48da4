"""Train an MMDiT with flow matching or MixFlow under DeepSpeed ZeRO.

    t2i train                                   # the tiny CPU config, one rank
    t2i train --nproc 2 train.steps=100         # two ranks on this machine (re-launches under torchrun)
    t2i train --config my.yaml --resume         # continue from <run>/checkpoints/latest
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \\
        -m t2i.cli train --config my.yaml       # a cluster

Reads top to bottom: distributed setup -> run folder -> frozen encoders + VAE -> model under
DeepSpeed -> EMA -> resume -> data -> loop (loss, step, EMA, log, evaluate, checkpoint) -> samples + plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from t2i import cache as cache_lib, checkpoint, engine as engine_lib, flow, inference
from t2i.config import Config, ConfigError, save_config, to_dict
from t2i.data.loader import BAD_REASONS, TrainLoader
from t2i.diagnostics import FixedSigmaValidation, SigmaStats
from t2i.ema import ShardedEMA
from t2i.live_eval import LiveEval
from t2i.logger import RunLogger, log, read_metrics, setup_logging
from t2i.model import count_parameters, is_diffusers_folder, load_pretrained, load_weights, velocity
from t2i.preemption import Preempted, PreemptionGuard
from t2i.timing import Phases, comm_seconds, peak_memory_gb


class NonFiniteError(RuntimeError):
    pass


def main(cfg: Config, resume: bool | str = False, stop_at: int | None = None, save_last: bool = True) -> Path:
    """Train to cfg.train.steps (or stop and checkpoint at `stop_at`; `t2i bench` passes save_last=False).
    `resume="auto"` continues from the run's latest checkpoint when there is one (what a requeued SLURM
    job does). SIGUSR1 / SIGTERM checkpoint at the next step boundary and raise `Preempted` (t2i.preemption)."""
    guard = PreemptionGuard()  # first: a signal during start-up must not kill the process half-way
    rank, world = engine_lib.init_distributed()
    device = engine_lib.device()
    run_dir, resume = prepare_run_dir(cfg, rank, resume)
    setup_logging(run_dir, rank)
    log.info("run %s: stage %s, %d rank(s), device %s, ZeRO-%d, %s", run_dir, cfg.stage, world, device.type,
             cfg.deepspeed.zero_stage, cfg.deepspeed.precision)

    # Frozen conditioning and autoencoder: built identically on every rank, never optimised.
    text, vae = inference.build_frozen(cfg, device)
    model = inference.build_for(cfg, text, vae)
    log.info("MMDiT %s: %.2fM parameters; text context %d x %d, pooled %d; latents %d x %d^2",
             cfg.model.preset, count_parameters(model) / 1e6, text.seq_len, text.context_dim, text.pooled_dim,
             vae.latent_channels, vae.latent_size(cfg.data.resolution))
    if cfg.train.init_from and not resume:  # post-training: weights from the parent, all else fresh
        parent = init_from_parent(model, cfg)
        if rank == 0:
            (run_dir / "parent.json").write_text(json.dumps(parent, indent=1))
        log.info("initialised %s weights from %s", parent.get("weights", "diffusers"), parent["path"])
    engine, optimizer = engine_lib.initialize(model, cfg)
    ema = ShardedEMA(engine.module, cfg.train.ema_decay)
    generator = torch.Generator().manual_seed(1_000_003 * cfg.run.seed + rank)  # noise, sigma, dropout

    ckpt_root = run_dir / "checkpoints"
    step, data_state, skipped = 0, None, 0
    if resume:
        step, data_state, skipped = restore(engine, ema, generator, ckpt_root)

    cache_identity = cache_lib.identity(text, vae, cfg) if cfg.data.cache else None
    loader = TrainLoader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world,
                         batch_size=cfg.train.micro_batch_size, state=data_state, cache_identity=cache_identity)
    if cfg.data.cache:
        log.info("data.cache: reading text encodings and VAE posteriors from %s (%d shard files checked)",
                 cfg.data.cache, len(loader.urls))
    logger = RunLogger(run_dir, cfg, rank, start_step=step)
    live_eval = LiveEval(cfg, text, vae, device, run_dir)
    sigma_stats = SigmaStats(cfg.logging.sigma_bins)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    validation = FixedSigmaValidation(cfg.validation, cfg.data, text, vae, device) if cfg.validation.shards else None
    if validation and step == 0 and cfg.train.init_from:  # the parent's validation loss, for reference
        logger.validation(0, validation(engine, dtype))
    keys_file = open(run_dir / f"sample_keys.rank{rank}.jsonl", "a") if cfg.logging.sample_keys else None
    consecutive = 0
    images_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    phases = Phases(cfg.logging.phase_times, device, comm=comm_seconds)  # off by default: it syncs the GPU

    end = min(cfg.train.steps, stop_at or cfg.train.steps)
    t_loop = time.perf_counter()
    signum = guard.agreed(device)
    if signum and step < end:  # signalled during start-up: nothing new since the last checkpoint
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
            loss, stats = compute_loss(engine, text, vae, batch, generator, cfg, device, dtype, phases=phases)
            with phases("backward"):
                engine.backward(loss)
            with phases("step"):
                engine.step()
            losses.append(loss.detach().float())
            sigma_stats.add(stats["sigma"], stats["sigma_in"], stats["per_sample"])
            keys += batch["keys"]
        step += 1

        if engine.was_step_applied():
            with phases("ema"):
                ema.update(engine.module)
            consecutive = 0
        else:  # DeepSpeed found a non-finite gradient norm and skipped the update
            skipped += 1
            consecutive += 1
        metrics = {"loss": _mean_over_ranks(torch.stack(losses).mean()), "lr": lr,
                   "images_per_s": images_per_step / (time.perf_counter() - t0),
                   "grad_norm": _grad_norm(engine), "skipped_nonfinite": skipped, "bad": _bad_counts(loader),
                   "elapsed_s": time.perf_counter() - t_loop, **phases.collect()}
        if phases.enabled:
            metrics["peak_mem_gb"] = peak_memory_gb(device)
        if step % cfg.train.log_every == 0 or step == end:
            metrics.update(sigma_stats.summary(device))
        if validation and (step % cfg.validation.every == 0 or step == end):
            metrics.update(validation(engine, dtype))
        logger.step(step, metrics)
        if live_eval.due(step):
            live_eval(step, ema, logger)
        if keys_file:
            keys_file.write(json.dumps({"step": step, "keys": keys}) + "\n")
            keys_file.flush()
        if consecutive >= cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopping without saving. The last good checkpoint is {checkpoint.latest_tag(ckpt_root)!r} "
                f"in {ckpt_root}. Lower train.lr, check the data, or raise train.max_consecutive_nonfinite.")
        saved = ((step == end and save_last)
                 or (step % cfg.train.ckpt_every == 0 and consecutive == 0))  # not mid non-finite streak
        if saved:
            save(engine, ema, generator, loader, ckpt_root, step, skipped, cfg, world)
        signum = guard.agreed(device)  # every rank, every step: one tiny all-reduce
        if signum and step < cfg.train.steps:
            if not saved:
                save(engine, ema, generator, loader, ckpt_root, step, skipped, cfg, world)
            logger.close()
            raise Preempted(step, signum, saved=True)

    logger.close()
    guard.restore()
    if keys_file:
        keys_file.close()
    if rank == 0 and step == cfg.train.steps:
        finish(cfg, run_dir, text, vae, ckpt_root, device)
    dist.barrier()
    return run_dir


# ----------------------------------------------------------------------------------------------
# The loss: encode, draw sigma and noise, one forward pass
# ----------------------------------------------------------------------------------------------


def compute_loss(engine, text, vae, batch, generator, cfg: Config, device, dtype,
                 phases: Phases | None = None) -> tuple[torch.Tensor, dict]:
    """Mean flow-matching or MixFlow loss of one micro-batch (t2i.flow has the formulas), and the
    per-sample values behind it (σ, σ_in, loss, x, noise) for diagnostics and tests."""
    phases = phases or Phases(False, device)
    with phases("encode"):
        x, cond = encode_batch(text, vae, batch, generator, device, dtype)
    with phases("forward"):
        return loss_on_latents(engine, x, cond, generator, cfg, device, dtype)


def encode_batch(text, vae, batch, generator, device, dtype) -> tuple[torch.Tensor, dict]:
    """Frozen encoders: images -> latents x (fp32), captions -> {context, pooled} with caption dropout.
    A batch from data.cache (batch["cache"], t2i.cache) gives the same values with the same generator
    draws: the latent sample first, then the caption-dropout uniforms."""
    cached = batch.get("cache")
    if cached is not None:
        x = cache_lib.latents(vae, cached, generator, device).to(device, torch.float32)
        context, pooled = text.apply_caption_dropout(*cache_lib.conditioning(text, cached), generator)
        return x, {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}
    x = vae.encode(batch["images"].to(device), generator).to(device, torch.float32)
    context, pooled = text.encode(batch["captions"], generator=generator, dropout=True)
    return x, {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}


def loss_on_latents(engine, x, cond, generator, cfg: Config, device, dtype) -> tuple[torch.Tensor, dict]:
    """Draw σ (and σ_in for MixFlow) and noise, one forward pass, per-sample loss -> (mean, stats)."""
    n, t = x.shape[0], cfg.train.timesteps
    noise = torch.randn(x.shape, generator=generator).to(device)
    model_fn = lambda x_in, timestep: velocity(engine, x_in.to(dtype), timestep.to(dtype), cond).float()  # noqa: E731
    if cfg.train.objective == "mixflow":  # slowed input at σ_in ≥ σ, conditioned on σ
        sigma, sigma_in = flow.sample_mixflow(n, cfg.train.mixflow_gamma, generator=generator, shift=t.shift)
        loss = flow.mixflow_loss(model_fn, x, noise, sigma.to(device), sigma_in.to(device))
    else:
        sigma = flow.sample_sigmas(cfg.timestep_sampler, n, generator=generator, **timestep_params(cfg))
        sigma_in = sigma
        loss = flow.flow_matching_loss(model_fn, x, noise, sigma.to(device))
    stats = {"sigma": sigma, "sigma_in": sigma_in, "per_sample": loss.detach(), "x": x, "noise": noise}
    return loss.mean(), stats


def timestep_params(cfg: Config) -> dict:
    t, kind = cfg.train.timesteps, cfg.timestep_sampler
    extra = {"logit_normal": {"mean": t.mean, "std": t.std}, "mode": {"scale": t.scale}}.get(kind, {})
    return {"shift": t.shift, **extra}


def init_from_parent(model, cfg: Config) -> dict:
    """Load the parent's weights into `model`; returns what to record in <run>/parent.json."""
    path = cfg.train.init_from
    if is_diffusers_folder(path):
        load_weights(model, load_pretrained(path).state_dict())
        return {"kind": "diffusers", "path": str(Path(path).resolve())}
    root, tag = checkpoint.resolve(path)
    ema = cfg.train.init_weights == "ema"
    load_weights(model, checkpoint.load_weights(root, tag, ema=ema))
    meta = checkpoint.read_meta(root, tag)
    return {"kind": "checkpoint", "path": str((root / tag).resolve()), "run": str(root.parent.resolve()),
            "tag": tag, "step": meta["step"], "weights": cfg.train.init_weights,
            "stage": meta["config"]["train"].get("stage", "?")}


# ----------------------------------------------------------------------------------------------
# Run folder, checkpoints, the end of the run
# ----------------------------------------------------------------------------------------------


def prepare_run_dir(cfg: Config, rank: int, resume: bool | str) -> tuple[Path, bool]:
    """(<output_dir>/<name> with the resolved config, whether to resume). Never silently reuses a run's
    folder, except with resume="auto", which resumes from `latest` or starts over when there is none
    (a job killed before its first checkpoint)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_root = run_dir / "checkpoints"
    auto = resume == "auto"
    if auto:
        resume = checkpoint.latest_tag(ckpt_root) is not None
        log.info("auto-resume: %s", f"continuing from {ckpt_root / checkpoint.latest_tag(ckpt_root)}"
                 if resume else "no checkpoint yet, starting")
    if resume and checkpoint.latest_tag(ckpt_root) is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_root} (no 'latest' file)")
    if not resume and not auto and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or set run.name")
    dist.barrier()
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()
    return run_dir, bool(resume)


def save(engine, ema, generator, loader, ckpt_root: Path, step: int, skipped: int, cfg: Config,
         world: int) -> None:
    client = {"step": step, "rng": checkpoint.rng_state(generator), "data": loader.state_dict(),
              "ema": ema.state_dict(), "skipped_nonfinite": skipped}
    meta = {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "config": to_dict(cfg),
            "transformer": {k: v for k, v in dict(engine.module.config).items() if not k.startswith("_")},
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tag, deleted = checkpoint.save(engine, ckpt_root, step, client, meta, keep_last=cfg.train.keep_last)
    log.info("saved checkpoint %s", ckpt_root / tag)
    if deleted:
        log.info("train.keep_last=%d: deleted %s", cfg.train.keep_last, ", ".join(deleted))


def restore(engine, ema, generator, ckpt_root: Path) -> tuple[int, dict, int]:
    """Load `latest` (at any world size, t2i.checkpoint.load) -> (step, data state, skipped count)."""
    broken = checkpoint.incomplete_tags(ckpt_root)
    tag = checkpoint.latest_tag(ckpt_root)
    if broken:
        log.warning("incomplete checkpoint folder(s) in %s (a save that did not finish; no meta.json): %s; "
                    "ignoring them and resuming from latest = %s", ckpt_root, ", ".join(broken), tag)
    meta, client = checkpoint.load(engine, ckpt_root, tag)
    ema.load_state_dict(client["ema"])
    if client.get("resharded_from"):  # per-rank RNG states of another world size: derive fresh ones
        checkpoint.reseed(generator, meta["config"]["run"]["seed"], meta["step"], dist.get_rank())
    else:
        checkpoint.set_rng_state(client["rng"], generator)
    log.info("resumed from %s at step %d%s", ckpt_root / tag, meta["step"],
             f" (written by {client['resharded_from']} rank(s); resharded)" if client.get("resharded_from") else "")
    return meta["step"], client["data"], client["skipped_nonfinite"]


def finish(cfg: Config, run_dir: Path, text, vae, ckpt_root: Path, device) -> None:
    """Rank 0: sample the fixed prompts from the final checkpoint's EMA weights; plot the loss."""
    from t2i.sampling import generate
    from t2i.viz import plot_loss, save_grid

    tag = checkpoint.latest_tag(ckpt_root)
    model = inference.load(ckpt_root / tag, ema=cfg.sample.use_ema, device=device, text=text, vae=vae).model
    prompts = [p for p in cfg.sample.prompts for _ in range(2)]
    images = generate(model, text, vae, prompts, resolution=cfg.data.resolution, steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance, shift=cfg.sample.shift, seed=cfg.sample.seed)
    grid = save_grid(images, prompts, run_dir / "samples" / f"{tag}.png")
    curve = plot_loss(read_metrics(run_dir), run_dir / "loss.png", title=f"{cfg.run.name}: training loss")
    log.info("samples: %s  loss curve: %s", grid, curve)


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the accelerator when the backend is NCCL)."""
    value = value.detach().to(engine_lib.device()).clone()
    dist.all_reduce(value)
    return value.cpu()


def _mean_over_ranks(value: torch.Tensor) -> float:
    return _all_reduce(value.float()).item() / dist.get_world_size()


def _bad_counts(loader: TrainLoader) -> dict:
    counts = loader.counts()
    total = _all_reduce(torch.tensor([counts[r] for r in BAD_REASONS], dtype=torch.long))
    return {r: int(n) for r, n in zip(BAD_REASONS, total) if n}


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
