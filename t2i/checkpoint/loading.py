"""Rebuild a trained model (with its text encoders and VAE) from a t2i checkpoint or a diffusers folder,
for sampling and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from t2i.checkpoint import store
from t2i.config import Config, from_dict
from t2i.errors import CheckpointError
from t2i.models.build import build_for, build_frozen
from t2i.models.mmdit import is_diffusers_folder, load_weights
from t2i.models.text_encoders import TextEncoders
from t2i.models.vae import FrozenVAE


@dataclass
class Loaded:
    cfg: Config
    model: torch.nn.Module
    text: TextEncoders
    vae: FrozenVAE
    source: str  # "<checkpoint dir> (ema|raw)"
    folder: Optional[str] = None      # the diffusers folder it came from (None for a t2i checkpoint)
    scheduler: Optional[dict] = None  # that folder's (or model.pretrained's) scheduler/scheduler_config.json
    lora: Optional[dict] = None       # an adapted model: base, adapter and their sha256 (parents.AdapterInfo)

    @property
    def latent_shape(self) -> tuple:
        size = self.vae.latent_size(self.cfg.data.resolution)
        return (self.vae.latent_channels, size, size)


def read_scheduler_config(path: str | Path | None) -> Optional[dict]:
    """scheduler/scheduler_config.json of a diffusers pipeline folder (also found from its transformer/
    folder, or in the folder itself), or None when there is none."""
    if not path:
        return None
    root = Path(path)
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                      root.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def load(path: str | Path, ema: bool = True, device="cpu", text=None, vae=None) -> Loaded:
    """A run folder, its checkpoints/ folder (latest) or a tag folder -> model in eval mode. A LoRA run's tag
    (it holds the adapters only) gives its base, rebuilt and hash-checked, with the adapters applied
    (t2i.checkpoint.parents)."""
    root, tag = store.resolve(path)
    meta = store.read_meta(root, tag)
    stored = meta["config"]
    # a checkpoint saved before sample.guidance_interval existed was sampled with guidance at every step
    stored.setdefault("sample", {}).setdefault("guidance_interval", [0.0, 1.0])
    if meta.get("lora"):
        from t2i.checkpoint.parents import require_base
        require_base(meta)
    cfg = from_dict(stored)
    if text is None or vae is None:
        text, vae = build_frozen(cfg, device)
    source = f"{root / tag} ({'ema' if ema else 'raw'})"
    scheduler = read_scheduler_config(cfg.model.pretrained)
    if meta.get("lora"):
        from t2i.checkpoint import parents

        _, model, info = parents.adapted(root, tag, ema, text, vae)
        return Loaded(cfg, model.to(device).eval(), text, vae, source, scheduler=scheduler, lora=info.record())
    model = build_for(cfg, text, vae)
    load_weights(model, store.load_weights(root, tag, ema=ema))
    return Loaded(cfg, model.to(device).eval(), text, vae, source, scheduler=scheduler)


def load_diffusers(folder: str | Path, cfg: Config, device="cpu") -> Loaded:
    """A diffusers SD3 / SD3.5 pipeline folder (transformer/, vae/, text_encoder*/) or a bare
    transformer folder; text encoders and VAE come from a pipeline folder (t2i.sd3_folder.is_pipeline_folder),
    which must then hold them all (a missing part is one line naming it), and from `cfg` for a bare
    transformer folder (`cfg` also gives the resolution)."""
    import dataclasses

    from t2i.sd3_folder import is_pipeline_folder, require

    folder = Path(folder)
    text_cfg, vae_cfg = cfg.text, cfg.vae
    if is_pipeline_folder(folder):
        require("--ckpt", str(folder), ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                        "tokenizer_3"], files=True)
        text_cfg = dataclasses.replace(cfg.text, preset="sd3", sd3_folder=str(folder), clip_l=None, clip_g=None,
                                       t5=None, clip_context=77, max_t5_tokens=max(cfg.text.max_t5_tokens, 256))
        vae_cfg = dataclasses.replace(cfg.vae, kind="pretrained", path=str(folder))
    cfg = dataclasses.replace(cfg, text=text_cfg, vae=vae_cfg,
                              model=dataclasses.replace(cfg.model, pretrained=str(folder)))
    text, vae = build_frozen(cfg, device)
    model = build_for(cfg, text, vae)
    return Loaded(cfg, model.to(device).eval(), text, vae, f"{folder} (diffusers)", folder=str(folder),
                  scheduler=read_scheduler_config(folder))


def load_any(path: str | Path, cfg: Config, ema: bool = True, device="cpu", lora: str | Path | None = None) -> Loaded:
    """A t2i checkpoint (run folder, checkpoints/ or tag; EMA or raw weights) or a diffusers folder; with
    `lora`, a diffusers-format adapter file (or folder) applied to it (t2i.checkpoint.parents.apply_file)."""
    from t2i.sd3_folder import is_pipeline_folder

    if (is_diffusers_folder(str(path)) or is_pipeline_folder(path)) and not (Path(path) / "meta.json").exists():
        loaded = load_diffusers(path, cfg, device)
    else:
        loaded = load(path, ema=ema, device=device)
    if lora is not None:
        from t2i.checkpoint import parents

        if loaded.lora:
            raise CheckpointError(f"--lora {lora}: {path} is a LoRA run, its adapters are already applied; give "
                                  f"--lora with a base model (a diffusers folder or a full t2i run)")
        info = parents.apply_file(loaded.model, lora, base=loaded.source)
        loaded.model.to(device).eval()
        loaded.lora = info.record()
    return loaded
