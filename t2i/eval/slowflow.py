"""Exposure bias ("Slow Flow", docs/design/flow.md §6): how much noisier the sampler's states are than
their step says, measured three ways per step of an N-step Euler run.

1. The chord statistic σ̂_N(σ) = t2i.flow.slowed_sigma(x̂_σ, x̂, ε): where the state sits on the
   chord of ground-truth interpolations between its own final sample x̂ and its noise ε.
2. Its excess over a reference: the same model, noise, prompts and CFG integrated with many steps,
   whose chord statistic σ̂_ref is read at the same σ's. σ̂ ≠ σ even for an exact ODE (for data
   N(0, s²) it is below σ when s² < 1, §6.1), so only the excess σ̂_N − σ̂_ref is the N-step run
   falling behind (or ahead of) the model's own ODE.
3. In pixel space on the shapes domain, a model-free noise level σ_est read off the spread of the
   background pixels (t2i.eval.background_sigma), for the N-step and the reference states.

The reference grid is the union of every N-step grid, each interval cut into equal substeps in the
shift's warped time u = shift⁻¹(σ) so that no substep exceeds 1/ref_steps in u (`reference_grid`).
Every σ of every N-step grid is a node of it, so the reference's states are read off at exactly
those σ's (no interpolation), and one reference run serves every step count: for the t2i grid with
N ∈ {4, 8, 16, 32} and ref_steps 256 it is the 256-step t2i grid itself.

States are integrated in float32; the model sees them cast to its own dtype. In bf16 the 256 small
reference steps would otherwise lose part of every increment to rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from t2i import flow
from t2i.eval.background_sigma import background_mask, background_sigma
from t2i.eval.sampling import guided_velocity, initial_noise

DEFAULT_REF_STEPS = 256


# ---------------------------------------------------------------- grids


def reference_grid(grids: Iterable[torch.Tensor], ref_steps: int, shift: float = 1.0) -> torch.Tensor:
    """float32 [M + 1], 1 → 0: the union of `grids`' σ's (kept bit-exact), each interval between two
    of them cut into k equal steps in u = shift_{1/s}(σ), k = ⌈Δu · ref_steps⌉ (at least 1)."""
    if ref_steps < 1:
        raise ValueError(f"ref_steps must be >= 1, got {ref_steps}")
    nodes = torch.unique(torch.cat([g.detach().to("cpu", torch.float32).flatten() for g in grids]))
    nodes = nodes.flip(0).tolist()                                       # descending
    out = [nodes[0]]
    for a, b in zip(nodes[:-1], nodes[1:]):
        ua, ub = (float(flow.shift_sigmas(torch.tensor(v, dtype=torch.float64), 1.0 / shift)) for v in (a, b))
        k = max(1, math.ceil((ua - ub) * ref_steps - 1e-4))             # float32 nodes: Δu is off by ~1e-8
        inner = [float(flow.shift_sigmas(torch.tensor(ua + (ub - ua) * j / k, dtype=torch.float64), shift))
                 for j in range(1, k)]
        out += [s for s in inner if b < s < a] + [b]                     # float32 rounding may merge a substep
    grid = torch.tensor(out, dtype=torch.float32)
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("the reference grid is not strictly decreasing")
    return grid


def positions(grid: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """The index in `reference` of every σ of `grid` (exact float32 equality); ValueError if one is missing."""
    where = {v: i for i, v in enumerate(reference.to(torch.float32).tolist())}
    missing = [v for v in grid.to(torch.float32).tolist() if v not in where]
    if missing:
        raise ValueError(f"sigmas {missing[:3]} of the grid are not nodes of the reference grid")
    return [where[v] for v in grid.to(torch.float32).tolist()]


# ---------------------------------------------------------------- trajectories and per-image statistics


@torch.no_grad()
def trajectory(velocity_fn: Callable, noise: torch.Tensor, sigmas: torch.Tensor,
               keep: Optional[list[int]] = None) -> torch.Tensor:
    """Euler from `noise` along `sigmas` in float32; the states at the indices `keep` (all by default),
    stacked as [B, len(keep), ...] float32 on the CPU (index len(sigmas) − 1 is the final sample)."""
    wanted = set(range(len(sigmas))) if keep is None else set(keep)
    states = []
    flow.euler_sample(velocity_fn, noise.float(), sigmas,
                      callback=lambda i, s, x: states.append(x.float().cpu()) if i in wanted else None)
    return torch.stack(states, 1)


def chord_statistics(states: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """σ̂ [B, S] of each state of `states` [B, S, ...] on the chord from its last state (the final
    sample) to `noise` (t2i.flow.slowed_sigma)."""
    noise = noise.float().cpu()
    return torch.stack([flow.slowed_sigma(states[:, j], states[:, -1], noise) for j in range(states.shape[1])], 1)


def step_statistics(states: torch.Tensor, noise: torch.Tensor, ref_states: Optional[torch.Tensor] = None,
                    background: Optional[torch.Tensor] = None, tol: float = 0.5) -> dict:
    """Per image and step ([B, S] float32) of one N-step trajectory `states` [B, S, ...]:

    chord:          σ̂_N, the chord statistic of the N-step states
    chord_ref:      σ̂_ref, the same of `ref_states` (the reference's states at the same σ's, its final last)
    sigma_est:      the background-pixel noise level of the N-step states (needs `background`, pixel
                    space [B, C, H, W]); the background pixels are those of both final samples
    sigma_est_ref:  the same of the reference states
    """
    out = {"chord": chord_statistics(states, noise)}
    if ref_states is not None:
        out["chord_ref"] = chord_statistics(ref_states, noise)
    if background is not None:
        mask = background_mask(states[:, -1], background, tol)
        if ref_states is not None:
            mask &= background_mask(ref_states[:, -1], background, tol)
        noise = noise.float().cpu()
        out["sigma_est"] = torch.stack([background_sigma(states[:, j], mask, noise)
                                        for j in range(states.shape[1])], 1)
        if ref_states is not None:
            out["sigma_est_ref"] = torch.stack([background_sigma(ref_states[:, j], mask, noise)
                                                for j in range(states.shape[1])], 1)
        out["background_fraction"] = mask.float().flatten(1).mean(1)
    return out


@torch.no_grad()
def measure_field(velocity_fn: Callable, noise: torch.Tensor, grids: dict, *, ref_steps: int = DEFAULT_REF_STEPS,
                  shift: float = 1.0, background: Optional[torch.Tensor] = None, tol: float = 0.5) -> dict:
    """For any velocity field: {N: step_statistics of the run on grids[N]} from the same `noise`, with
    one reference run on reference_grid(grids, ref_steps, shift) (none when ref_steps is 0)."""
    ref_states, where = None, None
    if ref_steps:
        ref = reference_grid(grids.values(), ref_steps, shift)
        nodes = sorted({i for g in grids.values() for i in positions(g, ref)})
        ref_states = trajectory(velocity_fn, noise, ref, keep=nodes)
        where = {i: k for k, i in enumerate(nodes)}
    out = {}
    for n, grid in grids.items():
        states = trajectory(velocity_fn, noise, grid)
        at = ref_states[:, [where[i] for i in positions(grid, ref)]] if ref_states is not None else None
        out[n] = step_statistics(states, noise, at, background, tol)
    return out


# ---------------------------------------------------------------- a checkpoint


@torch.no_grad()
def measure_steps(model, text, latent_shape: tuple, prompts: list[str], step_counts: list[int], *, guidance: float,
                  shift: float = 1.0, seed: int = 0, batch_size: int = 32, ref_steps: int = DEFAULT_REF_STEPS,
                  background: Optional[torch.Tensor] = None, tol: float = 0.5) -> dict:
    """{N: summary} for each step count on t2i's grid (image i from noise seed + i, CFG `guidance`),
    all step counts sharing one reference run per batch (see `summarise` for the fields)."""
    param = next(model.parameters())
    grids = {int(n): flow.inference_sigmas(int(n), "t2i", shift) for n in step_counts}
    parts: dict = {n: [] for n in grids}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = initial_noise(start, len(chunk), seed, latent_shape, param.device, torch.float32)
        guided = guided_velocity(model, text, chunk, guidance, param.device, param.dtype)
        velocity_fn = lambda x, s: guided(x.to(param.dtype), s).float()  # noqa: E731
        for n, stats in measure_field(velocity_fn, noise, grids, ref_steps=ref_steps, shift=shift,
                                      background=background, tol=tol).items():
            parts[n].append(stats)
    out = {}
    for n, grid in grids.items():
        stats = {k: torch.cat([p[k] for p in parts[n]]) for k in parts[n][0]}
        out[n] = {**summarise(grid, stats["chord"] - grid[None], stats), "guidance": float(guidance),
                  "shift": float(shift), "ref_steps": int(ref_steps)}
    return out


def measure(model, text, latent_shape: tuple, prompts: list[str], steps: int, *, guidance: float,
            shift: float = 1.0, seed: int = 0, batch_size: int = 32, ref_steps: int = DEFAULT_REF_STEPS,
            background: Optional[torch.Tensor] = None, tol: float = 0.5) -> dict:
    """The summary of one step count (measure_steps for [steps])."""
    return measure_steps(model, text, latent_shape, prompts, [steps], guidance=guidance, shift=shift, seed=seed,
                         batch_size=batch_size, ref_steps=ref_steps, background=background, tol=tol)[int(steps)]


# ---------------------------------------------------------------- summaries


def _nan_to_none(values: list) -> list:
    return [None if (v is None or v != v) else v for v in values]


def _band(prefix: str, values: torch.Tensor) -> dict:
    """Mean and 10/50/90 % quantiles over the images (dim 0), NaN-aware; NaN becomes None (JSON null)."""
    v = values.double()
    q = torch.nanquantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=0)
    names = {"mean_gap": ("mean_gap", "q10", "q50", "q90")}.get(
        prefix, (prefix, f"{prefix}_q10", f"{prefix}_q50", f"{prefix}_q90"))
    return {name: _nan_to_none(t.tolist()) for name, t in zip(names, (v.nanmean(0), q[0], q[1], q[2]))}


def summarise(sigmas: torch.Tensor, gaps: torch.Tensor, stats: Optional[dict] = None) -> dict:
    """Per step, over the images ([n_images, steps + 1] each): σ, the raw gap σ̂_N − σ (`gaps`: mean_gap,
    q10, q50, q90) and, from `stats` (step_statistics' keys) when present:

    ref_gap             mean σ̂_ref − σ: the offset the model's own many-step ODE shows
    mean_excess, excess_q10/q50/q90     σ̂_N − σ̂_ref: the N-step run behind (> 0) its own ODE
    sigma_est_gap, sigma_est_gap_q10/q50/q90   σ_est − σ of the N-step states (model-free, shapes only)
    sigma_est_ref_gap   mean σ_est − σ of the reference states
    n_sigma_est         images with enough background pixels for σ_est
    """
    sigmas = sigmas.double().cpu()
    out = {"sigma": sigmas.tolist(), **_band("mean_gap", gaps), "n_images": int(gaps.shape[0])}
    stats = stats or {}
    if "chord_ref" in stats:
        out["ref_gap"] = (stats["chord_ref"].double() - sigmas).mean(0).tolist()
        out.update(_band("excess", stats["chord"].double() - stats["chord_ref"].double()))
        out["mean_excess"] = out.pop("excess")
    if "sigma_est" in stats:
        est = stats["sigma_est"].double()
        out.update(_band("sigma_est_gap", est - sigmas))
        if "sigma_est_ref" in stats:
            out["sigma_est_ref_gap"] = _nan_to_none((stats["sigma_est_ref"].double() - sigmas).nanmean(0).tolist())
        out["n_sigma_est"] = int((~est.isnan().any(1)).sum())
        out["background_fraction"] = float(stats["background_fraction"].double().mean())
    return out
