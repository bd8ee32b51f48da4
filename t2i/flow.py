"""Rectified-flow math: THE one place that states the time convention.

Noise-ward time σ ∈ [0, 1], as in SD3 / diffusers:

    σ = 1 is pure noise, σ = 0 is data
    x_σ = (1 − σ)·x + σ·ε               ε ~ N(0, I), x = data latent
    v*  = ε − x                          target velocity (constant along the linear path)
    model timestep = 1000·σ              SD3Transformer2DModel convention
    Euler sampling from σ = 1 to σ = 0:  x ← x + (σ_next − σ)·v̂

The MixFlow paper (arXiv 2512.19311) writes data-ward time t = 1 − σ. In σ-time its training step is
σ = 1 − sqrt(u) (Beta(1,2)), σ_in = σ + r·γ·(1 − σ) (always toward noise), the model sees x_{σ_in}
but is conditioned on the ORIGINAL timestep 1000·σ, and the target stays ε − x.
Everything else in the project imports these functions instead of re-deriving them.
"""
import math

import torch

# kind -> its parameters and their defaults; every kind also accepts `shift` (applied after sampling).
SIGMA_SAMPLERS = {
    "uniform": {},
    "logit_normal": {"mean": 0.0, "std": 1.0},  # SD3 default
    "mode": {"scale": 1.29},  # SD3 paper's mode sampling
    "mixflow": {},  # Beta(1,2) in σ = Beta(2,1) in paper time
}


def _per_sample(sigma, x):
    """σ of shape [B] (or a scalar) viewed as [B, 1, ..., 1] to broadcast over the other dims of x."""
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))


def _uniform(n, generator):
    device = generator.device if generator is not None else None
    return torch.rand(n, generator=generator, device=device, dtype=torch.float32)


def interpolate(x, noise, sigma):
    """x_σ = (1 − σ)·x + σ·ε, with σ per sample ([B]) broadcast over the other dims; keeps x's dtype."""
    s = _per_sample(sigma, x)
    return ((1 - s) * x + s * noise).to(x.dtype)


def velocity_target(x, noise):
    """v* = ε − x: the velocity of the linear path, the same at every σ."""
    return noise - x


def timestep(sigma):
    """Model timestep = 1000·σ (SD3Transformer2DModel / diffusers convention)."""
    return 1000.0 * sigma


def shift_sigmas(sigma, shift):
    """σ' = s·σ / (1 + (s − 1)·σ). Fixes 0 and 1, s > 1 moves σ toward noise, s = 1 is the identity."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(kind, n, generator=None, **params):
    """Draw n training σ's (float32, shape [n]), then apply `shift` (default 1.0).

    uniform:       σ = u
    logit_normal:  σ = sigmoid(mean + std·z), z ~ N(0, 1)                (SD3 default: mean 0, std 1)
    mode:          σ = 1 − u − scale·(cos²(πu/2) − 1 + u)               (SD3 paper; default scale 1.29;
                                                                        monotone for scale ∈ [−1, 2/(π−2)])
    mixflow:       σ = 1 − sqrt(u)                                      (Beta(1,2) in σ, Beta(2,1) in paper time)
    with u ~ U(0, 1).
    """
    if kind not in SIGMA_SAMPLERS:
        raise ValueError(f"unknown sigma sampler kind {kind!r}; valid kinds: {sorted(SIGMA_SAMPLERS)}")
    valid = {**SIGMA_SAMPLERS[kind], "shift": 1.0}
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for sigma sampler {kind!r}; valid: {sorted(valid)}")
    p = {**valid, **params}
    if kind == "uniform":
        sigma = _uniform(n, generator)
    elif kind == "logit_normal":
        device = generator.device if generator is not None else None
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        sigma = torch.sigmoid(p["mean"] + p["std"] * z)
    elif kind == "mode":
        if not -1.0 <= p["scale"] <= 2 / (math.pi - 2):
            raise ValueError(f"mode scale must be in [-1, 2/(pi-2)] for a monotone map, got {p['scale']}")
        u = _uniform(n, generator)
        sigma = 1 - u - p["scale"] * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:  # mixflow
        sigma = 1 - torch.sqrt(_uniform(n, generator))
    return shift_sigmas(sigma, p["shift"])


def mixflow_sigmas(u, r, gamma, shift=1.0):
    """MixFlow's (σ, σ_in) from uniforms u, r ∈ [0, 1] (shape [n]); a pure function.

    σ    = shift(1 − sqrt(u))          training / conditioning time, Beta(1,2) before the shift
    σ_in = σ + r·γ·(1 − σ)              slowed input time, σ ≤ σ_in ≤ 1 (paper: m = t(1 − γr) ∈ [(1−γ)t, t])
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma (MixFlow mixture range coefficient) must be in [0, 1], got {gamma}")
    sigma = shift_sigmas(1 - torch.sqrt(u), shift)
    return sigma, sigma + r * gamma * (1 - sigma)


def sample_mixflow(n, gamma, generator=None, shift=1.0):
    """Draw u, r ~ U(0, 1) (u first) with `generator` and return mixflow_sigmas(u, r, gamma, shift)."""
    u = _uniform(n, generator)
    r = _uniform(n, generator)
    return mixflow_sigmas(u, r, gamma, shift)


def mixflow_loss(model_fn, x, noise, sigma, sigma_in, interpolate_fn=None, error_fn=None):
    """Per-sample loss [B] = mean over non-batch dims of (model_fn(x_{σ_in}, 1000·σ) − (ε − x))².

    The input sits at σ_in, the conditioning timestep stays the ORIGINAL σ, the target is unchanged.
    model_fn(x_in, timestep) -> predicted velocity, same shape as x. The squared error is taken in float32.
    `interpolate_fn` / `error_fn` replace `interpolate` / `squared_error` by equal functions (the training
    step passes torch.compile'd ones with model.compile, which fuse each into one kernel).
    """
    pred = model_fn((interpolate_fn or interpolate)(x, noise, sigma_in), timestep(sigma))
    return (error_fn or squared_error)(pred, x, noise)


def squared_error(pred, x, noise):
    """Per-sample mean of (pred − (ε − x))² in float32 [B]."""
    err = pred.float() - velocity_target(x, noise).float()
    return err.pow(2).flatten(1).mean(1)


def flow_matching_loss(model_fn, x, noise, sigma, interpolate_fn=None, error_fn=None):
    """Per-sample loss [B] = mean over non-batch dims of (model_fn(x_σ, 1000·σ) − (ε − x))².

    Standard flow matching, i.e. mixflow_loss with σ_in = σ.
    """
    return mixflow_loss(model_fn, x, noise, sigma, sigma, interpolate_fn, error_fn)


def sampling_sigmas(steps, shift=1.0):
    """t2i's inference grid [steps + 1]: shift(linspace(1, 0, steps + 1)), from exactly 1.0 down to exactly 0.0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


# The inference grids t2i can sample on (`sample.sigmas`); "auto" is resolved by the caller
# (diffusers for SD3-family models, t2i for the tiny toy).
SIGMA_GRIDS = ("t2i", "diffusers")
# Scheduler config keys that are bookkeeping, not part of the grid.
_SCHEDULER_META = ("_class_name", "_diffusers_version", "_name_or_path")


def scheduler_config(config=None, shift=None) -> dict:
    """A FlowMatchEulerDiscreteScheduler config (a folder's scheduler_config.json as a dict, or None for the
    class defaults) completed with every default, `shift` replacing the config's when given. Raises
    ValueError for another scheduler class or for settings an Euler ODE sampler cannot follow."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(config or {})
    cls = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"the diffusers sigma grid needs a FlowMatchEulerDiscreteScheduler config, got {cls}")
    if shift is not None:
        config["shift"] = float(shift)
    config = {k: v for k, v in config.items() if k not in _SCHEDULER_META}
    full = dict(FlowMatchEulerDiscreteScheduler.from_config(config).config)
    for key in ("stochastic_sampling", "invert_sigmas"):
        if full.get(key):
            raise ValueError(f"scheduler config has {key}=true: t2i's deterministic Euler sampler cannot follow it")
    return {k: v for k, v in full.items() if not k.startswith("_")}


def diffusers_sigmas(steps, config=None, shift=None, image_seq_len=None):
    """diffusers' inference grid [steps + 1], computed BY diffusers: FlowMatchEulerDiscreteScheduler built
    from `config` (see scheduler_config; `shift` overrides the config's) then .set_timesteps(steps).sigmas.

    For the plain SD3 / SD3.5 config that is shift(linspace(1, σ_min, steps)) followed by 0, where
    σ_min = shift(1/1000) (num_train_timesteps = 1000): the last model evaluation is at a small σ > 0
    and the final Euler step jumps to 0. shift_terminal, karras / exponential / beta spacing are
    applied by diffusers as configured; with use_dynamic_shifting, μ comes from `image_seq_len`
    (latent tokens) exactly as StableDiffusion3Pipeline computes it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config = scheduler_config(config, shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {}
    if config.get("use_dynamic_shifting"):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        if image_seq_len is None:
            raise ValueError("the scheduler uses dynamic shifting: image_seq_len (latent tokens) is needed")
        kwargs["mu"] = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.16))
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return scheduler.sigmas.to(torch.float32).clone()


def inference_sigmas(steps, grid="t2i", shift=1.0, config=None, image_seq_len=None):
    """THE sampling grid [steps + 1] (1 → 0, steps model evaluations) of `grid`:

    t2i:        sampling_sigmas(steps, shift)                        = shift(linspace(1, 0, steps + 1))
    diffusers:  diffusers_sigmas(steps, config, shift, image_seq_len) = scheduler.set_timesteps(steps).sigmas
    `config` (a scheduler_config.json dict) is only read by the diffusers grid; `shift` replaces its shift
    unless None (then the config's shift is used; the t2i grid then uses 1.0).
    """
    if grid == "t2i":
        return sampling_sigmas(steps, 1.0 if shift is None else shift)
    if grid == "diffusers":
        return diffusers_sigmas(steps, config, shift, image_seq_len)
    raise ValueError(f"unknown sigma grid {grid!r}; valid: {list(SIGMA_GRIDS)}")


FULL_INTERVAL = (0.0, 1.0)


def check_interval(interval) -> tuple[float, float]:
    """A guidance interval (σ_lo, σ_hi) with 0 ≤ σ_lo ≤ σ_hi ≤ 1, as floats; ValueError otherwise."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"a guidance interval is two numbers [sigma_lo, sigma_hi], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"a guidance interval needs 0 <= sigma_lo <= sigma_hi <= 1, got [{lo:g}, {hi:g}]")
    return lo, hi


def cfg_velocity(model_fn, cond, uncond, guidance_scale, interval=FULL_INTERVAL):
    """Classifier-free-guided velocity_fn(x, σ) -> v = v_u + s·(v_c − v_u) where σ_lo ≤ σ ≤ σ_hi, else v_c.

    model_fn(x, timestep [B], conditioning dict) -> v; cond / uncond: dicts of tensors with batch dim 0.
    s == 1 (or no sample's σ in the interval) runs one pass with cond; otherwise ONE pass over cat([x, x])
    with conditioning cat([uncond, cond]). `interval` = (σ_lo, σ_hi) limits guidance to a band of noise
    levels (Kynkäänniemi et al. 2024, arXiv 2404.07724: guidance at high σ mostly removes modes; diffusers'
    guiders expose the same as start / stop fractions of the steps); the default (0, 1) guides every step.
    σ is compared in float32 with a 1e-6 tolerance, so a grid point equal to a bound counts as inside.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    lo, hi = check_interval(interval)
    every_step = (lo, hi) == FULL_INTERVAL  # no mask: no device-to-host sync per step on a GPU

    def velocity_fn(x, sigma):
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        t = timestep(s)
        inside = None if every_step else (s >= lo - 1e-6) & (s <= hi + 1e-6)
        if guidance_scale == 1 or (inside is not None and not bool(inside.any())):
            return model_fn(x, t, cond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        v_u, v_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        guided = v_u + guidance_scale * (v_c - v_u)
        if inside is None or bool(inside.all()):
            return guided
        return torch.where(_per_sample(inside, x), guided, v_c)

    return velocity_fn


@torch.no_grad()
def euler_sample(velocity_fn, noise, sigmas, callback=None):
    """Euler from σ = sigmas[0] (1) to sigmas[-1] (0): x ← x + (σ_{i+1} − σ_i)·velocity_fn(x, σ_i [B]).

    callback(i, σ_i, x) sees the state before each step i, then once more (len(sigmas) − 1, σ_last, x_final).
    The state keeps noise's dtype.
    """
    sig = [float(s) for s in sigmas]
    x = noise
    for i in range(len(sig) - 1):
        if callback is not None:
            callback(i, sig[i], x)
        sigma_b = torch.full((x.shape[0],), sig[i], device=x.device, dtype=torch.float32)
        x = (x + (sig[i + 1] - sig[i]) * velocity_fn(x, sigma_b)).to(noise.dtype)
    if callback is not None:
        callback(len(sig) - 1, sig[-1], x)
    return x


def slowed_sigma(x_sigma, x_final, noise):
    """σ̂ per sample [B] = clip(⟨x̂_σ − x̂, ε − x̂⟩ / ‖ε − x̂‖², 0, 1), sums over all non-batch dims in float32.

    The σ of the point nearest to x̂_σ on the chord interpolate(x̂, ε, ·) from the final sample x̂ to its
    noise ε ("Slow Flow": σ̂ ≥ σ means the sampler state is noisier than its step says).
    Where ε = x̂ the chord is a single point and σ̂ = 0.
    """
    d = (noise - x_final).float().flatten(1)
    num = ((x_sigma - x_final).float().flatten(1) * d).sum(1)
    den = d.pow(2).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0).clamp(0, 1)
