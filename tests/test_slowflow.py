"""Slow Flow (exposure bias), checked against closed forms:

- straight paths (one data point): an exact field has no gap, no excess and σ_est = σ at any step count;
- a single Gaussian N(0, s²): the exact ODE's chord statistic is (c(σ) − s)/(1 − s), c = √((1−σ)²s² + σ²),
  below σ for s < 1 and above it for s > 1 (why the raw gap needs a reference);
- a Gaussian mixture with its exact velocity: the reference converges, and the exact field's excess
  is Euler's discretisation drift, not zero at small N, shrinking like 1/N;
- planted lags: a sluggish field's gap, reference offset and excess equal their closed forms (its lag is
  in its own ODE, so the reference carries it, not the excess); a field that believes its input is δ
  noisier leaves noise σ_est = (σ + δ)/(1 + δ), from which δ is recovered, while the chord cannot see it;
  states moved δ along the chord give excess δ.
"""

import json

import numpy as np
import pytest
import torch

from t2i import flow
from t2i.eval.background_sigma import background_mask, background_sigma, shapes_background
from t2i.eval.slowflow import (measure, measure_field, measure_steps, positions, reference_grid, step_statistics,
                               summarise, trajectory)
from t2i.eval.slowflow_report import markdown, summary_table, write_report

STEP_COUNTS = (2, 4, 8, 16, 32)
BG = torch.tensor([215.0, 215.0, 215.0]) / 127.5 - 1      # the shapes background, in pixel space
PALETTE = [(220, 30, 30), (30, 160, 60), (30, 80, 220), (240, 210, 20), (140, 50, 180), (245, 130, 20)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def t2i_grids(shift=1.0, counts=STEP_COUNTS):
    return {n: flow.sampling_sigmas(n, shift) for n in counts}


def shapes_images(n, size=32, seed=0):
    """[n, 3, size, size]: the flat shapes background with two palette squares each (built here, by hand)."""
    g = np.random.default_rng(seed)
    x = BG.view(1, 3, 1, 1).repeat(n, 1, size, size).clone()
    for i in range(n):
        for k, (y0, x0) in enumerate([(4, 4), (18, 16)]):
            side = int(g.integers(6, 10))
            c = torch.tensor(PALETTE[int(g.integers(len(PALETTE)))], dtype=torch.float32) / 127.5 - 1
            x[i, :, y0:y0 + side, x0:x0 + side] = c.view(3, 1, 1)
    return x


def point_field(target, speed=1.0, lag=0.0):
    """v = speed·(x − x*)/(σ + lag): the exact velocity towards x* (speed 1, lag 0); speed < 1 is sluggish;
    lag δ is a model that believes its input is at σ + δ."""
    return lambda x, s: speed * (x - target) / (s.view(-1, *[1] * (x.dim() - 1)) + lag)


def gaussian_field(s):
    """Exact velocity of data N(0, s²·I): E[x0 | x_σ] = (1−σ)s²/((1−σ)²s² + σ²)·x_σ, v = (x − E[x0|x])/σ."""
    def v(x, sigma):
        sig = sigma.view(-1, *[1] * (x.dim() - 1)).double()
        gain = (1 - sig) * s ** 2 / ((1 - sig) ** 2 * s ** 2 + sig ** 2)
        return ((x.double() - gain * x.double()) / sig).to(x.dtype)
    return v


def gmm_field(means, s2, weights):
    """Exact velocity of the mixture Σ_k w_k·N(μ_k, s2_k·I): x_σ | k ~ N((1−σ)μ_k, ((1−σ)²s2_k + σ²)·I), so
    E[x0 | x_σ] = Σ_k p(k | x_σ)·(μ_k + (1−σ)s2_k/((1−σ)²s2_k + σ²)·(x_σ − (1−σ)μ_k)), v = (x − E[x0|x])/σ."""
    means, s2, logw = means.double(), s2.double(), weights.double().log()

    def v(x, sigma):
        xd, s = x.double().flatten(1), sigma.double().view(-1, 1)
        var = (1 - s) ** 2 * s2[None] + s ** 2                           # [B, K]
        mu = (1 - s)[:, :, None] * means[None]                           # [B, K, D]
        logp = logw[None] - 0.5 * ((xd[:, None] - mu) ** 2).sum(-1) / var - 0.5 * xd.shape[1] * var.log()
        w = torch.softmax(logp, -1)
        ex0 = (w[..., None] * (means[None] + ((1 - s) * s2[None] / var)[..., None] * (xd[:, None] - mu))).sum(1)
        return ((xd - ex0) / s).view(x.shape).to(x.dtype)
    return v


def gmm(seed=0, k=4, d=8):
    means = torch.randn(k, d, generator=gen(seed))
    return gmm_field(means, torch.full((k,), 0.05), torch.full((k,), 1 / k))


def hand_euler_chord(v, noise, sigmas):
    """Euler and the chord statistic, written out independently of t2i.flow: σ̂_i of every state."""
    xs, x = [noise.double()], noise.double()
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (b - a) * v(x.float(), torch.full((len(x),), a)).double()
        xs.append(x)
    d = (noise.double() - x).flatten(1)
    return torch.stack([(((s - x).flatten(1) * d).sum(1) / (d * d).sum(1)).clamp(0, 1) for s in xs], 1)


# ---------------------------------------------------------------- the reference grid


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_reference_of_nested_t2i_grids_is_the_fine_t2i_grid_and_holds_every_sigma_exactly(shift):
    grids = t2i_grids(shift, (4, 8, 16, 32))
    ref = reference_grid(grids.values(), 256, shift)
    torch.testing.assert_close(ref, flow.sampling_sigmas(256, shift), atol=1e-6, rtol=0)
    for g in grids.values():
        assert torch.equal(ref[positions(g, ref)], g)                    # bit-exact nodes: no interpolation


def test_the_reference_refines_any_grid_to_at_most_one_over_ref_steps_in_shift_time():
    grids = {3: flow.sampling_sigmas(3, 3.0), 4: flow.sampling_sigmas(4, 3.0),
             "diffusers-like": torch.tensor([1.0, 0.857692, 0.602151, 0.008929, 0.0])}
    ref = reference_grid(grids.values(), 100, 3.0)
    u = flow.shift_sigmas(ref.double(), 1 / 3.0)
    assert bool((ref[1:] < ref[:-1]).all()) and ref[0] == 1 and ref[-1] == 0
    assert float((u[:-1] - u[1:]).max()) <= 1 / 100 + 1e-6 and 100 <= len(ref) - 1 <= 100 + 7
    for g in grids.values():
        assert torch.equal(ref[positions(g, ref)], g)
    with pytest.raises(ValueError, match="not nodes"):
        positions(torch.tensor([1.0, 0.123, 0.0]), ref)


# ---------------------------------------------------------------- (a) exact fields


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_straight_paths_have_no_gap_no_excess_and_sigma_est_equals_sigma_at_any_step_count(shift):
    target = shapes_images(4)
    noise = torch.randn(target.shape, generator=gen(1))
    grids = t2i_grids(shift)
    out = measure_field(point_field(target), noise, grids, ref_steps=64, shift=shift, background=BG)
    for n, grid in grids.items():
        st = out[n]
        assert (st["chord"] - grid).abs().max() < 1e-5 and (st["chord_ref"] - grid).abs().max() < 1e-5
        assert (st["sigma_est"] - grid).abs().max() < 1e-4 and (st["sigma_est_ref"] - grid).abs().max() < 1e-4


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_the_exact_odes_chord_statistic_of_a_gaussian_is_offset_from_sigma_as_the_closed_form_says(s):
    noise = torch.randn(64, 16, generator=gen(2))
    grids = t2i_grids(1.0, (4, 8))
    sigma = grids[8].double()
    c = ((1 - sigma) ** 2 * s ** 2 + sigma ** 2).sqrt()                  # the exact ODE: x_σ = c(σ)·ε
    expected = ((c - s) / (1 - s)).clamp(0, 1)
    # the reference's own discretisation error, first order: 0.0040 at 256 steps, 0.0010 at 1024
    for ref_steps, tol in ((256, 5e-3), (1024, 1.5e-3)):
        ref = measure_field(gaussian_field(s), noise, grids, ref_steps=ref_steps)[8]["chord_ref"].double()
        assert (ref - expected).abs().max() < tol
    inner = slice(1, -1)
    if s < 1:
        assert bool((ref[:, inner] < sigma[inner] - 0.1).all())         # σ̂ < σ for data variance < 1
    else:
        assert bool((ref[:, inner] > sigma[inner] + 0.1).all())         # and > σ above 1


def test_a_mixtures_exact_field_has_euler_drift_as_excess_shrinking_like_one_over_n():
    """Zero excess at every N holds only for straight paths (above). For a mixture Euler's own
    discretisation moves the N-step states off the exact ODE, so the exact field's excess is that drift:
    measured max over steps of the mean excess ≈ 0.005, 0.054, 0.027, 0.013, 0.006 for N = 2 … 32."""
    v, noise = gmm(), torch.randn(256, 8, generator=gen(1))
    grids = t2i_grids()
    out = measure_field(v, noise, grids, ref_steps=256)
    fine = measure_field(v, noise, grids, ref_steps=4096)
    drift = {}
    for n, grid in grids.items():
        st = out[n]
        # the reference has converged: 256 vs 4096 steps, mean over the images (a few images near a
        # decision boundary between components may still change component)
        assert (st["chord_ref"] - fine[n]["chord_ref"]).abs().mean(0).max() < 0.005
        torch.testing.assert_close(st["chord"].double(), hand_euler_chord(v, noise, grid), atol=2e-5, rtol=0)
        drift[n] = float((st["chord"] - st["chord_ref"]).mean(0).abs().max())
    assert drift[4] > 0.03                                             # real, not zero: do not fake it
    assert all(drift[n] * n < 0.3 for n in grids)
    assert all(1.6 < drift[n] / drift[2 * n] < 2.4 for n in (4, 8, 16))  # first order: halves with 2N


# ---------------------------------------------------------------- (b) planted lags


def sluggish_chord(sigmas, kappa):
    """Chord statistic of Euler on v = κ(x − x*)/σ, by hand: x_i − x* = P_i·(ε − x*) with
    P_i = Π_{j<i}(1 − κ(1 − σ_{j+1}/σ_j)), so σ̂_i = (P_i − P_N)/(1 − P_N) for every image."""
    s = sigmas.double().tolist()
    p = [1.0]
    for a, b in zip(s[:-1], s[1:]):
        p.append(p[-1] * (1 - kappa * (1 - b / a)))
    p = torch.tensor(p, dtype=torch.float64)
    return (p - p[-1]) / (1 - p[-1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_sluggish_fields_excess_is_its_closed_form(shift):
    kappa, target = 0.8, shapes_images(3)
    noise = torch.randn(target.shape, generator=gen(4))
    grids = t2i_grids(shift)
    out = measure_field(point_field(target, speed=kappa), noise, grids, ref_steps=256, shift=shift)
    ref = reference_grid(grids.values(), 256, shift)
    for n, grid in grids.items():
        expected = sluggish_chord(grid, kappa)
        expected_ref = sluggish_chord(ref, kappa)[positions(grid, ref)]
        st = out[n]
        assert (st["chord"].double() - expected).abs().max() < 1e-5
        assert (st["chord_ref"].double() - expected_ref).abs().max() < 1e-5
        excess = (st["chord"] - st["chord_ref"]).mean(0)
        assert (excess.double() - (expected - expected_ref)).abs().max() < 1e-5
        # The lag is the field's own: its ODE is behind (σ̂_ref ≈ σ^κ > σ), and coarse Euler steps, which
        # take the velocity at the start of each step, partly catch up (excess < 0 at N = 4, 8).
        assert bool((st["chord_ref"][:, 1:-1] > grid[1:-1]).all())
        if n in (4, 8):
            assert bool((excess[1:-1] < 0).all())


@pytest.mark.parametrize("delta", [0.1, 0.25])
def test_sigma_est_recovers_a_field_that_believes_its_input_is_delta_noisier(delta):
    """v = (x − x*)/(σ + δ) telescopes under Euler to x_σ − x* = (σ + δ)/(1 + δ)·(ε − x*) at ANY grid: the
    state is noisier than σ, and noise δ/(1 + δ) is left at the end. The background pixels show it:
    σ_est = (σ + δ)/(1 + δ), so δ = (σ_est − σ)/(1 − σ_est). The chord statistic is blind to it (the final
    sample keeps noise in the same proportion), so the raw gap and the excess stay 0."""
    target = shapes_images(4, seed=1)
    noise = torch.randn(target.shape, generator=gen(5))
    grids = t2i_grids()
    out = measure_field(point_field(target, lag=delta), noise, grids, ref_steps=64, background=BG)
    for n, grid in grids.items():
        st = out[n]
        assert float(st["background_fraction"].min()) > 0.3
        assert (st["sigma_est"] - (grid + delta) / (1 + delta)).abs().max() < 1e-4
        after = st["sigma_est"][:, 1:].double()                         # at σ = 1 the state is ε: no δ to see
        recovered = (after - grid[1:]) / (1 - after)
        assert (recovered - delta).abs().max() < 1e-2
        assert (st["chord"] - grid).abs().max() < 1e-4 and (st["chord"] - st["chord_ref"]).abs().max() < 1e-4


def test_the_excess_reads_the_reference_at_the_same_sigmas_and_recovers_a_planted_shift():
    """The N-step 'run' is the reference's own states at the N-step σ's (excess 0), then those states
    moved δ toward the noise along the chord (excess δ): checks that the reference is read at the right σ."""
    v, noise, delta = gmm(seed=3), torch.randn(128, 8, generator=gen(6)), 0.05
    grid = flow.sampling_sigmas(8, 3.0)
    ref = reference_grid([grid], 256, 3.0)
    states = trajectory(v, noise, ref, keep=positions(grid, ref))
    same = step_statistics(states, noise, states)
    assert torch.equal(same["chord"], same["chord_ref"])
    planted = states.clone()
    planted[:, 1:-1] += delta * (noise - states[:, -1])[:, None]
    st = step_statistics(planted, noise, states)
    excess = st["chord"] - st["chord_ref"]
    unclipped = (st["chord_ref"][:, 1:-1] + delta < 1) & (st["chord_ref"][:, 1:-1] > 0)
    assert (excess[:, 1:-1][unclipped] - delta).abs().max() < 1e-5 and excess[:, [0, -1]].abs().max() == 0


# ---------------------------------------------------------------- the background-pixel estimator


def test_background_sigma_of_exact_interpolations_of_shapes_is_sigma():
    x = shapes_images(8, seed=2)
    noise = torch.randn(x.shape, generator=gen(7))
    mask = background_mask(x, shapes_background())
    assert torch.equal(shapes_background(), BG)
    shape_pixels = ((x - BG.view(1, 3, 1, 1)).abs().sum(1) > 0)
    assert not (mask & shape_pixels).any() and float(mask.float().mean()) > 0.5
    near_shape = torch.nn.functional.max_pool2d(shape_pixels[:, None].float(), 3, 1, 1)[:, 0] > 0
    assert not (mask & near_shape).any()                                # eroded: no pixel next to a shape
    for sigma in (0.0, 0.05, 0.3, 0.7, 1.0):
        xs = (1 - sigma) * x + sigma * noise
        plain = background_sigma(xs, mask)
        values = 3 * mask.flatten(1).sum(1).double()
        assert ((plain - sigma).abs() <= 5 * sigma / (2 * values).sqrt() + 1e-6).all()    # ε's sampling error
        assert (background_sigma(xs, mask, noise) - sigma).abs().max() < 1e-5          # normalised: exact
    # a final sample that still carries noise (and so is darker) keeps most of its background
    noisy = 0.8 * x + 0.2 * noise
    m2 = background_mask(noisy, BG)
    assert not (m2 & shape_pixels).any() and float(m2.float().mean()) > 0.3
    few = torch.zeros_like(mask)
    few[:, 0, :5] = True
    assert background_sigma(x, few).isnan().all()                      # too few pixels: no estimate


# ---------------------------------------------------------------- a model through the real sampler


class Oracle(torch.nn.Module):
    """The exact velocity towards one data point x*: v = (x − x*) / σ, scaled by `speed`."""

    def __init__(self, target: torch.Tensor, speed: float = 1.0):
        super().__init__()
        self.target, self.speed = target, speed
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, timestep, **kw):
        sigma = (timestep / 1000).view(-1, 1, 1, 1).clamp_min(1e-6)
        return (self.speed * (hidden_states - self.target) / sigma,)


class NoText:
    def encode(self, prompts):
        return torch.zeros(len(prompts), 2, 4), torch.zeros(len(prompts), 4)

    def encode_empty(self, n):
        return self.encode([""] * n)


def test_exact_velocity_has_no_exposure_bias():
    target = shapes_images(1)[0]
    r = measure(Oracle(target), NoText(), (3, 32, 32), ["p"] * 6, 8, guidance=1.0, ref_steps=64, background=BG)
    assert r["sigma"] == pytest.approx([1 - i / 8 for i in range(9)])
    assert max(map(abs, r["mean_gap"])) < 1e-5 and max(map(abs, r["q90"])) < 1e-5
    assert max(map(abs, r["mean_excess"])) < 1e-5 and max(map(abs, r["ref_gap"])) < 1e-5
    assert max(map(abs, r["sigma_est_gap"])) < 1e-4 and r["n_sigma_est"] == 6
    assert (r["guidance"], r["ref_steps"], r["n_images"]) == (1.0, 64, 6)


def test_a_sluggish_sampler_is_slower_than_its_steps():
    r = measure(Oracle(torch.full((3, 4, 4), 0.3), speed=0.8), NoText(), (3, 4, 4), ["p"] * 6, 4, guidance=1.0)
    gaps = r["mean_gap"]
    assert gaps[0] == pytest.approx(0.0, abs=1e-6) and gaps[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(g > 0.01 for g in gaps[1:-1])           # noisier than the step says: Slow Flow
    assert all(g > 0.03 for g in r["ref_gap"][1:-1])   # ... as its own many-step ODE is: the lag is the field's
    assert all(e < 0 for e in r["mean_excess"][1:-1]) and "sigma_est_gap" not in r


def test_guidance_reaches_the_reference_too():
    """CFG s applied to v_c = exact and v_u = 0 is s·v: a sluggish (s < 1) field in both runs."""
    class Conditional(Oracle):
        def forward(self, hidden_states, timestep, encoder_hidden_states, **kw):
            v = super().forward(hidden_states, timestep)[0]
            return (v * encoder_hidden_states.flatten(1)[:, :1].view(-1, 1, 1, 1),)

    class Text(NoText):
        def encode(self, prompts):
            context = torch.tensor([0.0 if p == "" else 1.0 for p in prompts]).view(-1, 1, 1)
            return context, torch.zeros(len(prompts), 4)

    target = torch.full((3, 4, 4), 0.3)
    by_steps = measure_steps(Conditional(target), Text(), (3, 4, 4), ["p"] * 3, [4, 8], guidance=0.8, ref_steps=256)
    ref = reference_grid(t2i_grids(1.0, (4, 8)).values(), 256)
    for n, r in by_steps.items():
        grid = flow.sampling_sigmas(n)
        expected = sluggish_chord(grid, 0.8) - sluggish_chord(ref, 0.8)[positions(grid, ref)]
        assert r["mean_excess"] == pytest.approx(expected.tolist(), abs=1e-5)


# ---------------------------------------------------------------- summaries and report files


def test_summary_quantiles_match_numpy(tmp_path):
    gaps = torch.randn(50, 5, generator=gen(0))
    ref = torch.rand(50, 5, generator=gen(1))
    est = torch.rand(50, 5, generator=gen(2))
    est[3, 2] = float("nan")                                            # an image without background
    sigma = torch.linspace(1, 0, 5)
    stats = {"chord": gaps + sigma, "chord_ref": ref, "sigma_est": est, "sigma_est_ref": est,
             "background_fraction": torch.full((50,), 0.5)}
    r = summarise(sigma, gaps, stats)
    assert r["q10"] == pytest.approx(np.quantile(gaps.numpy(), 0.1, axis=0).tolist(), abs=1e-6)
    assert r["mean_gap"] == pytest.approx(gaps.mean(0).tolist(), abs=1e-6) and r["n_images"] == 50
    excess = (gaps + sigma - ref).numpy()
    assert r["mean_excess"] == pytest.approx(excess.mean(0).tolist(), abs=1e-6)
    assert r["excess_q90"] == pytest.approx(np.quantile(excess, 0.9, axis=0).tolist(), abs=1e-6)
    assert r["ref_gap"] == pytest.approx((ref - sigma).mean(0).tolist(), abs=1e-6)
    assert r["sigma_est_gap"] == pytest.approx(np.nanmean((est - sigma).numpy(), 0).tolist(), abs=1e-6)
    assert r["n_sigma_est"] == 49
    results = {"a": {4: {"1": r, "3": r}}, "b": {4: {"3": r}}}
    assert "| a, CFG 1 | " in summary_table(results) and "| b, CFG 3 | " in summary_table(results, "mean_excess")
    assert "| 4 | 0.000 |" in markdown(results)
    files = write_report(results, tmp_path)
    report = json.loads(files["json"].read_text())
    assert report["a"]["4"]["3"]["n_images"] == 50 and files["png"].stat().st_size > 0
    text = files["md"].read_text()
    assert "excess σ̂_N − σ̂_ref" in text and "σ_est − σ" in text and "—" not in summary_table(results, "mean_excess")


def test_reports_written_before_guidance_was_a_level_still_render(tmp_path):
    legacy = {"a": {2: {"sigma": [1.0, 0.5, 0.0], "mean_gap": [0.0, 0.1, 0.0], "q10": [0.0, 0.05, 0.0],
                        "q50": [0.0, 0.1, 0.0], "q90": [0.0, 0.2, 0.0], "n_images": 4}}}
    assert "| a | +0.1000 |" in summary_table(legacy) and "| a | — |" in summary_table(legacy, "mean_excess")
    assert write_report(legacy, tmp_path)["png"].stat().st_size > 0


# ---------------------------------------------------------------- the command line


OLD_RUN = __import__("conftest").REPO / "tests" / "assets" / "pre-layout-run"   # a tiny pixel-space checkpoint


def test_t2i_slowflow_reports_cfg_1_and_the_trained_cfg_with_excess_and_sigma_est(tmp_path, capsys):
    from pipelines.slowflow import main

    (tmp_path / "p.txt").write_text("a photo of a red circle\na photo of two blue squares\n")
    main(["--ckpt", f"old={OLD_RUN}", "--steps", "2", "4", "--n", "2", "--prompts", str(tmp_path / "p.txt"),
          "--ref-steps", "8", "--out", str(tmp_path / "sf")])
    report = json.loads((tmp_path / "sf" / "slowflow.json").read_text())
    assert set(report) == {"old"} and set(report["old"]) == {"2", "4"}
    assert set(report["old"]["4"]) == {"1", "3"}                       # CFG 1 and the config's sample.guidance
    r = report["old"]["4"]["3"]
    assert (r["guidance"], r["ref_steps"], r["n_images"], len(r["sigma"])) == (3.0, 8, 2, 5)
    assert {"mean_gap", "ref_gap", "mean_excess", "excess_q90", "sigma_est_gap", "n_sigma_est"} <= set(r)
    # the excess is the raw gap less the reference's offset, image by image, so also in the mean
    assert [g - o for g, o in zip(r["mean_gap"], r["ref_gap"])] == pytest.approx(r["mean_excess"], abs=1e-6)
    text = (tmp_path / "sf" / "slowflow.md").read_text()
    printed = capsys.readouterr().out
    assert "| old, CFG 1 |" in text and "| old, CFG 3 |" in text and "excess σ̂_N − σ̂_ref" in printed
    assert "| old, CFG 3 | 2, 4 |" in text and "auto-gamma" in printed     # auto-γ over the measured step counts
    main(["--ckpt", f"old={OLD_RUN}", "--steps", "2", "--n", "1", "--prompts", str(tmp_path / "p.txt"),
          "--guidance", "2", "--ref-steps", "0", "--sigma-est", "off", "--out", str(tmp_path / "sf2")])
    r = json.loads((tmp_path / "sf2" / "slowflow.json").read_text())["old"]["2"]["2"]
    assert "mean_excess" not in r and "sigma_est_gap" not in r and r["guidance"] == 2.0


def test_slowflow_options_are_checked_before_anything_loads(tmp_path):
    from pipelines.slowflow import background_for, guidance_scales, main
    from t2i.errors import EvalError

    assert guidance_scales(["1", "config", "3"], 3.0) == [1.0, 3.0] and guidance_scales(["config"], 1) == [1.0]
    with pytest.raises(EvalError, match="--guidance high: expected a number or 'config'"):
        main(["--ckpt", "a=nowhere", "--guidance", "high", "--out", str(tmp_path / "o")])
    with pytest.raises(EvalError, match="--ref-steps must be >= 0"):
        main(["--ckpt", "a=nowhere", "--ref-steps", "-1", "--out", str(tmp_path / "o")])
    assert background_for("auto", "pretrained", "a") is None and background_for("off", "identity", "a") is None
    assert torch.equal(background_for("auto", "identity", "a"), BG)
    with pytest.raises(EvalError, match="vae.kind=pretrained, so its states are latents, not pixels"):
        background_for("on", "pretrained", "a")
    assert not (tmp_path / "o").exists()
