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


def _folder_config(path: str | None, sub: str) -> dict | None:
    """config.json of a diffusers component folder (<path>/<sub>/ or <path> itself), or None."""
    import json
    from pathlib import Path

    if not path:
        return None
    for folder in (Path(path) / sub, Path(path)):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    return None


def check_geometry(cfg: Config) -> None:
    """data.resolution must be a multiple of the VAE's downsampling × the transformer's patch size, or
    the first step fails with a shape error. Checked before anything is launched (no weights are read),
    after refusing the example configs' placeholder paths (t2i/sd3_folder.py), which would fail later."""
    from t2i.errors import ConfigError
    from t2i.models.mmdit import PRESETS
    from t2i.sd3_folder import refuse_placeholders

    refuse_placeholders(cfg)

    vae = _folder_config(cfg.vae.path, "vae") if cfg.vae.kind == "pretrained" else None
    factor = {"identity": 1, "tiny": 2}.get(cfg.vae.kind) or 2 ** (len((vae or {}).get("block_out_channels", [0] * 4)) - 1)
    transformer = _folder_config(cfg.model.pretrained, "transformer")
    patch = (cfg.model.kwargs.get("patch_size") or (transformer or {}).get("patch_size")
             or PRESETS[cfg.model.preset]["patch_size"])
    step = factor * patch
    r = cfg.data.resolution
    if r % step:
        lower, upper = max(step, r - r % step), r - r % step + step
        raise ConfigError(f"data.resolution={r} is not a multiple of {step} (VAE downsampling {factor} x patch "
                          f"size {patch}); use {lower} or {upper}")
