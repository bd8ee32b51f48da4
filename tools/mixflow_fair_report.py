"""The fair MixFlow experiment's protocol and analysis (docs/experiments/mixflow-fair.md): its arms, how cells and
evaluation files are named, and how the finished evaluation turns into the results table and the pre-registered
verdicts. `tools/mixflow_fair.py` runs the stages; this module only reads what they wrote."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

ARMS = {"control": ["train.objective=flow_matching"],
        "gamma0": ["train.objective=mixflow", "train.mixflow_gamma=0.0"],
        "mixflow-g0.8": ["train.objective=mixflow", "train.mixflow_gamma=0.8"],
        "mixflow-g0.4": ["train.objective=mixflow", "train.mixflow_gamma=0.4"]}
MIXFLOW_ARMS = ("mixflow-g0.8", "mixflow-g0.4")
FEW_STEPS = (2, 4, 8)          # the cells of the primary test (the paper's claim is about few steps)
AUTO_ARM = "mixflow-auto"      # amendment 4: γ from the base's measured lag (exploratory, outside C1's family)


def arms_of(results: dict) -> dict[str, list[str]]:
    """The arms of this run: ARMS, plus AUTO_ARM where auto-γ derived a γ (results["auto_gamma"])."""
    gamma = results.get("auto_gamma", {}).get("gamma")
    if gamma is None:
        return dict(ARMS)
    return {**ARMS, AUTO_ARM: ["train.objective=mixflow", f"train.mixflow_gamma={round(gamma, 2)}"]}


def cell_name(cell) -> str:
    return f"N{cell[0]}-g{cell[1]:g}"


def job_path(out: Path, label: str, cell) -> Path:
    name = f"slowflow-g{cell[1]:g}.json" if cell[0] == "slowflow" else f"{cell_name(cell)}.npz"
    return out / "eval" / label / name


# ------------------------------------------------------------------------------------------ analysis

def reference_features(out: Path, data: dict, n: int, resolution: int) -> np.ndarray:
    """Features of n held-out images, decoded exactly as training decodes them."""
    import random

    from t2i.data.decode import decode_sample
    from t2i.data.shards import expand_shards, raw_samples
    from t2i.eval.features import RandomConvExtractor, compute_features

    path = out / "eval" / "reference.npy"
    if path.exists():
        return np.load(path)
    images = []
    for raw in raw_samples(expand_shards(data["ref"], key="ref"), counts={}):
        sample, _ = decode_sample(raw, resolution, random.Random(0))
        images.append(((sample["image"].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        if len(images) == n:
            break
    from t2i.eval.shapes_detector import off_palette_fraction

    feats = compute_features(images, RandomConvExtractor())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    (path.parent / "reference_off_palette.json").write_text(json.dumps(
        float(off_palette_fraction(np.stack(images)).mean())))
    return feats


def slowflow_means(out: Path, label: str, cell) -> dict:
    """Mean over the inner steps (0 < σ < 1) of the Slow Flow v2 excess and of σ_est − σ, if measured."""
    path = job_path(out, label, ("slowflow", cell[1]))
    if not path.exists():
        return {}
    summary = json.loads(path.read_text()).get(str(cell[0]))
    out_ = {}
    for key, name in (("mean_excess", "slowflow_excess"), ("sigma_est_gap", "sigma_est_gap")):
        inner = [v for v in (summary or {}).get(key, [None, None])[1:-1] if v is not None]
        if inner:
            out_[name] = float(np.mean(inner))
    return out_


def analyse(out: Path, results: dict, data: dict) -> None:
    from t2i.eval.fid import fid, kid
    from t2i.eval.stats import holm, mcnemar

    plan_path = out / "eval" / "plan.json"
    if not plan_path.exists():
        return
    plan = json.loads(plan_path.read_text())
    ref = reference_features(out, data, plan["images"], plan["resolution"])
    results["reference_off_palette"] = json.loads((out / "eval" / "reference_off_palette.json").read_text())
    table = {}
    for cell in map(tuple, plan["cells"]):
        got = {}
        for label in plan["models"]:
            path = out / "eval" / label / f"{cell_name(cell)}.npz"
            if path.exists():
                with np.load(path) as z:
                    got[label] = {k: z[k] for k in ("correct", "off_palette", "features")}
        row = {}
        for label, r in got.items():
            row[label] = {"accuracy": float(r["correct"].mean()), "off_palette": float(r["off_palette"].mean()),
                          "fid": fid(r["features"], ref), "kid": kid(r["features"], ref),
                          **slowflow_means(out, label, cell)}
        tests = {}
        for arm in arms_of(results):
            for against in ("control", "gamma0"):
                if arm == against or (against == "gamma0" and arm not in (*MIXFLOW_ARMS, AUTO_ARM)):
                    continue
                pairs = [(got.get(f"{against}-s{s}"), got.get(f"{arm}-s{s}")) for s in range(results["seeds"])]
                if any(a is None or b is None for a, b in pairs):
                    continue
                per_seed = [mcnemar(a["correct"], b["correct"]) for a, b in pairs]
                a_only, b_only = sum(m["a_only"] for m in per_seed), sum(m["b_only"] for m in per_seed)
                pooled = mcnemar(np.r_[np.ones(a_only, bool), np.zeros(b_only, bool)],
                                 np.r_[np.zeros(a_only, bool), np.ones(b_only, bool)])
                tests[f"{arm} vs {against}"] = {"diff_per_seed": [m["diff"] for m in per_seed],
                                                "a_only": a_only, "b_only": b_only, "p": pooled["p"]}
        table[cell_name(cell)] = {"models": row, "tests": tests}
    # the primary family: each MixFlow arm vs control at few steps and the trained CFG (Holm over the family)
    family = [(c, t) for c, v in table.items() for t in v["tests"]
              if t.split(" vs ")[1] == "control" and t.split(" vs ")[0] in MIXFLOW_ARMS
              and int(c.split("-")[0][1:]) in FEW_STEPS and float(c.split("-g")[1]) == plan["trained_guidance"]]
    for (c, t), p in zip(family, holm([table[c]["tests"][t]["p"] for c, t in family])):
        table[c]["tests"][t]["p_holm"] = p
    results["cells_table"] = table


def same_sign(test: dict) -> bool:
    """The accuracy difference has one sign in every seed."""
    return all(d > 0 for d in test["diff_per_seed"]) or all(d < 0 for d in test["diff_per_seed"])


def verdicts(results: dict) -> list[str]:
    """The pre-registered criteria (docs/experiments/mixflow-fair.md), applied mechanically."""
    lines = []
    base = results.get("base", {})
    if base:
        lines.append(f"C0 base converged (< {results['converged_tol']:.0%} change over the last 20 % of steps): "
                     f"{'yes' if base['converged'] else 'NO'} ({base['change_last_20pct']:.2%})")
    table = results.get("cells_table", {})
    helped, hurt = [], []
    for cell, v in table.items():
        for name, t in v["tests"].items():
            if "p_holm" not in t or not name.endswith("vs control"):
                continue
            if t["p_holm"] < 0.05 and same_sign(t):
                (helped if t["b_only"] > t["a_only"] else hurt).append(f"{name} at {cell}")
    if table:
        lines.append("C1 MixFlow beats control at few steps (Holm p < 0.05, same sign in every seed): "
                     + (", ".join(helped) if helped else "no"))
        lines.append("C1' MixFlow worse than control there: " + (", ".join(hurt) if hurt else "no"))
        mech = [f"{name} at {cell}" for cell, v in table.items() for name, t in v["tests"].items()
                if name.endswith("vs gamma0") and t["p"] < 0.05 and t["b_only"] > t["a_only"]
                and not name.startswith(AUTO_ARM)]
        lines.append("C2 MixFlow beats the gamma0 arm (unadjusted p < 0.05): " + (", ".join(mech) if mech else "no"))
    auto = results.get("auto_gamma")
    if auto:
        lines.append(f"C4 (exploratory) auto-γ: {auto['reason']}" + ("; no fifth arm" if auto["gamma"] is None else ""))
        if auto["gamma"] is not None and table:
            found = {"beats": [], "loses to": []}
            for cell, v in table.items():
                for name, t in v["tests"].items():
                    if name.startswith(AUTO_ARM) and t["p"] < 0.05 and same_sign(t):
                        side = "beats" if t["b_only"] > t["a_only"] else "loses to"
                        found[side].append(f"{name.split(' vs ')[1]} at {cell}")
            lines.append(f"C4 {AUTO_ARM} (unadjusted p < 0.05, same sign in every seed): "
                         + "; ".join(f"{k} {', '.join(v)}" for k, v in found.items() if v) if any(found.values())
                         else f"C4 {AUTO_ARM}: no difference at p < 0.05 with the same sign in every seed")
    return lines


def report(results: dict) -> str:
    lines = ["# Fair MixFlow experiment: results", "",
             f"Started {results.get('started_at', '?')}; wall time per stage (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in results["time_s"].items()), ""]
    base = results.get("base")
    if base:
        lines += ["## Base: EMA fixed-σ validation loss", "", "| step | val loss |", "|---:|---:|"]
        lines += [f"| {s} | {v:.5f} |" for s, v in sorted((int(k), v) for k, v in base["val_loss_ema"].items())]
        lines.append("")
    table = results.get("cells_table", {})
    if table:
        seeds = results["seeds"]
        lines += ["## Per cell", "",
                  f"Accuracy = fraction of images correct (GenEval rules, exact detector), mean over {seeds} seeds "
                  "± std across seeds; p = McNemar exact, pooled over seeds (Holm-adjusted in brackets for the "
                  "primary family); FID / KID (×1000) against held-out images, random-conv features; off-palette "
                  "= mean fraction of pixels off the palette.", ""]
        for cell, v in table.items():
            lines += [f"### {cell}", "", "| arm | accuracy | FID | KID×1000 | off-palette | Slow Flow excess | "
                      "σ_est − σ | vs control: b/c, p | vs gamma0: b/c, p |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for arm in ["base", *arms_of(results)]:
                rows = [r for label, r in v["models"].items() if label == arm or label.startswith(f"{arm}-s")]
                if not rows:
                    continue
                def ms(key, scale=1.0):  # noqa: E306
                    xs = [r[key] * scale for r in rows if key in r]
                    if not xs:
                        return "–"
                    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")
                cols = []
                for against in ("control", "gamma0"):
                    t = v["tests"].get(f"{arm} vs {against}")
                    cols.append("" if t is None else f"{t['b_only']}/{t['a_only']}, {t['p']:.3g}"
                                + (f" [{t['p_holm']:.3g}]" if "p_holm" in t else ""))
                lines.append(f"| {arm} | {ms('accuracy')} | {ms('fid')} | {ms('kid', 1000)} | {ms('off_palette')} | "
                             f"{ms('slowflow_excess')} | {ms('sigma_est_gap')} | " + " | ".join(cols) + " |")
            lines.append("")
        lines += ["b/c: images only the arm / only the comparison model got right. Slow Flow excess: mean over the "
                  "inner steps of σ̂_N − σ̂_ref (> 0: behind the model's own many-step ODE); σ_est − σ: noise level read "
                  f"off background pixels minus the step's σ. Held-out images' off-palette fraction: "
                  f"{results.get('reference_off_palette', float('nan')):.4f}.", ""]
    auto = results.get("auto_gamma")
    if auto and auto.get("lags"):
        lines += ["## Auto-γ (amendment 4): the base's lag λ = excess / (1 − σ), trained CFG", "",
                  "| N | σ | excess | λ |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['steps']} | {p['sigma']:.3f} | {p['excess']:+.4f} | {p['lambda']:+.4f} |" for p in auto["lags"]]
        lines += ["", f"{auto['reason']}.", ""]
    lines += ["## Verdicts (pre-registered criteria)", ""] + [f"- {v}" for v in verdicts(results)]
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict) -> None:
    from t2i.io import write_json, write_text

    write_json(out / "results.json", results)
    write_text(out / "results.md", report(results))
