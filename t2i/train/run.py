"""The run folder: created (or continued) at the start, finished with samples and a loss plot."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch.distributed as dist

from t2i.checkpoint import store
from t2i.config import Config, RunConfig, save_config
from t2i.errors import ConfigError

log = logging.getLogger("t2i")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def resume_command(cfg: Config, world: int) -> str:
    """The shortest command line that continues this run: the run folder holds its config, so its
    name (and output folder, when not the default) is all a resume needs."""
    args = ["t2i", "train", *(["--nproc", str(world)] if world > 1 else []), f"run.name={cfg.run.name}"]
    if cfg.run.output_dir != RunConfig().output_dir:
        args.append(f"run.output_dir={cfg.run.output_dir}")
    return shlex.join([*args, "--resume"])


def holds_a_run(run_dir: Path) -> bool:
    """A run trained at least one step here (metrics recorded) or left a checkpoint."""
    metrics = run_dir / "metrics.jsonl"
    return (metrics.is_file() and metrics.stat().st_size > 0) or store.latest_tag(run_dir / "checkpoints") is not None


def prepare_run_dir(cfg: Config, rank: int, resume: bool | str) -> tuple[Path, str | None]:
    """(<output_dir>/<name>, the checkpoint tag to resume from or None). Never silently reuses a run's
    folder, except with resume="auto", which resumes from `latest` or starts over when there is none
    (a job killed before its first checkpoint). `resume` may also name a tag of this run (or its
    folder): a resume from an older checkpoint than `latest`. Writes nothing (see `accept`)."""
    run_dir = run_dir_of(cfg)
    return run_dir, resume_tag(run_dir, resume)


def resume_tag(run_dir: Path, resume: bool | str) -> str | None:
    """The tag `resume` names in `run_dir` (see prepare_run_dir); raises ConfigError as it does."""
    ckpt_root = run_dir / "checkpoints"
    if resume == "auto":
        tag = store.latest_tag(ckpt_root)
        log.info("auto-resume: %s", f"continuing from {ckpt_root / tag}" if tag else "no checkpoint yet, starting")
    elif isinstance(resume, str):
        tag = _named_tag(ckpt_root, resume)
    elif resume:
        tag = store.latest_tag(ckpt_root)
        if tag is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_root} (no 'latest' file)")
    else:
        tag = None
        if holds_a_run(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or set run.name")
    return tag


def _named_tag(ckpt_root: Path, spec: str) -> str:
    """--resume TAG: a tag name of this run, or the path of one of its tag folders."""
    path = Path(spec)
    tag = path.name if path.exists() else spec
    if path.exists() and path.resolve().parent != ckpt_root.resolve():
        raise ConfigError(f"--resume {spec}: not a checkpoint of {ckpt_root.parent}; to start from another "
                          f"run's weights use train.init_from={spec}")
    if not store.is_complete(ckpt_root, tag):
        tags = store.complete_tags(ckpt_root)
        raise ConfigError(f"--resume {spec}: {ckpt_root / tag} is not a complete checkpoint; complete tags: "
                          f"{', '.join(reversed(tags)) or 'none'}")
    return tag


def accept(cfg: Config, run_dir: Path, rank: int) -> None:
    """The start is accepted (everything was built): write the resolved config into the run folder."""
    if rank == 0:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()


def finish(cfg: Config, run_dir: Path, text, vae, ckpt_root: Path, device) -> None:
    """Rank 0: sample the fixed prompts from the final checkpoint's EMA weights; plot the loss."""
    from t2i.checkpoint import loading  # the models: not imported where only the run folder is planned (t2i.train.plan)
    from t2i.eval.sampling import config_sigmas
    from t2i.train.live_eval import grid_samples
    from t2i.train.logger import read_metrics
    from t2i.viz import plot_loss, save_grid

    tag = store.latest_tag(ckpt_root)
    model = loading.load(ckpt_root / tag, ema=cfg.sample.use_ema, device=device, text=text, vae=vae).model
    sigmas = config_sigmas(cfg, dict(model.config), vae.latent_size(cfg.data.resolution))
    images, labels = grid_samples(cfg, model, text, vae, sigmas)
    grid = save_grid(images, labels, run_dir / "samples" / f"{tag}.png")
    curve = plot_loss(read_metrics(run_dir), run_dir / "loss.png", title=f"{cfg.run.name}: training loss")
    log.info("samples: %s  loss curve: %s", grid, curve)
