"""One micro-batch's loss: frozen encoders -> latents and conditioning, σ (and σ_in) and noise, one
forward pass. The formulas are in t2i.flow; this module only wires the batch and the config to them.
"""

from __future__ import annotations

import torch

from t2i import flow
from t2i.config import Config
from t2i.data import cache as cache_lib
from t2i.models.mmdit import velocity
from t2i.train.timing import Phases


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
    A batch from data.cache (batch["cache"], t2i.data.cache) gives the same values with the same
    generator draws: the latent sample first, then the caption-dropout uniforms."""
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
    # The timestep stays fp32 (diffusers builds the sinusoidal embedding in fp32; in bf16, 1000·σ would
    # be rounded to steps of 4 above 512); only the latents follow the model's dtype.
    model_fn = lambda x_in, timestep: velocity(engine, x_in.to(dtype), timestep.float(), cond).float()  # noqa: E731
    parts = loss_parts(cfg.model.compile)
    if cfg.train.objective == "mixflow":  # slowed input at σ_in ≥ σ, conditioned on σ
        sigma, sigma_in = flow.sample_mixflow(n, cfg.train.mixflow_gamma, generator=generator, shift=t.shift)
        loss = flow.mixflow_loss(model_fn, x, noise, sigma.to(device), sigma_in.to(device), **parts)
    else:
        sigma = flow.sample_sigmas(cfg.timestep_sampler, n, generator=generator, **timestep_params(cfg))
        sigma_in = sigma
        loss = flow.flow_matching_loss(model_fn, x, noise, sigma.to(device), **parts)
    stats = {"sigma": sigma, "sigma_in": sigma_in, "per_sample": loss.detach(), "x": x, "noise": noise}
    return loss.mean(), stats


_COMPILED: dict = {}


def loss_parts(compiled: bool) -> dict:
    """The loss's elementwise parts (interpolation, per-sample squared error) for flow.mixflow_loss:
    torch.compile'd with model.compile (each becomes one fused kernel instead of 3-5 passes over the
    latents), else flow's eager functions. Compiled once per process."""
    if not compiled:
        return {}
    if not _COMPILED:
        _COMPILED.update(interpolate_fn=torch.compile(flow.interpolate), error_fn=torch.compile(flow.squared_error))
    return dict(_COMPILED)


def timestep_params(cfg: Config) -> dict:
    t, kind = cfg.train.timesteps, cfg.timestep_sampler
    extra = {"logit_normal": {"mean": t.mean, "std": t.std}, "mode": {"scale": t.scale}}.get(kind, {})
    return {"shift": t.shift, **extra}


class NonFiniteGuard:
    """Counts the optimizer steps DeepSpeed skipped for a non-finite gradient (the count persists
    across resume) and stops the run after `limit` in a row, naming the last good checkpoint."""

    def __init__(self, limit: int, skipped: int = 0):
        self.limit, self.skipped, self.streak = limit, skipped, 0

    def update(self, applied: bool) -> bool:
        """Record one optimizer step; True when it was applied (finite)."""
        self.streak = 0 if applied else self.streak + 1
        self.skipped += 0 if applied else 1
        return applied

    def check(self, step: int, last_good: str) -> None:
        from t2i.errors import NonFiniteError

        if self.streak >= self.limit:
            raise NonFiniteError(
                f"{self.streak} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopping without saving. The last good checkpoint is {last_good}. Lower train.lr, check "
                f"the data, or raise train.max_consecutive_nonfinite.")
