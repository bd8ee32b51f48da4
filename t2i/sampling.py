"""Text-to-image sampling with the Euler sampler and classifier-free guidance (t2i.flow).

Every image i of a call gets its own noise from seed `seed + i`, so a prompt's image does not
depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from t2i import flow
from t2i.model import velocity


@torch.no_grad()
def generate(model, text, vae, prompts: list[str], *, resolution: int, steps: int, guidance: float,
             shift: float = 1.0, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Images in [−1, 1], shape [len(prompts), 3, resolution, resolution]."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    size = vae.latent_size(resolution)
    sigmas = flow.sampling_sigmas(steps, shift).to(device)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = torch.stack([
            torch.randn(vae.latent_channels, size, size, generator=torch.Generator().manual_seed(seed + start + i))
            for i in range(len(chunk))]).to(device, dtype)
        context, pooled = text.encode(chunk)
        empty_context, empty_pooled = text.encode_empty(len(chunk))
        cond = {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}
        uncond = {"context": empty_context.to(device, dtype), "pooled": empty_pooled.to(device, dtype)}
        model_fn = lambda x, t, c: velocity(model, x, t.to(dtype), c)  # noqa: E731
        x0 = flow.euler_sample(flow.cfg_velocity(model_fn, cond, uncond, guidance), noise, sigmas)
        out.append(vae.decode(x0.float()).float().cpu())
    return torch.cat(out)
