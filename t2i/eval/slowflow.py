"""Exposure bias ("Slow Flow", docs/design/flow.md): how much noisier the sampler's states are than their step says.

For a trajectory from noise ε to the final sample x̂, the state x̂_σ at step σ is compared with the
ground-truth interpolations on the chord from x̂ to ε; the nearest one sits at
σ̂ = t2i.flow.slowed_sigma(x̂_σ, x̂, ε). Slow Flow means σ̂ > σ, growing late in sampling and with
fewer steps; MixFlow post-training should pull σ̂ toward σ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from t2i import flow
from t2i.eval.sampling import initial_noise, sample_batch
from t2i.io import atomic_write, write_json, write_text


@torch.no_grad()
def measure(model, text, latent_shape: tuple, prompts: list[str], steps: int, *, guidance: float,
            shift: float = 1.0, seed: int = 0, batch_size: int = 32) -> dict:
    """σ̂ − σ at every step of `steps`-step Euler sampling, per image, summarised per step."""
    param = next(model.parameters())
    sigmas = flow.inference_sigmas(steps, "t2i", shift)
    gaps = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = initial_noise(start, len(chunk), seed, latent_shape, param.device, param.dtype)
        states = []
        sample_batch(model, text, chunk, noise, sigmas, guidance, callback=lambda i, s, x: states.append(x.clone()))
        final = states[-1]
        sigma_hat = torch.stack([flow.slowed_sigma(x, final, noise) for x in states], dim=1)  # [B, steps+1]
        gaps.append(sigma_hat.float().cpu() - sigmas[None])
    return summarise(sigmas, torch.cat(gaps))


def summarise(sigmas: torch.Tensor, gaps: torch.Tensor) -> dict:
    """Per step: σ, mean of σ̂ − σ and its 10/50/90% quantiles over the images ([n_images, steps+1])."""
    q = torch.quantile(gaps.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=0)
    return {"sigma": sigmas.tolist(), "mean_gap": gaps.double().mean(0).tolist(), "q10": q[0].tolist(),
            "q50": q[1].tolist(), "q90": q[2].tolist(), "n_images": gaps.shape[0]}


def markdown(results: dict) -> str:
    """results[label][steps] -> one table per (label, steps): σ, mean σ̂ − σ, quantiles."""
    lines = []
    for label, by_steps in results.items():
        for steps, r in by_steps.items():
            lines += [f"**{label}**, {steps} steps ({r['n_images']} images)", "",
                      "| step | σ | mean σ̂−σ | q10 | q50 | q90 |", "|---:|---:|---:|---:|---:|---:|"]
            for i, s in enumerate(r["sigma"]):
                lines.append(f"| {i} | {s:.3f} | {r['mean_gap'][i]:+.4f} | {r['q10'][i]:+.4f} | "
                             f"{r['q50'][i]:+.4f} | {r['q90'][i]:+.4f} |")
            lines.append("")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """One row per checkpoint, one column per step count: mean of σ̂ − σ over the inner steps."""
    counts = sorted({int(s) for r in results.values() for s in r})
    lines = ["| checkpoint | " + " | ".join(f"{n} steps" for n in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for label, by_steps in results.items():
        cells = []
        for n in counts:
            r = by_steps.get(n) or by_steps.get(str(n))
            inner = r["mean_gap"][1:-1] or r["mean_gap"]
            cells.append(f"{sum(inner) / len(inner):+.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Figure-1 style (top: σ on x, the σ̂ 10-90% band and mean on y, the diagonal) and, since the
    gap is small next to [0, 1], the gap σ̂ − σ itself (bottom); one column per step count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({int(s) for r in results.values() for s in r})
    fig, axes = plt.subplots(2, len(counts), figsize=(3.6 * len(counts), 6.4), dpi=100, squeeze=False,
                             sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, n in enumerate(counts):
        top, bottom = axes[0][col], axes[1][col]
        top.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="σ̂ = σ")
        bottom.axhline(0, color="black", lw=0.8, ls="--")
        for c, (label, by_steps) in zip(colors, results.items()):
            r = by_steps.get(n) or by_steps.get(str(n))
            s, mean = torch.tensor(r["sigma"]), torch.tensor(r["mean_gap"])
            q10, q90 = torch.tensor(r["q10"]), torch.tensor(r["q90"])
            top.fill_between(s, s + q10, s + q90, color=c, alpha=0.2)
            top.plot(s, s + mean, color=c, lw=1.5, marker=".", label=label)
            bottom.fill_between(s, q10, q90, color=c, alpha=0.2)
            bottom.plot(s, mean, color=c, lw=1.5, marker=".", label=label)
        top.set_title(f"{n} Euler steps")
        top.set_ylim(0, 1)
        bottom.set_xlabel("sampling σ (1 = noise)")
        bottom.set_xlim(1, 0)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("σ̂ (nearest ground-truth interpolation)")
    axes[1][0].set_ylabel("σ̂ − σ  (> 0: slower than its step)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    try:  # atomically; the format is given, as the temp name's suffix is not .png
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def write_report(results: dict, out: Path) -> dict:
    """slowflow.json, slowflow.md and slowflow.png in `out`, each written atomically (t2i.io)."""
    out = Path(out)
    write_json(out / "slowflow.json", results, indent=1)
    write_text(out / "slowflow.md", "Mean σ̂ − σ over the inner steps:\n\n" + summary_table(results) + "\n\n"
               + markdown(results))
    return {"json": out / "slowflow.json", "md": out / "slowflow.md", "png": plot(results, out / "slowflow.png")}
