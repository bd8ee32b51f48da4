"""The Slow Flow report files: slowflow.json, slowflow.md and slowflow.png (docs/design/flow.md §6.4).

`results[label][steps][guidance]` is a summary of t2i.eval.slowflow (guidance as a string such as "1"
or "4.5"). Reports written before guidance was a level, `results[label][steps]` = summary, are read
too (their rows carry the label alone).
"""

from __future__ import annotations

from pathlib import Path

from t2i.eval.auto_gamma import auto_gamma
from t2i.io import atomic_write, write_json, write_text

# (summary key, what it is, the plot's y label); the order of the summary tables and of the plot's rows
QUANTITIES = [
    ("mean_gap", "raw gap σ̂_N − σ", "σ̂_N − σ  (raw)"),
    ("mean_excess", "excess σ̂_N − σ̂_ref (> 0: behind the model's own many-step ODE)", "σ̂_N − σ̂_ref  (excess)"),
    ("ref_gap", "reference offset σ̂_ref − σ (what the model's own ODE shows)", None),
    ("sigma_est_gap", "model-free σ_est − σ of the N-step states (background pixels)", "σ_est − σ  (background)"),
    ("sigma_est_ref_gap", "model-free σ_est − σ of the reference states", None),
]


def series(results: dict):
    """(label, guidance or None, steps, summary) for every entry, in order; accepts both layouts."""
    for label, by_steps in results.items():
        for steps, entry in by_steps.items():
            if "sigma" in entry:                                             # before guidance was a level
                yield label, None, int(steps), entry
            else:
                for guidance, summary in entry.items():
                    yield label, guidance, int(steps), summary


def row_name(label: str, guidance) -> str:
    return label if guidance is None else f"{label}, CFG {guidance}"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:+.4f}"


def _inner_mean(values):
    inner = [v for v in (values[1:-1] or values) if v is not None]
    return sum(inner) / len(inner) if inner else None


def summary_table(results: dict, key: str = "mean_gap") -> str:
    """One row per checkpoint (and CFG scale), one column per step count: the mean of `key` over the
    inner steps ("—" where the report has no such column)."""
    rows: dict = {}
    for label, guidance, steps, r in series(results):
        rows.setdefault(row_name(label, guidance), {})[steps] = _inner_mean(r[key]) if key in r else None
    counts = sorted({n for cells in rows.values() for n in cells})
    lines = ["| checkpoint | " + " | ".join(f"{n} steps" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    lines += [f"| {name} | " + " | ".join(_fmt(cells.get(n)) for n in counts) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def auto_gamma_table(results: dict) -> str:
    """Auto-γ (t2i.eval.auto_gamma, docs/design/flow.md §6.6) per checkpoint and CFG, over its measured
    step counts; "" when no summary has the excess."""
    groups: dict = {}
    for label, guidance, steps, r in series(results):
        if "mean_excess" in r:
            groups.setdefault(row_name(label, guidance), {})[steps] = r
    if not groups:
        return ""
    lines = ["| checkpoint | step counts | λ = excess / (1 − σ): min, mean, max | auto-γ | why |",
             "|---|---|---:|---:|---|"]
    for name, by_steps in groups.items():
        a = auto_gamma(by_steps)
        band = (f"{a['lambda_min']:+.3f}, {a['lambda_mean']:+.3f}, {a['lambda_max']:+.3f}"
                if "lambda_min" in a else "—")
        gamma = "—" if a["gamma"] is None else f"{a['gamma']:.2f}"
        lines.append(f"| {name} | {', '.join(map(str, a['steps']))} | {band} | {gamma} | {a['reason']} |")
    return "\n".join(lines)


def present(results: dict) -> list[tuple]:
    """The QUANTITIES rows that at least one summary has."""
    have = {k for *_, r in series(results) for k in r}
    return [q for q in QUANTITIES if q[0] in have]


def markdown(results: dict) -> str:
    """Per (checkpoint, CFG, step count) a table with one row per step."""
    cols = [("σ̂−σ", "mean_gap"), ("q10", "q10"), ("q50", "q50"), ("q90", "q90"), ("σ̂_ref−σ", "ref_gap"),
            ("excess", "mean_excess"), ("excess q10", "excess_q10"), ("excess q90", "excess_q90"),
            ("σ_est−σ", "sigma_est_gap"), ("σ_est,ref−σ", "sigma_est_ref_gap")]
    lines = []
    for label, guidance, steps, r in series(results):
        shown = [(name, key) for name, key in cols if key in r]
        ref = f", reference {r['ref_steps']} steps or finer" if r.get("ref_steps") else ""
        est = (f", σ_est from {r['n_sigma_est']} images ({100 * r['background_fraction']:.0f} % background pixels)"
               if "n_sigma_est" in r else "")
        lines += [f"**{row_name(label, guidance)}**, {steps} steps ({r['n_images']} images{ref}{est})", "",
                  "| step | σ | " + " | ".join(name for name, _ in shown) + " |",
                  "|---:|---:|" + "---:|" * len(shown)]
        for i, s in enumerate(r["sigma"]):
            lines.append(f"| {i} | {s:.3f} | " + " | ".join(_fmt(r[key][i]) for _, key in shown) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """One column per step count. Top: σ on x, the N-step σ̂ (10-90 % band and mean) and, dashed, the
    reference's σ̂, against the diagonal (Figure-1 style). Below, each present gap against σ: raw,
    excess, σ_est − σ (dashed: the reference's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    entries = list(series(results))
    counts = sorted({n for _, _, n, _ in entries})
    rows = [q for q in present(results) if q[2] is not None]
    fig, axes = plt.subplots(1 + len(rows), len(counts), figsize=(3.6 * len(counts), 3.2 * (1 + len(rows))),
                             dpi=100, squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(row_name(label, g) for label, g, _, _ in entries))
    color = {name: colors[i % len(colors)] for i, name in enumerate(names)}
    for col, n in enumerate(counts):
        top = axes[0][col]
        top.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="σ̂ = σ")
        for label, guidance, steps, r in entries:
            if steps != n:
                continue
            c, name = color[row_name(label, guidance)], row_name(label, guidance)
            s = torch.tensor(r["sigma"])
            t = lambda key: torch.tensor([float("nan") if v is None else v for v in r[key]])  # noqa: E731
            top.fill_between(s, s + t("q10"), s + t("q90"), color=c, alpha=0.2)
            top.plot(s, s + t("mean_gap"), color=c, lw=1.5, marker=".", label=name)
            if "ref_gap" in r:
                top.plot(s, s + t("ref_gap"), color=c, lw=1, ls="--")
            for row, (key, _, _) in enumerate(rows, start=1):
                ax = axes[row][col]
                if key not in r:
                    continue
                band = {"mean_gap": ("q10", "q90")}.get(key, (f"{key.replace('mean_', '')}_q10",
                                                              f"{key.replace('mean_', '')}_q90"))
                if all(b in r for b in band):
                    ax.fill_between(s, t(band[0]), t(band[1]), color=c, alpha=0.2)
                ax.plot(s, t(key), color=c, lw=1.5, marker=".")
                ref_key = {"mean_gap": "ref_gap", "sigma_est_gap": "sigma_est_ref_gap"}.get(key)
                if ref_key in r:
                    ax.plot(s, t(ref_key), color=c, lw=1, ls="--")
        top.set_title(f"{n} Euler steps")
        top.set_ylim(0, 1)
        for row, (_, _, ylabel) in enumerate(rows, start=1):
            axes[row][col].axhline(0, color="black", lw=0.8, ls="--")
            if col == 0:
                axes[row][col].set_ylabel(ylabel)
        axes[-1][col].set_xlabel("sampling σ (1 = noise)")
        axes[-1][col].set_xlim(1, 0)
        for row in range(1 + len(rows)):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("σ̂ (dashed: many-step reference)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    try:  # atomically; the format is given, as the temp name's suffix is not .png
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def report_text(results: dict) -> str:
    """slowflow.md: the summary tables (means over the inner steps), then the per-step tables."""
    parts = ["Slow Flow (docs/design/flow.md §6). Positive values: noisier than the step's σ. The excess "
             "σ̂_N − σ̂_ref and σ_est are the numbers to compare between checkpoints at equal CFG, shift and "
             "step count; the raw gap also holds the offset an exact ODE shows (σ̂_ref − σ).", ""]
    for key, what, _ in present(results):
        parts += [f"Mean {what}, over the inner steps:", "", summary_table(results, key), ""]
    table = auto_gamma_table(results)
    if table:
        parts += ["MixFlow's γ matched to the measured lag (docs/design/flow.md §6.6), over each row's step counts:",
                  "", table, ""]
    return "\n".join(parts) + "\n" + markdown(results)


def write_report(results: dict, out: Path) -> dict:
    """slowflow.json, slowflow.md and slowflow.png in `out`, each written atomically (t2i.io)."""
    out = Path(out)
    write_json(out / "slowflow.json", results, indent=1)
    write_text(out / "slowflow.md", report_text(results))
    return {"json": out / "slowflow.json", "md": out / "slowflow.md", "png": plot(results, out / "slowflow.png")}
