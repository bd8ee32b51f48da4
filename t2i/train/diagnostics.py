"""Training diagnostics: loss per σ bin, the distribution of σ_in − σ, fixed-σ validation loss.

The arithmetic is in small pure functions (`bin_means`, `gap_summary`) so it can be checked by hand;
`SigmaStats` accumulates per-sample values between log lines and reduces them over ranks.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.distributed as dist

from t2i import flow
from t2i.config import DataConfig, ValidationConfig
from t2i.buckets import bucket_set
from t2i.data.shards import expand_shards
from t2i.data.loader import slot_stream
from t2i.models.mmdit import velocity


def bin_means(sigma: torch.Tensor, loss: torch.Tensor, bins: int) -> list[Optional[float]]:
    """Mean loss of the samples whose σ falls in [k/bins, (k+1)/bins) (σ = 1 in the last bin); None if empty."""
    idx = (sigma.double() * bins).long().clamp(0, bins - 1)
    total = torch.bincount(idx, weights=loss.double(), minlength=bins)
    count = torch.bincount(idx, minlength=bins)
    return [float(t / c) if c else None for t, c in zip(total, count)]


def gap_summary(sigma: torch.Tensor, sigma_in: torch.Tensor) -> dict:
    """Mean and 10/50/90% quantiles of σ_in − σ (0 for flow matching; ≥ 0 for MixFlow)."""
    gap = (sigma_in - sigma).double()
    q = torch.quantile(gap, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(gap.mean()), "q10": float(q[0]), "q50": float(q[1]), "q90": float(q[2])}


class SigmaStats:
    """Per-sample (σ, σ_in, loss) of the steps since the last summary, over all ranks."""

    def __init__(self, bins: int):
        self.bins = bins
        self.parts: list[torch.Tensor] = []

    def add(self, sigma: torch.Tensor, sigma_in: torch.Tensor, loss: torch.Tensor) -> None:
        self.parts.append(torch.stack([sigma.float(), sigma_in.float(), loss.detach().float()]).cpu())

    def summary(self, device: torch.device) -> dict:
        local = torch.cat(self.parts, dim=1).to(device)
        self.parts = []
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank adds the same count
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            local = torch.cat(gathered, dim=1)
        sigma, sigma_in, loss = local.cpu()
        return {"loss_by_sigma": bin_means(sigma, loss, self.bins), "sigma_gap": gap_summary(sigma, sigma_in)}


class FixedSigmaValidation:
    """Flow-matching loss at fixed σ_i = (i + 0.5)/S on the first N held-out samples with fixed noise.

    Every σ sees the same samples and noise, and the input is the standard interpolation at σ with
    the model conditioned on σ, for any training objective, so runs and checkpoints compare directly.
    With data.buckets each sample is cover-cropped to its bucket, as in training, and the samples are
    batched per bucket (groups in bucket order; the loss is still the mean over all N samples).
    """

    def __init__(self, cfg: ValidationConfig, data: DataConfig, text, vae, device: torch.device):
        self.cfg, self.device = cfg, device
        urls = expand_shards(cfg.shards, allow_pipe_in_lists=data.allow_pipe_in_lists, key="validation.shards")
        in_order = DataConfig(shards=urls, resolution=data.resolution, shuffle_buffer=1, buckets=data.buckets,
                              max_caption_bytes=data.max_caption_bytes, max_image_pixels=data.max_image_pixels)
        buckets = bucket_set(data.buckets, data.resolution)
        samples = list(itertools.islice(slot_stream(urls, in_order, seed=0, slot=0, n_slots=1, buckets=buckets),
                                        cfg.num_samples))
        self.keys, self.groups = [], []
        latent_gen, noise_gen = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
        self.sigmas = (torch.arange(cfg.num_sigmas, dtype=torch.float32) + 0.5) / cfg.num_sigmas
        for b in sorted({s["bucket"] for s in samples}):  # one group without buckets: the values as before
            group = [s for s in samples if s["bucket"] == b]
            self.keys += [s["key"] for s in group]
            x = vae.encode(torch.stack([s["image"] for s in group]).to(device), latent_gen).float()
            context, pooled = text.encode([s["caption"] for s in group])
            noise = torch.randn((cfg.num_sigmas, *x.shape), generator=noise_gen).to(device)
            self.groups.append((x, {"context": context.to(device), "pooled": pooled.to(device)}, noise))

    @torch.no_grad()
    def __call__(self, model, dtype: torch.dtype = torch.float32) -> dict:
        bs = self.cfg.batch_size
        per_sigma = []
        for i, s in enumerate(self.sigmas.tolist()):
            losses = []
            for x_all, cond_all, noise_all in self.groups:
                for a in range(0, x_all.shape[0], bs):
                    x, noise = x_all[a:a + bs], noise_all[i, a:a + bs]
                    sigma = torch.full((x.shape[0],), s, device=self.device)
                    cond = {k: v[a:a + bs].to(dtype) for k, v in cond_all.items()}
                    fn = lambda x_in, t: velocity(model, x_in.to(dtype), t.float(), cond).float()  # noqa: E731 -- fp32 timestep
                    losses.append(flow.flow_matching_loss(fn, x, noise, sigma))
            per_sigma.append(torch.cat(losses).mean().item())
        return {"val_loss": sum(per_sigma) / len(per_sigma), "val_loss_by_sigma": per_sigma}
