"""Auto-γ (t2i/eval/auto_gamma.py, docs/design/flow.md §6.6): a lag planted into real trajectories in
MixFlow's own units is read back as γ = 2λ through the Slow Flow v2 machinery; bands that are not a
stable positive lag derive no γ and say why."""

import pytest
import torch

from t2i import flow
from t2i.eval.auto_gamma import auto_gamma, lags
from t2i.eval.slowflow import positions, reference_grid, step_statistics, summarise, trajectory
from t2i.eval.slowflow_report import auto_gamma_table, write_report


def planted_summaries(lam, counts=(2, 4, 8), shift=1.0, n=64, d=16):
    """{N: summary} of straight-path trajectories (one data point: the exact field, Euler exact) whose
    inner states were moved λ·(1 − σ) toward the noise along the chord, against the exact reference."""
    g = torch.Generator().manual_seed(0)
    target, noise = torch.randn(1, d, generator=g), torch.randn(n, d, generator=g)
    field = lambda x, s: (x - target) / s.view(-1, 1)  # noqa: E731
    grids = {k: flow.sampling_sigmas(k, shift) for k in counts}
    ref = reference_grid(grids.values(), 64, shift)
    out = {}
    for k, grid in grids.items():
        states = trajectory(field, noise, ref, keep=positions(grid, ref))
        planted = states.clone()
        move = (lam(grid) if callable(lam) else lam * torch.ones_like(grid)) * (1 - grid)
        planted[:, 1:-1] += move[1:-1].view(1, -1, 1) * (noise - states[:, -1])[:, None]
        stats = step_statistics(planted, noise, states)
        out[k] = summarise(grid, stats["chord"] - grid[None], stats)
    return out


@pytest.mark.parametrize("lam", [0.05, 0.2])
def test_a_planted_lag_in_mixflows_units_is_read_back_as_gamma_twice_lambda(lam):
    summaries = planted_summaries(lam)
    points = lags(summaries)
    assert len(points) == 1 + 3 + 7                                     # the inner steps of N = 2, 4, 8
    assert all(p["lambda"] == pytest.approx(lam, abs=1e-5) for p in points)
    a = auto_gamma(summaries)
    assert a["stable"] and a["gamma"] == pytest.approx(2 * lam, abs=2e-5) and a["steps"] == [2, 4, 8]
    assert f"{2 * lam:.3f}" in a["reason"]


def test_gamma_is_capped_at_one_and_the_steps_filter_applies():
    assert auto_gamma(planted_summaries(0.7))["gamma"] == 1.0
    rising = planted_summaries(lambda s: 0.1 + 0.1 * (1 - s), counts=(2, 8))   # λ from 0.1 to 0.2
    assert auto_gamma(rising, steps=[2])["gamma"] == pytest.approx(2 * 0.15, abs=1e-4)  # σ = 0.5 only
    assert auto_gamma(rising, steps=[2])["steps"] == [2]


def summary(sigmas, excess):
    return {"sigma": sigmas, "mean_excess": excess}


@pytest.mark.parametrize("excess, reason", [
    ([0.0, -0.03, -0.02, -0.01, 0.0], "no lag: the sampler is ahead"),
    ([0.0, 0.0, 0.0, 0.0, 0.0], "no lag"),
    ([0.0, 0.02, -0.01, 0.01, 0.0], "changes sign"),
    ([0.0, 0.001, 0.02, 0.02, 0.0], "more than 3×"),       # λ = 0.004, 0.04, 0.027
])
def test_a_band_that_is_not_a_stable_positive_lag_derives_no_gamma(excess, reason):
    a = auto_gamma({4: summary([1.0, 0.75, 0.5, 0.25, 0.0], excess)})
    assert a["gamma"] is None and not a["stable"] and reason in a["reason"]


def test_the_band_is_in_units_of_the_distance_to_the_noise():
    # the same excess 0.02 is λ = 0.08 at σ = 0.75 and 0.0267 at σ = 0.25: 3× apart, still a band
    a = auto_gamma({4: summary([1.0, 0.75, 0.5, 0.25, 0.0], [0.0, 0.02, 0.02, 0.02, 0.0])})
    assert a["lambda_max"] == pytest.approx(0.08) and a["lambda_min"] == pytest.approx(0.02 / 0.75)
    assert a["stable"] and a["gamma"] == pytest.approx(2 * (0.08 + 0.04 + 0.02 / 0.75) / 3)
    assert auto_gamma({4: summary([1.0, 0.75, 0.5, 0.25, 0.0], [0.0, 0.02, 0.02, 0.02, 0.0])},
                      max_spread=2.0)["gamma"] is None


def test_summaries_without_a_reference_or_inner_steps_are_refused_or_explained():
    with pytest.raises(ValueError, match="no mean_excess"):
        auto_gamma({"4": {"sigma": [1.0, 0.5, 0.0], "mean_gap": [0, 0.1, 0]}})
    a = auto_gamma({1: summary([1.0, 0.0], [0.0, 0.0])})
    assert a["gamma"] is None and "no inner steps" in a["reason"]


def test_the_slowflow_report_shows_auto_gamma_per_checkpoint_and_cfg(tmp_path):
    results = {"lagging": {str(n): {"3": s} for n, s in planted_summaries(0.1).items()},
               "ahead": {"4": {"1": summary([1.0, 0.75, 0.5, 0.25, 0.0], [0.0, -0.03, -0.02, -0.01, 0.0])}}}
    table = auto_gamma_table(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"lagging, CFG 3", "ahead, CFG 1"}
    assert "| 2, 4, 8 |" in rows["lagging, CFG 3"] and "| 0.20 |" in rows["lagging, CFG 3"]
    assert "| — |" in rows["ahead, CFG 1"] and "no lag" in rows["ahead, CFG 1"]
    lagging = {"lagging": results["lagging"]}
    write_report(lagging, tmp_path)
    assert auto_gamma_table(lagging) in (tmp_path / "slowflow.md").read_text()
    assert auto_gamma_table({"raw": {"4": {"1": {"sigma": [1.0, 0.5, 0.0], "mean_gap": [0, 0, 0]}}}}) == ""
