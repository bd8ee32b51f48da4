"""Text-to-image sampling with the Euler sampler and classifier-free guidance (t2i.flow), and the
settings it runs with (`plan`: steps, guidance, shift, resolution, σ grid, each with where it came from).

A resolution is an int (a square of that side) or a (width, height) tuple in pixels; images come back
[N, 3, height, width] from latents [N, C, height // f, width // f] (f: the VAE's downsampling). The token
count of dynamic shifting is (height // f // patch) × (width // f // patch).

Every image i gets its own noise from seed `seed + i`, so a prompt's image does not depend on
what else is in the batch or how the work was split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from t2i import flow
from t2i.eval.image_source import Resolution, as_resolution, resolution_record, size_of
from t2i.models.mmdit import velocity

# Steps and CFG scale for a diffusers folder sampled without a config, from the model cards.
# The row is picked from transformer/config.json by `model_family`.
MODEL_DEFAULTS = {
    "sd3.5-medium": dict(steps=40, guidance=4.5),  # stabilityai/stable-diffusion-3.5-medium
    "sd3.5-large": dict(steps=28, guidance=3.5),   # stabilityai/stable-diffusion-3.5-large
    "sd3-medium": dict(steps=28, guidance=7.0),    # stabilityai/stable-diffusion-3-medium-diffusers
}
PIPELINE_DEFAULTS = dict(steps=28, guidance=7.0)   # StableDiffusion3Pipeline.__call__, for any other model
SD3_SHIFT = 3.0  # every SD3 / SD3.5 release's scheduler shift; used only when a folder has no scheduler config


def model_family(transformer_config) -> Optional[str]:
    """The MODEL_DEFAULTS row of an SD3Transformer2DModel config, or None when it matches none:
    dual_attention_layers -> sd3.5-medium (MMDiT-X); 38 layers -> sd3.5-large; 24 layers without
    QK-norm -> sd3-medium."""
    c = dict(transformer_config or {})
    if c.get("dual_attention_layers"):
        return "sd3.5-medium"
    if c.get("num_layers") == 38:
        return "sd3.5-large"
    if c.get("num_layers") == 24 and not c.get("qk_norm"):
        return "sd3-medium"
    return None


def is_sd3_family(cfg, folder: Optional[str]) -> bool:
    """An SD3 / SD3.5 model (a diffusers folder, model.pretrained, or an SD3-sized preset), not the toy."""
    model = getattr(cfg, "model", None)
    return folder is not None or bool(getattr(model, "pretrained", None)) or getattr(model, "preset", "tiny") != "tiny"


@dataclass
class Plan:
    """What a sampling job runs with, and where each value came from (printed and written to manifests)."""
    steps: int
    guidance: float
    shift: float
    resolution: Resolution          # an int side (square, as always) or (width, height) in pixels
    grid: str                       # t2i | diffusers
    sigmas: torch.Tensor            # [steps + 1] float32, 1 -> 0
    scheduler: Optional[dict]       # the diffusers grid's full scheduler config (None for the t2i grid)
    model: Optional[str]            # MODEL_DEFAULTS row, when the model matches one
    sources: dict = field(default_factory=dict)
    guidance_interval: tuple = flow.FULL_INTERVAL  # (σ_lo, σ_hi): CFG only there (t2i.flow.cfg_velocity)

    @property
    def width(self) -> int:
        return size_of(self.resolution)[0]

    @property
    def height(self) -> int:
        return size_of(self.resolution)[1]

    def describe(self) -> list[str]:
        shown = {"resolution": resolution_record(self.resolution)}  # 64, or 1216x832 (width x height)
        return [f"{k} = {shown.get(k, getattr(self, k))} ({self.sources[k]})" for k in
                ("steps", "guidance", "guidance_interval", "shift", "resolution", "grid")]


def plan(loaded, *, steps=None, guidance=None, shift=None, resolution=None, explicit=None,
         config_name: str = "the config", guidance_interval=None) -> Plan:
    """Resolve the sampling settings of `loaded` (t2i.checkpoint.loading.Loaded).

    Order: a command-line value (not None) > the config > the diffusers folder's own defaults.
    A t2i checkpoint always uses its own config. A diffusers folder uses the config's value for the
    keys in `explicit` (dotted config keys the user set; None = a --config was given, so all of them)
    and otherwise: resolution (an int side, or a (width, height) tuple from the command line) = transformer sample_size x VAE factor, shift from
    scheduler/scheduler_config.json, steps and guidance from MODEL_DEFAULTS (PIPELINE_DEFAULTS for an
    unknown model). `sample.sigmas: auto` means the diffusers grid for SD3-family models, else t2i's."""
    cfg, folder = loaded.cfg, getattr(loaded, "folder", None)
    model_cfg = getattr(getattr(loaded, "model", None), "config", None) or {}
    family = model_family(model_cfg) if folder is not None or is_sd3_family(cfg, folder) else None
    sources: dict = {}

    def from_config(key: str) -> bool:
        return folder is None or explicit is None or key in explicit

    def pick(name, given, key, folder_value, folder_source):
        if given is not None:
            sources[name] = "command line"
            return given
        if from_config(key):
            sources[name] = (f"{config_name}: {key}" if folder is not None else f"the checkpoint's config: {key}")
            v = cfg
            for part in key.split("."):
                v = getattr(v, part)
            return v
        sources[name] = folder_source
        return folder_value

    row = MODEL_DEFAULTS.get(family) if family else None
    row_source = (f"model-card default for {family}" if row else
                  "StableDiffusion3Pipeline default: the model matches no known SD3/SD3.5 release")
    row = row or PIPELINE_DEFAULTS
    steps = pick("steps", steps, "sample.steps", row["steps"], row_source)
    guidance = pick("guidance", guidance, "sample.guidance", row["guidance"], row_source)
    interval = flow.check_interval(pick("guidance_interval", guidance_interval, "sample.guidance_interval",
                                        flow.FULL_INTERVAL, "every step, as StableDiffusion3Pipeline"))
    scheduler = getattr(loaded, "scheduler", None)
    folder_shift = (scheduler or {}).get("shift", SD3_SHIFT)
    shift = pick("shift", shift, "sample.shift", float(folder_shift),
                 f"{folder}/scheduler/scheduler_config.json" if scheduler else
                 f"SD3 default {SD3_SHIFT}: no scheduler/scheduler_config.json in {folder}")
    native = (model_cfg.get("sample_size") or 0) * loaded.vae.downsample if folder is not None else None
    resolution = pick("resolution", resolution, "data.resolution", native,
                      "the folder: transformer sample_size x VAE downsampling")
    grid = getattr(cfg.sample, "sigmas", "auto")
    if grid == "auto" or not from_config("sample.sigmas"):
        grid = "diffusers" if is_sd3_family(cfg, folder) else "t2i"
        sources["grid"] = ("auto: diffusers' scheduler grid for an SD3-family model" if grid == "diffusers"
                           else "auto: t2i's grid for the tiny toy model")
    else:
        sources["grid"] = f"{config_name}: sample.sigmas" if folder is not None else "the checkpoint's config"
    full = flow.scheduler_config(scheduler, shift) if grid == "diffusers" else None
    resolution = as_resolution(resolution)
    if isinstance(resolution, tuple):
        check_size(resolution, getattr(getattr(loaded, "vae", None), "downsample", None), model_cfg)
    tokens = None
    if full and full.get("use_dynamic_shifting"):  # μ from the latent token count, as the pipeline
        width, height = size_of(resolution)
        tokens = image_tokens((loaded.vae.latent_size(width), loaded.vae.latent_size(height)),
                              model_cfg.get("patch_size"))
    sigmas = flow.inference_sigmas(steps, grid, shift, full, image_seq_len=tokens)
    return Plan(steps=int(steps), guidance=float(guidance), shift=float(shift), resolution=resolution,
                grid=grid, sigmas=sigmas, scheduler=full, model=family, sources=sources, guidance_interval=interval)


def check_size(size: tuple[int, int], factor: Optional[int], model_config: dict, key: str = "--resolution") -> None:
    """A (width, height) the model can sample: each side a multiple of VAE factor × patch size and at most the
    positional grid (pos_embed_max_size patches), else ConfigError naming `key` (before any model call)."""
    from t2i.errors import ConfigError

    patch = (model_config or {}).get("patch_size") or 1
    step = (factor or 1) * patch
    width, height = size
    if width % step or height % step:
        raise ConfigError(f"{key} {width}x{height}: each side must be a multiple of {step} (VAE downsampling "
                          f"{factor or 1} x patch size {patch})")
    grid = (model_config or {}).get("pos_embed_max_size")
    if grid and max(width, height) > grid * step:
        raise ConfigError(f"{key} {width}x{height}: a side of {max(width, height)} px is past the model's positional "
                          f"grid of {grid * step} px ({grid} patches of {step} px)")


def image_tokens(latent_size, patch_size: Optional[int]) -> int:
    """Image tokens of a latent: (h // patch) × (w // patch); `latent_size` is a square's latent side (int)
    or the latent (width, height)."""
    lw, lh = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    p = patch_size or 1
    return (lw // p) * (lh // p)


def config_sigmas(cfg, model_config: Optional[dict] = None, latent_size=None) -> torch.Tensor:
    """The σ grid of a run's own samples (cfg.sample: steps, shift, sigmas), as `plan` chooses it for a
    checkpoint: the in-training grids and the final grid of an SD3 run use diffusers' scheduler grid.

    `latent_size`: the latent side of a square (int), or the latent (width, height) of a non-square size,
    e.g. (vae.latent_size(w), vae.latent_size(h)); only dynamic shifting uses it (its token count)."""
    from t2i.checkpoint.loading import read_scheduler_config

    grid = cfg.sample.sigmas
    if grid == "auto":
        grid = "diffusers" if is_sd3_family(cfg, None) else "t2i"
    full = flow.scheduler_config(read_scheduler_config(cfg.model.pretrained), cfg.sample.shift) \
        if grid == "diffusers" else None
    tokens = None
    if full and full.get("use_dynamic_shifting") and latent_size:
        tokens = image_tokens(latent_size, (model_config or {}).get("patch_size"))
    return flow.inference_sigmas(cfg.sample.steps, grid, cfg.sample.shift, full, image_seq_len=tokens)


def initial_noise(first: int, count: int, seed: int, shape: tuple, device, dtype) -> torch.Tensor:
    """ε for images first .. first+count-1, image i from its own generator seeded `seed + i`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i))
                        for i in range(count)]).to(device, dtype)


@torch.no_grad()
def guided_velocity(model, text, prompts: list[str], guidance: float, device, dtype,
                    interval=flow.FULL_INTERVAL) -> Callable:
    """velocity_fn(x, σ) of `model` for `prompts` under CFG scale `guidance` (t2i.flow.cfg_velocity), the
    unconditional branch being every encoder's encoding of "". Conditioning is cast to `dtype` on `device`.
    Guidance applies only for σ in `interval` (sample.guidance_interval; the default guides every step).

    The timestep 1000·σ reaches the model in float32 whatever the model's dtype (as in diffusers'
    pipeline: the transformer builds its sinusoidal embedding in fp32; in bf16 750 would become 752)."""
    context, pooled = text.encode(prompts)
    empty_context, empty_pooled = text.encode_empty(len(prompts))
    cond = {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}
    uncond = {"context": empty_context.to(device, dtype), "pooled": empty_pooled.to(device, dtype)}
    model_fn = lambda x, t, c: velocity(model, x, t.float(), c)  # noqa: E731
    return flow.cfg_velocity(model_fn, cond, uncond, guidance, interval)


@torch.no_grad()
def sample_batch(model, text, prompts: list[str], noise: torch.Tensor, sigmas: torch.Tensor, guidance: float,
                 callback: Optional[Callable] = None, interval=flow.FULL_INTERVAL) -> torch.Tensor:
    """Euler + CFG (`guided_velocity`) from `noise` along `sigmas` (1 -> 0); returns the final latents,
    in noise's dtype."""
    velocity_fn = guided_velocity(model, text, prompts, guidance, noise.device, noise.dtype, interval)
    return flow.euler_sample(velocity_fn, noise, sigmas.to(noise.device), callback=callback)


def latent_shape(vae, resolution) -> tuple[int, int, int]:
    """[C, height // f, width // f] of one image at `resolution` (an int side or (width, height))."""
    width, height = size_of(resolution)
    return vae.latent_channels, vae.latent_size(height), vae.latent_size(width)


@torch.no_grad()
def generate(model, text, vae, prompts: list[str], *, resolution: Resolution, steps: int, guidance: float,
             shift: float = 1.0, seed: int = 0, batch_size: int = 16, sigmas: Optional[torch.Tensor] = None,
             interval=flow.FULL_INTERVAL) -> torch.Tensor:
    """Images in [−1, 1], shape [len(prompts), 3, height, width] for `resolution` = (width, height), or
    [len(prompts), 3, resolution, resolution] for an int; on `sigmas` when given (e.g. a Plan's), else on
    t2i's grid sampling_sigmas(steps, shift). Image i's noise is seeded `seed + i`."""
    param = next(model.parameters())
    shape = latent_shape(vae, resolution)
    if sigmas is None:
        sigmas = flow.inference_sigmas(steps, "t2i", shift)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = initial_noise(start, len(chunk), seed, shape, param.device, param.dtype)
        latents = sample_batch(model, text, chunk, noise, sigmas, guidance, interval=interval)
        out.append(vae.decode(latents.float()).float().cpu())
    return torch.cat(out)
