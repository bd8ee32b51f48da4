"""Paired comparisons of evaluation outcomes: McNemar's exact test, Wilson intervals, Holm's correction.

Two models scored on the same prompts with the same initial noise give paired outcomes (correct or not
per image). Only the discordant pairs carry information about which model is better: under "no
difference" each is equally likely to favour either model, so the count favouring one is Binomial(b + c,
1/2) (McNemar's exact test; scipy's `binomtest` computes the two-sided p-value). Pairs from several
independent seeds pool by adding their discordant counts: under the null every discordant pair is a fair
coin, whichever seed it came from.
"""

from __future__ import annotations

import math

import numpy as np


def mcnemar(a, b) -> dict:
    """Exact two-sided McNemar test of paired booleans `a` (model A correct) and `b` (model B correct).

    Returns {"n", "a_only", "b_only", "diff" (mean(b) − mean(a)), "p"}."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(b_only, discordant, 0.5).pvalue)
    return {"n": int(a.size), "a_only": a_only, "b_only": b_only,
            "diff": float(b.mean() - a.mean()) if a.size else 0.0, "p": p}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
