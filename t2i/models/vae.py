"""Frozen image autoencoder: SD3's 16-channel AutoencoderKL, a tiny random one, or identity.

Latents follow SD3: z = (E(x) − shift_factor) · scaling_factor, x = D(z / scaling_factor + shift_factor).
Images are float tensors in [−1, 1], shape [B, 3, H, W].
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL

from t2i.config import VAEConfig
from t2i.errors import ConfigError
from t2i.sd3_folder import LAYOUT, is_placeholder, placeholder_message


class FrozenVAE(torch.nn.Module):
    """encode/decode with SD3's scaling; `identity` keeps pixel space (the tiny CPU default)."""

    def __init__(self, cfg: VAEConfig, seed: int = 0):
        super().__init__()
        self.kind = cfg.kind
        self.path = cfg.path
        self.vae: Optional[AutoencoderKL] = None
        self.eval()
        if cfg.kind == "identity":
            self.latent_channels, self.downsample = 3, 1
            self.scaling_factor, self.shift_factor = 1.0, 0.0
            return
        if cfg.kind == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.vae = AutoencoderKL(
                    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                    latent_channels=cfg.latent_channels, norm_num_groups=4, use_quant_conv=False,
                    use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
        elif cfg.kind == "pretrained":
            self.vae = _load_pretrained(cfg.path)
        else:
            raise ConfigError(f"vae.kind must be identity | tiny | pretrained, got {cfg.kind!r}")
        self.vae.requires_grad_(False).eval()
        conf = self.vae.config
        self.latent_channels = conf.latent_channels
        self.downsample = 2 ** (len(conf.block_out_channels) - 1)
        self.scaling_factor = conf.scaling_factor
        self.shift_factor = conf.shift_factor or 0.0

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.sample(generator) - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    def latent_size(self, resolution: int) -> int:
        if resolution % self.downsample:
            raise ConfigError(f"data.resolution={resolution} must be divisible by the VAE's {self.downsample}")
        return resolution // self.downsample

    def identity(self) -> dict:
        return {"kind": self.kind, "path": self.path, "latent_channels": self.latent_channels,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


def _load_pretrained(path: Optional[str]) -> AutoencoderKL:
    if is_placeholder(path):
        raise ConfigError(placeholder_message("vae.path", path))
    root = Path(path or "")
    if (root / "vae" / "config.json").is_file():
        root = root / "vae"
    if not (root / "config.json").is_file():
        raise ConfigError(f"vae.path={path}: not a diffusers AutoencoderKL folder (no vae/config.json or config.json "
                          f"in {path}); an SD3/SD3.5 folder has {LAYOUT}")
    return AutoencoderKL.from_pretrained(root, local_files_only=True)
