"""Evaluation inside training: every `sample.every` steps, the EMA weights sample fixed prompts with
fixed seeds into a labelled grid (run folder + wandb) and, with `sample.geneval_per_tag` > 0, score a
small shapes-domain GenEval set with the exact detector (t2i.eval.geneval's official rules).

The EMA lives as per-rank shards under ZeRO-3 (t2i.checkpoint.ema); they are gathered to rank 0 (on the CPU) only
here, every `sample.every` steps, never per update.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from t2i.checkpoint import ema as ema_lib
from t2i.buckets import bucket_set, size_name
from t2i.eval import geneval
from t2i.models import build
from t2i.models.mmdit import load_weights
from t2i.eval.sampling import config_sigmas, generate


class LiveEval:
    def __init__(self, cfg, text, vae, device, run_dir: Path):
        self.cfg, self.text, self.vae, self.device, self.run_dir = cfg, text, vae, device, run_dir
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.model = None
        self.prompts = None
        if cfg.sample.geneval_per_tag > 0:
            from t2i.eval.prompts import shapes_geneval
            self.prompts = shapes_geneval(cfg.sample.geneval_per_tag)

    def due(self, step: int) -> bool:
        return self.cfg.sample.every > 0 and step % self.cfg.sample.every == 0

    def weights(self, ema: ema_lib.ShardedEMA) -> dict | None:
        """Full EMA weights on rank 0 (None elsewhere). Every rank must call this."""
        state = ema.state_dict()
        if state["zero3"]:
            state = {**state, "shadow": {n: t.cpu() for n, t in state["shadow"].items()}}
            gathered = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(state, gathered, dst=0)
            return ema_lib.consolidate(gathered) if self.rank == 0 else None
        return ema_lib.consolidate([state]) if self.rank == 0 else None

    def build(self) -> torch.nn.Module:
        """The sampling model: the MMDiT; for a LoRA run its frozen base (train.init_from, as training loaded it)
        with adapters of the run's shape, whose values each call loads from the EMA."""
        model = build.build_for(self.cfg, self.text, self.vae)
        if self.cfg.lora.rank > 0:
            from t2i.models import lora
            from t2i.checkpoint.parents import init_from_parent

            if self.cfg.train.init_from:
                init_from_parent(model, self.cfg)
            lo = self.cfg.lora
            lora.apply(model, lo.rank, lo.alpha, lo.targets, lo.blocks, lo.dropout, lo.init)
        return model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, step: int, ema: ema_lib.ShardedEMA, logger) -> dict:
        from t2i.viz import save_grid

        weights = self.weights(ema)
        if self.rank != 0:
            return {}
        if self.model is None:
            self.model = self.build()
        if self.cfg.lora.rank > 0:  # the EMA holds the adapters only
            from t2i.models import lora
            lora.load_adapter(self.model, lora.peft_keys(weights))
        else:
            load_weights(self.model, weights)
        s, res = self.cfg.sample, self.cfg.data.resolution
        self.sigmas = config_sigmas(self.cfg, dict(self.model.config), self.vae.latent_size(res))
        images, labels = grid_samples(self.cfg, self.model, self.text, self.vae, self.sigmas)
        grid = save_grid(images, labels, self.run_dir / "samples" / f"step{step:08d}.png")
        logger.image("samples", grid, step)
        metrics = {}
        if self.prompts:
            metrics["geneval"] = self.geneval(s, res)
        logger.evaluation(step, metrics, grid)
        return metrics

    def geneval(self, s, resolution: int) -> dict:  # (square: the shapes detector's boxes assume it)
        """Shapes-domain GenEval of `geneval_images` images per prompt: {"overall", <tag>: score}."""
        from t2i.eval.shapes_detector import ShapesColorClassifier, ShapesDetector
        from t2i.viz import to_pil

        entries = [e for e in self.prompts for _ in range(s.geneval_images)]
        images = generate(self.model, self.text, self.vae, [e["prompt"] for e in entries], resolution=resolution,
                          steps=s.steps, guidance=s.guidance, shift=s.shift, seed=s.seed + 10_000,
                          sigmas=self.sigmas, interval=s.guidance_interval)
        detector, colors = ShapesDetector(), ShapesColorClassifier()
        pils = [to_pil(im) for im in images]
        records = [geneval.evaluate_image(im, dets, e, detector.class_names, colors)
                   for im, dets, e in zip(pils, detector(pils), entries, strict=True)]
        summary = geneval.summarize(records)
        return {"overall": summary["overall"], **{t: v["score"] for t, v in summary["tags"].items()}}


def grid_samples(cfg, model, text, vae, sigmas) -> tuple[list, list[str]]:
    """The run's sample grid (in training and at the end): each of cfg.sample.prompts twice, seeds
    sample.seed + i. Square runs draw both at data.resolution; with data.buckets the first is drawn at the
    most square bucket and the second at the most extreme one (t2i.buckets.BucketSet.sample_sizes),
    labelled with their size, so the grid shows how the model does at two aspect ratios."""
    s = cfg.sample
    buckets = bucket_set(cfg.data.buckets, cfg.data.resolution)
    common = dict(steps=s.steps, guidance=s.guidance, shift=s.shift, sigmas=sigmas, interval=s.guidance_interval)
    if buckets is None:
        prompts = [p for p in s.prompts for _ in range(2)]
        return generate(model, text, vae, prompts, resolution=cfg.data.resolution, seed=s.seed, **common), prompts
    sizes = (buckets.sample_sizes() * 2)[:2]
    drawn = [generate(model, text, vae, list(s.prompts), resolution=size, seed=s.seed + k * len(s.prompts), **common)
             for k, size in enumerate(sizes)]
    images = [drawn[k][i] for i in range(len(s.prompts)) for k in range(2)]
    labels = [f"{p} ({size_name(size)})" for p in s.prompts for size in sizes]
    return images, labels
