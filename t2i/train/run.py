"""The run folder: created (or continued) at the start, finished with samples and a loss plot."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from t2i.checkpoint import loading, store
from t2i.config import Config, save_config
from t2i.errors import ConfigError

log = logging.getLogger("t2i")


def prepare_run_dir(cfg: Config, rank: int, resume: bool | str) -> tuple[Path, bool]:
    """(<output_dir>/<name> with the resolved config, whether to resume). Never silently reuses a run's
    folder, except with resume="auto", which resumes from `latest` or starts over when there is none
    (a job killed before its first checkpoint)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_root = run_dir / "checkpoints"
    auto = resume == "auto"
    if auto:
        resume = store.latest_tag(ckpt_root) is not None
        log.info("auto-resume: %s", f"continuing from {ckpt_root / store.latest_tag(ckpt_root)}"
                 if resume else "no checkpoint yet, starting")
    if resume and store.latest_tag(ckpt_root) is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_root} (no 'latest' file)")
    if not resume and not auto and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or set run.name")
    dist.barrier()
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()
    return run_dir, bool(resume)


def finish(cfg: Config, run_dir: Path, text, vae, ckpt_root: Path, device) -> None:
    """Rank 0: sample the fixed prompts from the final checkpoint's EMA weights; plot the loss."""
    from t2i.eval.sampling import generate
    from t2i.train.logger import read_metrics
    from t2i.viz import plot_loss, save_grid

    tag = store.latest_tag(ckpt_root)
    model = loading.load(ckpt_root / tag, ema=cfg.sample.use_ema, device=device, text=text, vae=vae).model
    prompts = [p for p in cfg.sample.prompts for _ in range(2)]
    images = generate(model, text, vae, prompts, resolution=cfg.data.resolution, steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance, shift=cfg.sample.shift, seed=cfg.sample.seed)
    grid = save_grid(images, prompts, run_dir / "samples" / f"{tag}.png")
    curve = plot_loss(read_metrics(run_dir), run_dir / "loss.png", title=f"{cfg.run.name}: training loss")
    log.info("samples: %s  loss curve: %s", grid, curve)
