"""The frozen encoders and the MMDiT a config describes, built to fit each other (latent channels and
size from the VAE, context and pooled widths from the text encoders)."""

from __future__ import annotations

import torch

from t2i.config import Config
from t2i.models.mmdit import build_model
from t2i.models.text_encoders import TextEncoders
from t2i.models.vae import FrozenVAE


def build_frozen(cfg: Config, device="cpu") -> tuple[TextEncoders, FrozenVAE]:
    """The frozen encoders (pretrained weights read straight to `device` in their dtype) and the VAE."""
    return TextEncoders(cfg.text, device).to(device), FrozenVAE(cfg.vae, seed=cfg.run.seed).to(device)


def build_for(cfg: Config, text: TextEncoders, vae: FrozenVAE) -> torch.nn.Module:
    return build_model(cfg.model, in_channels=vae.latent_channels, sample_size=vae.latent_size(cfg.data.resolution),
                       joint_attention_dim=text.context_dim, pooled_projection_dim=text.pooled_dim, seed=cfg.run.seed)
