"""A model-free noise level for sampler states of the shapes domain (docs/design/flow.md §6.3).

The shapes images (t2i.data.shapes) are flat `BACKGROUND` with a few palette shapes. In pixel space
(the identity VAE, images scaled to [−1, 1]) a ground-truth interpolation x_σ = (1 − σ)·x + σ·ε is,
on a background pixel, (1 − σ)·bg + σ·ε: over the background pixels of one image its spread is
σ·std(ε) ≈ σ. So the spread of a sampler state's background pixels says how much noise it still
carries, without asking any model, and can be set against the step's σ.

Two choices make it robust:

- Which pixels are background is read off the final samples: a pixel counts when the 3×3 box mean
  of the final is within `tol` (Euclidean, RGB) of the background colour, and so is every pixel of
  its own 3×3 window (one pixel of erosion). The box mean tolerates a final that still carries noise
  (a lagging model leaves some, which also pulls the colour toward ε's mean 0; the palette colours
  are ≥ 1.4 away), and the erosion drops the pixels next to a shape, where the boundary may have
  moved during sampling.
- The spread is taken about the pixels' own per-channel mean, not about (1 − σ)·bg: a model's
  background colour can be slightly off, and at high σ the blurry prediction shifts the mean; neither
  is noise. Divided by the same spread of the starting noise ε on the same pixels (when given), the
  estimate of a ground-truth interpolation is exactly σ instead of σ·(1 ± 1/√(2·pixels)).

This is only meaningful where the flow runs in pixel space: a latent VAE's latents of a flat colour
are not a known constant, so callers restrict it to `vae.kind: identity`.
"""

from __future__ import annotations

import torch

from t2i.data.shapes import BACKGROUND


def shapes_background(device=None) -> torch.Tensor:
    """The shapes domain's background colour in the flow's pixel space (x / 127.5 − 1), shape [3]."""
    return torch.tensor(BACKGROUND, dtype=torch.float32, device=device) / 127.5 - 1.0


def background_mask(final: torch.Tensor, background: torch.Tensor, tol: float = 0.5, radius: int = 1
                    ) -> torch.Tensor:
    """Bool [B, H, W]: the pixels of `final` [B, C, H, W] whose (2·radius+1)² box mean is within `tol`
    (Euclidean over channels) of `background` [C], eroded by `radius` (every pixel of the window must
    pass too). Windows are clipped at the image border."""
    x, k = final.float(), 2 * radius + 1
    if radius > 0:  # box mean over the in-image part of each window
        x = torch.nn.functional.avg_pool2d(x, k, stride=1, padding=radius, count_include_pad=False)
    bg = background.to(x.device, x.dtype).view(1, -1, 1, 1)
    near = ((x - bg) ** 2).sum(1).sqrt() <= tol                          # [B, H, W]
    if radius > 0:  # erosion: a window with any non-background pixel (max-pool of the complement)
        far = torch.nn.functional.max_pool2d((~near)[:, None].float(), k, stride=1, padding=radius)
        near = far[:, 0] == 0
    return near


def _spread(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled within-channel standard deviation of x [B, C, H, W] over the mask [B, H, W], and the
    mask's pixel count per image."""
    m = mask[:, None].to(x.dtype)
    n = m.sum((1, 2, 3))                                                # [B] pixels
    mean = (x * m).sum((2, 3)) / n.clamp_min(1)[:, None]                # [B, C]
    ss = (((x - mean[..., None, None]) * m) ** 2).sum((1, 2, 3))        # [B]
    dof = x.shape[1] * (n - 1).clamp_min(1)                             # C·(n − 1): one mean per channel
    return (ss / dof).sqrt(), n


def background_sigma(x_sigma: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor | None = None,
                     min_pixels: int = 16) -> torch.Tensor:
    """σ_est [B] (float32): the spread of x_sigma [B, C, H, W] over the background pixels `mask`
    [B, H, W], divided by the spread of `noise` (the trajectory's ε) on the same pixels when given.
    NaN where an image has fewer than `min_pixels` background pixels."""
    x = x_sigma.float()
    spread, n = _spread(x, mask)
    if noise is not None:
        spread = spread / _spread(noise.float(), mask)[0].clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(n >= min_pixels, spread, torch.full_like(spread, float("nan")))
