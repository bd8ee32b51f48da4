"""Text-to-image sampling with the Euler sampler and classifier-free guidance (t2i.flow).

Every image i gets its own noise from seed `seed + i`, so a prompt's image does not depend on
what else is in the batch or how the work was split.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from t2i import flow
from t2i.models.mmdit import velocity


def initial_noise(first: int, count: int, seed: int, shape: tuple, device, dtype) -> torch.Tensor:
    """ε for images first .. first+count-1, image i from its own generator seeded `seed + i`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i))
                        for i in range(count)]).to(device, dtype)


@torch.no_grad()
def sample_batch(model, text, prompts: list[str], noise: torch.Tensor, sigmas: torch.Tensor, guidance: float,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler + CFG from `noise` along `sigmas` (1 -> 0); returns the final latents."""
    dtype, device = noise.dtype, noise.device
    context, pooled = text.encode(prompts)
    empty_context, empty_pooled = text.encode_empty(len(prompts))
    cond = {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}
    uncond = {"context": empty_context.to(device, dtype), "pooled": empty_pooled.to(device, dtype)}
    model_fn = lambda x, t, c: velocity(model, x, t.to(dtype), c)  # noqa: E731
    return flow.euler_sample(flow.cfg_velocity(model_fn, cond, uncond, guidance), noise, sigmas.to(device),
                             callback=callback)


@torch.no_grad()
def generate(model, text, vae, prompts: list[str], *, resolution: int, steps: int, guidance: float,
             shift: float = 1.0, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Images in [−1, 1], shape [len(prompts), 3, resolution, resolution]."""
    param = next(model.parameters())
    size = vae.latent_size(resolution)
    sigmas = flow.sampling_sigmas(steps, shift)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = initial_noise(start, len(chunk), seed, (vae.latent_channels, size, size), param.device, param.dtype)
        out.append(vae.decode(sample_batch(model, text, chunk, noise, sigmas, guidance).float()).float().cpu())
    return torch.cat(out)
