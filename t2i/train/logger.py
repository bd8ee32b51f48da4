"""Run logging on rank 0: a progress bar, periodic log lines, metrics.jsonl and wandb (offline by default)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from t2i.config import log_interval

log = logging.getLogger("t2i")


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    """Console + <run>/train.log on rank 0; warnings only on the other ranks."""
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


class RunLogger:
    """Per-step metrics to metrics.jsonl (every step) and wandb; a console line every log_interval steps."""

    def __init__(self, run_dir: Path, cfg, rank: int, start_step: int):
        self.rank, self.cfg = rank, cfg
        self.log_every = log_interval(cfg.train)
        self.wandb = None
        if rank != 0:
            return
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=f"train {cfg.run.name}", unit="step",
                        dynamic_ncols=True, file=sys.stderr, disable=None)
        if cfg.logging.wandb != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            from t2i.config import to_dict
            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.run.name, dir=str(run_dir),
                                    mode=cfg.logging.wandb, config=to_dict(cfg), resume="allow",
                                    id=_wandb_id(run_dir))
        self._last = (time.time(), start_step)

    def step(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if self.wandb is not None:
            self.wandb.log(_flatten(metrics, "train/"), step=step)
        if "loss_by_sigma" in metrics or "val_loss" in metrics or step == self.cfg.train.steps:
            bad = metrics.get("bad", {})
            extra = ""
            if "sigma_gap" in metrics:
                g = metrics["sigma_gap"]
                extra += f"  sigma_in-sigma {g['mean']:.3f} [q10 {g['q10']:.3f} q90 {g['q90']:.3f}]"
            if "loss_by_sigma" in metrics:
                extra += "  loss/sigma-bin " + " ".join("-" if v is None else f"{v:.3f}"
                                                        for v in metrics["loss_by_sigma"])
            if "val_loss" in metrics:
                extra += f"  val {metrics['val_loss']:.4f}"
            if "images_per_bucket" in metrics:  # data.buckets (t2i.data.loader.bucket_counts)
                extra += ("  buckets " + " ".join(f"{k}={v}" for k, v in metrics["images_per_bucket"].items())
                          + f"  waiting {metrics['waiting']}  dropped for aspect {metrics['dropped_aspect']}")
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s  grad_norm %.3f  skipped %d  bad %s%s",
                     step, self.cfg.train.steps, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                     metrics.get("grad_norm", float("nan")), metrics.get("skipped_nonfinite", 0),
                     " ".join(f"{k}={v}" for k, v in bad.items()) or "0", extra)

    def validation(self, step: int, metrics: dict) -> None:
        """A validation-only record (e.g. the parent's loss before post-training starts)."""
        if self.rank != 0:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(_flatten(metrics, "train/"), step=step)
        log.info("step %d  val %.4f  by sigma %s", step, metrics["val_loss"],
                 " ".join(f"{v:.3f}" for v in metrics["val_loss_by_sigma"]))

    def evaluation(self, step: int, metrics: dict, grid: Path) -> None:
        """In-training evaluation (t2i.train.live_eval): a sample grid and optional GenEval numbers."""
        if self.rank != 0:
            return
        if metrics:
            self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics.flush()
            if self.wandb is not None:
                self.wandb.log(_flatten(metrics, "eval/"), step=step)
        g = metrics.get("geneval")
        log.info("step %d  samples %s%s", step, grid, "" if not g else f"  geneval {g['overall']:.3f} (" + ", ".join(
            f"{k} {v:.2f}" for k, v in g.items() if k != "overall") + ")")

    def image(self, key: str, path: Path, step: int) -> None:
        if self.rank == 0 and self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(metrics: dict, prefix: str) -> dict:
    """Nested dicts and lists as flat wandb keys: loss_by_sigma -> loss_by_sigma/0 ... ."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, list):
            out.update({f"{prefix}{k}/{i}": x for i, x in enumerate(v) if isinstance(x, (int, float))})
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run."""
    path = run_dir / ".wandb_id"
    if not path.exists():
        import uuid
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training records, the last one per step (a resumed run may rewrite steps)."""
    by_step = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "loss" in rec:
                    by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def read_records(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl record in file order (training, validation and evaluation)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
