"""The frozen encoders and the MMDiT a config describes, built to fit each other (latent channels and
size from the VAE, context and pooled widths from the text encoders)."""

from __future__ import annotations

import dataclasses

import torch

from t2i.config import Config
from t2i.buckets import bucket_set
from t2i.models.mmdit import build_model
from t2i.models.presets import PRESETS
from t2i.models.text_encoders import TextEncoders
from t2i.models.vae import FrozenVAE


def build_frozen(cfg: Config, device="cpu") -> tuple[TextEncoders, FrozenVAE]:
    """The frozen encoders (pretrained weights read straight to `device` in their dtype) and the VAE."""
    return TextEncoders(cfg.text, device).to(device), FrozenVAE(cfg.vae, seed=cfg.run.seed).to(device)


def build_for(cfg: Config, text: TextEncoders, vae: FrozenVAE) -> torch.nn.Module:
    """The MMDiT for the config. With data.buckets, a from-scratch preset without a positional grid of its
    own (tiny: the grid is the latent square of data.resolution) gets one that covers the largest bucket
    side, and model.compile is told how many shapes to expect (one per bucket)."""
    model_cfg, sample_size = cfg.model, vae.latent_size(cfg.data.resolution)
    buckets = bucket_set(cfg.data.buckets, cfg.data.resolution)
    if buckets is not None and not model_cfg.pretrained and "pos_embed_max_size" not in model_cfg.kwargs \
            and "pos_embed_max_size" not in PRESETS[model_cfg.preset]:
        patch = model_cfg.kwargs.get("patch_size") or PRESETS[model_cfg.preset]["patch_size"]
        side = max(sample_size, *(vae.latent_size(s) for size in buckets.sizes for s in size))
        model_cfg = dataclasses.replace(model_cfg, kwargs={**model_cfg.kwargs, "pos_embed_max_size": side // patch})
    return build_model(model_cfg, in_channels=vae.latent_channels, sample_size=sample_size,
                       joint_attention_dim=text.context_dim, pooled_projection_dim=text.pooled_dim, seed=cfg.run.seed,
                       n_shapes=len(buckets.sizes) if buckets is not None else 1)
