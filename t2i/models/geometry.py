"""Whether a config's image size fits its model: checked in the process the user started, before
torchrun, DeepSpeed or any model exists, so this module imports neither torch nor diffusers."""

from __future__ import annotations

import json
from pathlib import Path

from t2i.config import Config
from t2i.buckets import bucket_set, check_sizes
from t2i.errors import ConfigError
from t2i.models.presets import PRESETS
from t2i.sd3_folder import refuse_placeholders


def folder_config(path: str | None, sub: str) -> dict | None:
    """config.json of a diffusers component folder (<path>/<sub>/ or <path> itself), or None."""
    if not path:
        return None
    for folder in (Path(path) / sub, Path(path)):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    return None


def check_geometry(cfg: Config) -> None:
    """data.resolution and every bucket side (data.buckets) must be a multiple of the VAE's downsampling ×
    the transformer's patch size, or the first step fails with a shape error, and no bucket side may pass
    the positional grid (pos_embed_max_size patches), or diffusers' PatchEmbed fails at its first batch. Checked before anything is launched (no weights are read),
    after refusing the example configs' placeholder paths (t2i/sd3_folder.py), which would fail later."""
    refuse_placeholders(cfg)

    vae = folder_config(cfg.vae.path, "vae") if cfg.vae.kind == "pretrained" else None
    factor = {"identity": 1, "tiny": 2}.get(cfg.vae.kind) or 2 ** (len((vae or {}).get("block_out_channels", [0] * 4)) - 1)
    transformer = folder_config(cfg.model.pretrained, "transformer")
    patch = (cfg.model.kwargs.get("patch_size") or (transformer or {}).get("patch_size")
             or PRESETS[cfg.model.preset]["patch_size"])
    step = factor * patch
    r = cfg.data.resolution
    if r % step:
        lower, upper = max(step, r - r % step), r - r % step + step
        raise ConfigError(f"data.resolution={r} is not a multiple of {step} (VAE downsampling {factor} x patch "
                          f"size {patch}); use {lower} or {upper}")
    buckets = bucket_set(cfg.data.buckets, r)
    if buckets is not None:
        grid = (cfg.model.kwargs.get("pos_embed_max_size") or (transformer or {}).get("pos_embed_max_size")
                or (None if transformer else PRESETS[cfg.model.preset].get("pos_embed_max_size")))
        # (a from-scratch preset without a grid of its own gets one that covers the buckets: t2i.models.build)
        what = f"VAE downsampling {factor} x patch size {patch}" + (
            f"; positional grid {grid} patches = {grid * step} px" if grid else "")
        check_sizes(buckets, step, grid * step if grid else None, what)
