"""t2i.flow: the σ convention, timestep samplers, MixFlow, losses, Euler/CFG sampling, Slow-Flow projection.

Values are checked against hand-computed numbers, the worked values of docs/design/flow.md, closed-form CDFs (KS tests
with fixed seeds, so deterministic) and diffusers' scheduler. Each distribution test also checks that
a plausible WRONG distribution is rejected, so the tests have the power to fail.
"""

import numpy as np
import pytest
import torch
from scipy import special, stats

from t2i import flow
from t2i.flow import (
    cfg_velocity,
    euler_sample,
    flow_matching_loss,
    interpolate,
    mixflow_loss,
    mixflow_sigmas,
    sample_mixflow,
    sample_sigmas,
    sampling_sigmas,
    shift_sigmas,
    slowed_sigma,
    timestep,
    velocity_target,
)

N = 200_000  # samples per distribution test
P_OK = 1e-3  # a correct distribution must have KS p-value above this ...
P_WRONG = 1e-6  # ... and a wrong one below this


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ks_p(samples, cdf):
    return stats.kstest(np.asarray(samples, dtype=np.float64), cdf).pvalue


def assert_fits(samples, right_cdf, wrong_cdf):
    assert ks_p(samples, right_cdf) > P_OK
    assert ks_p(samples, wrong_cdf) < P_WRONG


# ---------------------------------------------------------------- interpolation and target


def test_interpolate_broadcasts_per_sample_sigma_over_bchw():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3, 1)
    noise = -2.0 * torch.ones_like(x)
    out = interpolate(x, noise, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out[0], x[0])  # σ = 0 is data
    torch.testing.assert_close(out[1], 0.75 * x[1] - 0.5)  # 0.75·x + 0.25·(−2)
    torch.testing.assert_close(out[2], 0.5 * x[2] - 1.0)
    torch.testing.assert_close(out[3], noise[3])  # σ = 1 is pure noise


def test_velocity_target_is_noise_minus_data():
    x, noise = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), 3.0)
    torch.testing.assert_close(velocity_target(x, noise), torch.full((2, 3, 4, 4), 2.0))


def test_velocity_target_is_the_derivative_of_the_path_in_sigma():
    x, noise = torch.randn(3, 4, generator=gen(0)), torch.randn(3, 4, generator=gen(1))
    s, h = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    fd = (interpolate(x, noise, s + h) - interpolate(x, noise, s - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x, noise), atol=1e-3, rtol=1e-3)


def test_model_timestep_is_1000_sigma():
    torch.testing.assert_close(timestep(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))


# ---------------------------------------------------------------- shift


def test_shift_fixes_endpoints_and_maps_half_to_three_quarters_at_shift_3():
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_shift_is_monotone_moves_toward_noise_and_is_inverted_by_reciprocal_shift():
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    out = shift_sigmas(s, 3.0)
    assert (out.diff() > 0).all()
    assert (out >= s).all()
    torch.testing.assert_close(shift_sigmas(out, 1 / 3.0), s)
    assert torch.equal(shift_sigmas(s, 1.0), s)


def test_shift_matches_diffusers_flow_match_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(shift_sigmas(unshifted, 3.0), sched.sigmas.float())


def test_shift_must_be_positive():
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(torch.tensor([0.5]), 0.0)


# ---------------------------------------------------------------- sample_sigmas


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode", "mixflow"])
def test_every_sampler_returns_n_float32_sigmas_in_unit_interval_reproducibly(kind):
    a = sample_sigmas(kind, 1000, generator=gen(3), shift=2.0)
    b = sample_sigmas(kind, 1000, generator=gen(3), shift=2.0)
    assert a.shape == (1000,) and a.dtype == torch.float32
    assert (a >= 0).all() and (a <= 1).all()
    assert torch.equal(a, b)


def test_unknown_sampler_kind_raises_naming_it_and_the_valid_kinds():
    with pytest.raises(ValueError, match="beta") as e:
        sample_sigmas("beta", 10)
    for kind in ("uniform", "logit_normal", "mode", "mixflow"):
        assert kind in str(e.value)


def test_unknown_sampler_param_raises_naming_it_and_the_valid_params():
    with pytest.raises(ValueError, match="stdev") as e:
        sample_sigmas("logit_normal", 10, stdev=1.0)
    assert "std" in str(e.value) and "mean" in str(e.value) and "shift" in str(e.value)
    with pytest.raises(ValueError, match="mean"):
        sample_sigmas("uniform", 10, mean=0.0)  # valid for another kind only
    with pytest.raises(ValueError, match="gamma"):
        sample_sigmas("mixflow", 10, gamma=0.8)  # gamma belongs to sample_mixflow


def test_uniform_sampler_is_uniform():
    assert_fits(sample_sigmas("uniform", N, gen(10)), stats.uniform.cdf, stats.beta(1.05, 1).cdf)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 1.4)])
def test_logit_normal_sampler_has_cdf_phi_of_logit(mean, std):
    s = sample_sigmas("logit_normal", N, gen(11), mean=mean, std=std)

    def cdf(m, sd):
        return lambda y: stats.norm.cdf((special.logit(y) - m) / sd)

    assert_fits(s, cdf(mean, std), cdf(mean + 0.05, std))


def test_shifted_uniform_has_the_cdf_of_the_inverse_shift():
    s = sample_sigmas("uniform", N, gen(12), shift=3.0)
    # σ' = 3σ/(1 + 2σ)  ⇔  σ = σ'/(3 − 2σ'), so P(σ' ≤ y) = y/(3 − 2y)
    assert_fits(s, lambda y: y / (3 - 2 * y), lambda y: y / (2.8 - 1.8 * y))


def _mode_cdf(scale):
    """CDF of σ = f(u), f(u) = 1 − u − scale·(cos²(πu/2) − 1 + u) decreasing: P(σ ≤ y) = 1 − f⁻¹(y) (bisection)."""

    def f(u):
        return 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)

    def cdf(y):
        lo, hi = np.zeros_like(y), np.ones_like(y)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > y  # f decreasing: the root lies right of mid
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    return cdf


@pytest.mark.parametrize("scale", [1.29, -0.5])
def test_mode_sampler_matches_sd3_mode_formula_cdf(scale):
    s = sample_sigmas("mode", N, gen(13), scale=scale)
    assert_fits(s, _mode_cdf(scale), _mode_cdf(scale - 0.1))


def test_mode_sampler_default_scale_is_1_29_and_matches_numpy_draws_of_the_formula():
    s = sample_sigmas("mode", N, gen(14))
    u = np.random.default_rng(0).random(N)
    ref = 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    assert stats.ks_2samp(s.numpy(), ref).pvalue > P_OK
    assert stats.ks_2samp(sample_sigmas("uniform", N, gen(14)).numpy(), ref).pvalue < P_WRONG


def test_mode_scale_outside_monotone_range_raises():
    with pytest.raises(ValueError, match="scale"):
        sample_sigmas("mode", 10, scale=2.0)


def test_mixflow_sampler_is_beta_1_2_in_sigma_not_the_reversed_direction():
    s = sample_sigmas("mixflow", N, gen(15))
    assert_fits(s, lambda y: 1 - (1 - y) ** 2, lambda y: y**2)  # wrong: Beta(2,1) in σ (data-ward)


def test_mixflow_sampler_kind_draws_the_same_sigma_as_sample_mixflow():
    sigma, _ = sample_mixflow(100, 0.8, gen(16), shift=3.0)
    assert torch.equal(sample_sigmas("mixflow", 100, gen(16), shift=3.0), sigma)


# ---------------------------------------------------------------- MixFlow


def test_mixflow_sigma_test_vector_from_uniforms():
    sigma, _ = mixflow_sigmas(torch.tensor([0.0, 0.25, 1.0]), torch.zeros(3), 0.8)
    torch.testing.assert_close(sigma, torch.tensor([1.0, 0.5, 0.0]))


def test_mixflow_slowed_input_test_vector():
    u = torch.tensor([0.5625, 0.0625])  # 1 − sqrt(u) = [0.25, 0.75]
    sigma, sigma_in = mixflow_sigmas(u, torch.tensor([0.5, 1.0]), 0.8)
    torch.testing.assert_close(sigma, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(sigma_in, torch.tensor([0.55, 0.95]))


def test_mixflow_loss_feeds_slowed_input_but_conditions_on_original_timestep():
    x, noise = torch.randn(2, 4, 2, 2, generator=gen(20)), torch.randn(2, 4, 2, 2, generator=gen(21))
    seen = {}

    def model_fn(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    mixflow_loss(model_fn, x, noise, torch.tensor([0.25, 0.75]), torch.tensor([0.55, 0.95]))
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 750.0]))
    expected = torch.stack([0.45 * x[0] + 0.55 * noise[0], 0.05 * x[1] + 0.95 * noise[1]])
    torch.testing.assert_close(seen["x_in"], expected)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval_raises_naming_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        mixflow_sigmas(torch.rand(4), torch.rand(4), gamma)
    with pytest.raises(ValueError, match="gamma"):
        sample_mixflow(4, gamma)


def test_gamma_zero_gives_input_at_the_training_sigma():
    sigma, sigma_in = sample_mixflow(1000, 0.0, gen(22), shift=3.0)
    assert torch.equal(sigma, sigma_in)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_mixflow_input_is_never_less_noisy_than_timestep_and_never_past_pure_noise(shift):
    for gamma in (0.0, 0.4, 0.8, 1.0):
        sigma, sigma_in = sample_mixflow(N, gamma, gen(23), shift=shift)
        assert (sigma_in >= sigma).all() and (sigma_in <= 1).all() and (sigma >= 0).all()
    u, r = torch.tensor([0.0, 0.0, 1.0, 0.3]), torch.tensor([1.0, 0.0, 1.0, 1.0])  # edges: r = 1, γ = 1
    sigma, sigma_in = mixflow_sigmas(u, r, 1.0, shift)
    assert (sigma_in >= sigma).all() and (sigma_in <= 1).all()


@pytest.mark.parametrize("gamma", [0.8, 0.4])
def test_mixflow_input_time_is_triangular_peaking_at_one_minus_gamma(gamma):
    sigma, sigma_in = sample_mixflow(N, gamma, gen(24))
    m, t = 1 - sigma_in, 1 - sigma  # paper (data-ward) time
    assert_fits(m, stats.triang(c=1 - gamma).cdf, stats.triang(c=gamma).cdf)
    assert abs(m.mean().item() - (2 / 3) * (1 - gamma / 2)) < 3e-3
    assert abs(t.mean().item() - 2 / 3) < 3e-3
    assert_fits(t, lambda y: y**2, stats.uniform.cdf)  # t ~ Beta(2, 1)


# ---------------------------------------------------------------- losses


def test_flow_matching_loss_is_zero_for_the_exact_target():
    x, noise = torch.randn(3, 4, 8, 8, generator=gen(30)), torch.randn(3, 4, 8, 8, generator=gen(31))
    loss = flow_matching_loss(lambda x_in, t: noise - x, x, noise, torch.rand(3, generator=gen(32)))
    assert loss.shape == (3,)
    assert torch.equal(loss, torch.zeros(3))


def test_flow_matching_loss_is_per_sample_mean_squared_offset():
    x, noise = torch.randn(2, 2, 2, 2, generator=gen(33)), torch.randn(2, 2, 2, 2, generator=gen(34))
    offset = torch.zeros(2, 2, 2, 2)
    offset[0] = 0.5  # mean of 0.25 → 0.25
    offset[1, 0], offset[1, 1] = 1.0, -3.0  # half 1, half 9 → 5
    loss = flow_matching_loss(lambda x_in, t: noise - x + offset, x, noise, torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(loss, torch.tensor([0.25, 5.0]))


def test_flow_matching_loss_feeds_the_interpolation_at_its_own_timestep():
    # An "oracle" that knows x and converts its input to a velocity using the conditioning σ:
    # v = (x_in − x)/σ equals ε − x only if x_in sits at σ. MixFlow's input does not.
    x, noise = torch.randn(4, 3, 4, 4, generator=gen(35)), torch.randn(4, 3, 4, 4, generator=gen(36))
    sigma, sigma_in = mixflow_sigmas(torch.rand(4, generator=gen(37)) * 0.8, torch.ones(4), 0.8)

    def oracle(x_in, t):
        return (x_in - x) / (t / 1000).view(-1, 1, 1, 1)

    torch.testing.assert_close(flow_matching_loss(oracle, x, noise, sigma), torch.zeros(4), atol=1e-9, rtol=0)
    assert (mixflow_loss(oracle, x, noise, sigma, sigma_in) > 1e-2).all()


def test_flow_matching_loss_equals_mixflow_loss_with_input_at_sigma():
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    x, noise = torch.randn(3, 4, 8, 8, generator=gen(38)), torch.randn(3, 4, 8, 8, generator=gen(39))
    sigma = torch.rand(3, generator=gen(40))

    def model_fn(x_in, t):
        return model(x_in) * (1 + t.view(-1, 1, 1, 1) / 1000)

    fm = flow_matching_loss(model_fn, x, noise, sigma)
    assert torch.equal(fm, mixflow_loss(model_fn, x, noise, sigma, sigma))
    fm.mean().backward()  # the loss reaches the model's parameters
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- sampling


def test_sampling_sigmas_go_from_one_to_zero_monotonically_with_steps_plus_one_entries():
    for steps in (1, 4, 28, 50):
        for shift in (1.0, 3.0):
            s = sampling_sigmas(steps, shift)
            assert s.shape == (steps + 1,)
            assert s[0].item() == 1.0 and s[-1].item() == 0.0
            assert (s.diff() < 0).all()
    torch.testing.assert_close(sampling_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(sampling_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_with_exact_velocity_lands_on_data_for_any_step_count(steps, shift):
    x, noise = torch.randn(2, 4, 8, 8, generator=gen(50)), torch.randn(2, 4, 8, 8, generator=gen(51))
    sigmas = sampling_sigmas(steps, shift)
    calls = []

    def velocity_fn(x_t, sigma):
        assert sigma.shape == (2,)
        return noise - x

    def callback(i, sigma, x_t):
        calls.append((i, sigma))
        # on the straight path every visited state is the ground-truth interpolation
        torch.testing.assert_close(x_t, interpolate(x, noise, torch.full((2,), sigma)), atol=1e-5, rtol=1e-5)

    out = euler_sample(velocity_fn, noise, sigmas, callback)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    assert [i for i, _ in calls] == list(range(steps + 1))
    assert [s for _, s in calls] == sigmas.tolist()


def test_euler_passes_each_step_sigma_to_the_velocity_fn_and_tracks_no_grad():
    seen = []

    def velocity_fn(x_t, sigma):
        seen.append(sigma.clone())
        return torch.ones_like(x_t)

    noise = torch.zeros(3, 2, requires_grad=True)
    out = euler_sample(velocity_fn, noise, torch.tensor([1.0, 0.6, 0.0]))
    assert [s.tolist() for s in seen] == [[1.0] * 3, [pytest.approx(0.6)] * 3]
    torch.testing.assert_close(out, -torch.ones(3, 2))  # 0 + (−0.4)·1 + (−0.6)·1
    assert not out.requires_grad


# ---------------------------------------------------------------- classifier-free guidance


def _toy_model(calls):
    """Linear in x, t and both conditioning tensors; records the batch size of every call."""

    def model_fn(x, t, c):
        calls.append(x.shape[0])
        b = (-1, 1, 1, 1)
        text = c["pooled_projections"].sum(1) - c["encoder_hidden_states"].mean((1, 2))
        return 2 * x + t.view(b) / 1000 + text.view(b)

    return model_fn


def _conds(B):
    g = gen(60)
    cond = {
        "encoder_hidden_states": torch.randn(B, 5, 8, generator=g),
        "pooled_projections": torch.randn(B, 6, generator=g),
    }
    uncond = {"encoder_hidden_states": torch.zeros(B, 5, 8), "pooled_projections": torch.zeros(B, 6)}
    return cond, uncond


def test_cfg_with_guidance_one_is_a_single_cond_pass():
    calls, (cond, uncond) = [], _conds(3)
    model_fn = _toy_model(calls)
    x, sigma = torch.randn(3, 4, 2, 2, generator=gen(61)), torch.tensor([0.9, 0.5, 0.1])
    v = cfg_velocity(model_fn, cond, uncond, 1.0)(x, sigma)
    assert calls == [3]  # one pass, batch B
    assert torch.equal(v, model_fn(x, 1000 * sigma, cond))


def test_cfg_combines_uncond_and_cond_in_one_batched_pass():
    calls, (cond, uncond) = [], _conds(3)
    model_fn = _toy_model(calls)
    x, sigma = torch.randn(3, 4, 2, 2, generator=gen(62)), torch.tensor([0.9, 0.5, 0.1])
    v = cfg_velocity(model_fn, cond, uncond, 4.5)(x, sigma)
    assert calls == [6]  # one pass with batch 2B
    v_u, v_c = model_fn(x, 1000 * sigma, uncond), model_fn(x, 1000 * sigma, cond)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))


def test_cfg_hand_computed_with_constant_velocities():
    def model_fn(x, t, c):  # returns the conditioning value: uncond 1, cond 3
        return c["y"].view(-1, 1).expand_as(x)

    f = cfg_velocity(model_fn, {"y": torch.full((2,), 3.0)}, {"y": torch.full((2,), 1.0)}, 4.0)
    v = f(torch.zeros(2, 5), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(v, torch.full((2, 5), 9.0))  # 1 + 4·(3 − 1)


def test_cfg_with_mismatched_condition_keys_raises():
    with pytest.raises(ValueError, match="keys"):
        cfg_velocity(lambda x, t, c: x, {"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 2.0)



def test_cfg_interval_guides_only_inside_it_and_runs_one_pass_outside():
    def model_fn(x, t, c):  # uncond 1, cond 3: guided 1 + 4·(3 − 1) = 9, unguided 3
        calls.append(x.shape[0])
        return c["y"].view(-1, 1).expand(x.shape[0], 5).clone()

    calls = []
    f = cfg_velocity(model_fn, {"y": torch.full((3,), 3.0)}, {"y": torch.full((3,), 1.0)}, 4.0, interval=(0.2, 0.5))
    x = torch.zeros(3, 5)
    for sigma, want, passes in ((0.9, 3.0, 3), (0.5, 9.0, 6), (0.3, 9.0, 6), (0.2, 9.0, 6), (0.1, 3.0, 3)):
        calls.clear()
        # the bounds as a float32 grid holds them (0.2 and 0.5 are not exact in float32) count as inside
        v = f(x, torch.full((3,), sigma, dtype=torch.float32))
        torch.testing.assert_close(v, torch.full((3, 5), want), msg=f"sigma {sigma}")
        assert calls == [passes], f"sigma {sigma}: batch sizes of the model calls {calls}"
    calls.clear()  # a batch that straddles a bound: guided rows inside, conditional rows outside, one 2B pass
    v = f(x, torch.tensor([0.9, 0.4, 0.05]))
    torch.testing.assert_close(v[:, 0], torch.tensor([3.0, 9.0, 3.0]))
    assert calls == [6]


def test_cfg_full_interval_is_the_plain_cfg_and_bad_intervals_are_refused():
    calls, (cond, uncond) = [], _conds(3)
    model_fn = _toy_model(calls)
    x, sigma = torch.randn(3, 4, 2, 2, generator=gen(63)), torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(cfg_velocity(model_fn, cond, uncond, 4.5, interval=(0.0, 1.0))(x, sigma),
                               cfg_velocity(model_fn, cond, uncond, 4.5)(x, sigma))
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.3,), "ab"):
        with pytest.raises(ValueError, match="guidance interval"):
            cfg_velocity(model_fn, cond, uncond, 4.5, interval=bad)


# ---------------------------------------------------------------- Slow-Flow projection


def _pair(seed, shape=(6, 4, 8, 8)):
    return torch.randn(*shape, generator=gen(seed)), torch.randn(*shape, generator=gen(seed + 1))


def test_slowed_sigma_recovers_sigma_of_ground_truth_interpolations():
    x_hat, eps = _pair(70)
    sigma = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    torch.testing.assert_close(slowed_sigma(interpolate(x_hat, eps, sigma), x_hat, eps), sigma, atol=1e-5, rtol=0)


def test_slowed_sigma_clips_beyond_the_chord_to_zero_and_one():
    x_hat, eps = _pair(72, (2, 3, 4, 4))
    past_data = interpolate(x_hat, eps, torch.tensor([-0.5, -2.0]))
    past_noise = interpolate(x_hat, eps, torch.tensor([1.5, 3.0]))
    assert torch.equal(slowed_sigma(past_data, x_hat, eps), torch.zeros(2))
    assert torch.equal(slowed_sigma(past_noise, x_hat, eps), torch.ones(2))


def test_slowed_sigma_is_the_nearest_point_on_the_chord_by_grid_search():
    x_hat, eps = _pair(74, (8, 2, 4, 4))
    sigma = torch.tensor([-0.2, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.2])
    x_sigma = interpolate(x_hat, eps, sigma) + 0.7 * torch.randn(8, 2, 4, 4, generator=gen(76))  # off the chord
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    xh, e, xs = x_hat.double().flatten(1), eps.double().flatten(1), x_sigma.double().flatten(1)
    chord = (1 - grid)[None, :, None] * xh[:, None] + grid[None, :, None] * e[:, None]  # [B, G, D]
    brute = grid[((xs[:, None] - chord) ** 2).sum(-1).argmin(1)]
    torch.testing.assert_close(slowed_sigma(x_sigma, x_hat, eps).double(), brute, atol=1e-3, rtol=0)


def test_slowed_sigma_degenerate_chord_gives_zero_not_nan():
    x = torch.randn(2, 3, generator=gen(78))
    out = slowed_sigma(torch.randn(2, 3, generator=gen(79)), x, x.clone())
    assert torch.equal(out, torch.zeros(2))


# ---------------------------------------------------------------- diffusers' grid


@pytest.mark.parametrize("steps", [1, 4, 28, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
def test_diffusers_grid_is_the_schedulers_set_timesteps_sigmas(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow.inference_sigmas(steps, "diffusers", shift)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=0)
    # the same grid from a folder's config, its own shift used when none is given
    torch.testing.assert_close(flow.inference_sigmas(steps, "diffusers", None, {"shift": shift}), ours, rtol=0, atol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and (ours.diff() < 0).all()


def test_diffusers_grid_ends_at_shifted_sigma_min_then_zero_unlike_t2is():
    d, t = flow.inference_sigmas(28, "diffusers", 3.0), flow.inference_sigmas(28, "t2i", 3.0)
    torch.testing.assert_close(t, flow.sampling_sigmas(28, 3.0), rtol=0, atol=0)
    sigma_min = flow.shift_sigmas(flow.shift_sigmas(torch.tensor(1 / 1000, dtype=torch.float64), 3.0), 3.0)
    assert abs(d[-2].item() - sigma_min.item()) < 1e-7  # σ_min = shift(1/1000), shifted again by set_timesteps
    assert (d[1:-1] < t[1:-1]).all()  # diffusers' grid is less noisy at every inner step for shift 3
    torch.testing.assert_close(d[:4], torch.tensor([1.0, 0.9873806, 0.9741077, 0.9601293]))
    torch.testing.assert_close(t[:4], torch.tensor([1.0, 0.9878048, 0.9750000, 0.9615385]))


@pytest.mark.parametrize("config, seq_len", [
    ({"shift": 3.0, "shift_terminal": 0.05}, None),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 1024),
    ({"shift": 3.0, "use_karras_sigmas": True}, None),
])
def test_diffusers_grid_follows_terminal_dynamic_and_karras_settings_like_the_pipeline(config, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15) if seq_len else None
    scheduler.set_timesteps(10, mu=mu)
    ours = flow.inference_sigmas(10, "diffusers", None, {"_class_name": "FlowMatchEulerDiscreteScheduler", **config},
                                 image_seq_len=seq_len)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=0)


def test_grid_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown sigma grid"):
        flow.inference_sigmas(4, "karras")
    with pytest.raises(ValueError, match="stochastic_sampling"):
        flow.inference_sigmas(4, "diffusers", 3.0, {"stochastic_sampling": True})
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        flow.inference_sigmas(4, "diffusers", 3.0, {"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.inference_sigmas(4, "diffusers", None, {"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="steps"):
        flow.inference_sigmas(0, "diffusers", 3.0)
