"""Auto-γ: MixFlow's mixture range coefficient derived from a base model's measured exposure bias
(docs/design/flow.md §6.6).

MixFlow trains the network at label σ on inputs at σ_in = σ + r·γ·(1 − σ), r ~ U(0, 1): an offset toward
the noise that is, in units of the distance to the noise (1 − σ), uniform on [0, γ], with mean γ/2. Slow
Flow v2 measures, per step of an N-step sampler, how far the state is behind the model's own many-step ODE:
the excess σ̂_N − σ̂_ref (t2i.eval.slowflow). In MixFlow's units that lag is

    λ(σ) = excess(σ) / (1 − σ)

If λ is a stable band (positive at every inner step of every step count used, and its largest value at
most `max_spread` times its smallest), MixFlow's mixture is matched to it by its mean:

    γ̂ = min(1, 2 · mean λ)

so that the average training offset γ̂/2·(1 − σ) equals the average lag, and the mixture's support [0, γ̂]
covers the band whenever max λ ≤ 2 · mean λ. Otherwise no γ is derived, and the reason says why: a base
that runs ahead of its own ODE (λ < 0) has no lag for slowing to cover, and a band of mixed sign or wide
spread has no single γ that describes it.

The paper names "γ is model-dependent, no rule" as MixFlow's limitation; this is one rule, beyond it.
Pure Python on the summaries `t2i.eval.slowflow.measure_steps` returns (or slowflow.json holds).
"""

from __future__ import annotations

import math

MAX_SPREAD = 3.0


def lags(summaries: dict, steps=None) -> list[dict]:
    """[{"steps": N, "sigma": σ, "excess": e, "lambda": e / (1 − σ)}] for every inner step (0 < σ < 1) of
    every step count in `steps` (default: all), from {N: summary} (keys int or str) with `mean_excess`."""
    wanted = None if steps is None else {int(n) for n in steps}
    out = []
    for n, summary in sorted(summaries.items(), key=lambda kv: int(kv[0])):
        if wanted is not None and int(n) not in wanted:
            continue
        if "mean_excess" not in summary:
            raise ValueError(f"the {n}-step summary has no mean_excess: measure it with a reference "
                             f"(ref_steps > 0)")
        for sigma, excess in zip(summary["sigma"], summary["mean_excess"]):
            if 0.0 < sigma < 1.0 and excess is not None and math.isfinite(excess):
                out.append({"steps": int(n), "sigma": float(sigma), "excess": float(excess),
                            "lambda": float(excess) / (1.0 - float(sigma))})
    return out


def auto_gamma(summaries: dict, steps=None, max_spread: float = MAX_SPREAD) -> dict:
    """The derived γ, or None with the reason: {"gamma", "stable", "reason", "lambda_min", "lambda_mean",
    "lambda_max", "steps", "lags"} (module docstring for the rule)."""
    points = lags(summaries, steps)
    result = {"gamma": None, "stable": False, "steps": sorted({p["steps"] for p in points}), "lags": points,
              "max_spread": max_spread}
    if not points:
        return {**result, "reason": "no inner steps measured (step counts of at least 2 are needed)"}
    values = [p["lambda"] for p in points]
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    result.update(lambda_min=lo, lambda_mean=mean, lambda_max=hi)
    if hi <= 0:
        reason = (f"no lag: the sampler is ahead of (or on) its own ODE at every inner step "
                  f"(λ from {lo:+.3f} to {hi:+.3f}); slowing has nothing to cover, γ = 0 is standard input")
    elif lo <= 0:
        reason = f"no stable band: λ changes sign across the steps (from {lo:+.3f} to {hi:+.3f})"
    elif hi > max_spread * lo:
        reason = f"no stable band: λ spreads from {lo:.3f} to {hi:.3f}, more than {max_spread:g}×"
    else:
        gamma = min(1.0, 2.0 * mean)
        return {**result, "gamma": gamma, "stable": True,
                "reason": f"stable band λ ∈ [{lo:.3f}, {hi:.3f}], mean {mean:.3f}: γ = min(1, 2 × mean) = "
                          f"{gamma:.3f}"}
    return {**result, "reason": reason}
