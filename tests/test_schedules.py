import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules


def test_linear_matches_float64_numpy():
    s = schedules.linear(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas, 1 - betas, rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bars, abar, rtol=1e-5, atol=1e-9)
    # textbook values at the ends: abar_1 = 1 - 1e-4, abar_T ~ 4e-5
    assert abs(float(s.alpha_bar(1)) - (1 - 1e-4)) < 1e-7
    assert 3e-5 < float(s.alpha_bar(1000)) < 5e-5
    assert float(s.alpha_bar(0)) == 1.0


def test_cosine_matches_closed_form():
    T, off = 1000, 0.008
    s = schedules.cosine(T, off)
    f = lambda t: np.cos((t / T + off) / (1 + off) * np.pi / 2) ** 2
    t = np.arange(1, T + 1)
    expected = f(t) / f(0)
    # beta is clipped at 0.999 near t = T, so compare where the clip is inactive
    np.testing.assert_allclose(s.alpha_bars[:-5], expected[:-5], rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(np.asarray(s.alpha_bars)) < 0)


def test_add_noise_matches_numpy(linear_schedule):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([1, 10, 500, 999, 1000])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t - 1][:, None, None, None]
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    got = schedules.add_noise(linear_schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_schedule_is_a_pytree_that_jits(linear_schedule):
    leaves = jax.tree_util.tree_leaves(linear_schedule)
    assert len(leaves) == 3
    f = jax.jit(lambda s, t: s.alpha_bar(t))
    np.testing.assert_allclose(f(linear_schedule, jnp.array([3])), linear_schedule.alpha_bars[2:3])


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50, 999, 1000])
def test_timesteps_strictly_decreasing_from_T_to_the_endpoint(linear_schedule, steps, spacing):
    ts = schedules.timesteps(linear_schedule, steps, spacing)
    assert len(ts) == steps + 1 and ts[0] == 1000 and ts[-1] == 0
    assert steps == 1 or ts[-2] == 1
    assert np.all(np.diff(ts) < 0)


def test_logsnr_spacing_is_even_in_lambda(linear_schedule):
    ts = schedules.timesteps(linear_schedule, 10, "logsnr")[:-1]
    abar = np.asarray(linear_schedule.alpha_bars, np.float64)[ts - 1]
    lam = 0.5 * np.log(abar / (1 - abar))
    gaps = np.diff(lam)
    assert np.all(gaps > 0) and gaps.max() / gaps.min() < 1.2


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedules.linear(0),
        lambda: schedules.linear(10, 0.02, 1e-4),
        lambda: schedules.cosine(-3),
        lambda: schedules.from_betas([0.1, 1.5]),
        lambda: schedules.from_betas([[0.1]]),
        lambda: schedules.timesteps(schedules.linear(10), 11),
        lambda: schedules.timesteps(schedules.linear(10), 5, "quadratic"),
        lambda: schedules.timesteps(schedules.linear(10), 2.7),
        lambda: schedules.timesteps(schedules.linear(10), True),
        lambda: schedules.check_timesteps(schedules.linear(10), [5, 5, 0]),
        lambda: schedules.check_timesteps(schedules.linear(10), [11, 0]),
        lambda: schedules.check_timesteps(schedules.linear(10), [5.0, 0.0]),
        lambda: schedules.check_timesteps(schedules.linear(10), [5]),
        lambda: schedules.ScheduleSpec.from_dict({"kind": "sigmoid", "num_timesteps": 10}),
        lambda: schedules.ScheduleSpec.from_dict({"kind": "linear", "num_timesteps": 10, "beta_min": 0.1}),
    ],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_scaled_linear_matches_float64_numpy():
    """Stable Diffusion's betas: square roots evenly spaced."""
    s = schedules.scaled_linear(1000, 0.00085, 0.012)
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000) ** 2
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bars, np.cumprod(1 - betas), rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: schedules.linear(500, 1e-3, 0.03), lambda: schedules.cosine(300, 0.01, 0.99),
                                  lambda: schedules.scaled_linear(1000), lambda: schedules.from_betas([0.1, 0.2, 0.3])])
def test_spec_rebuilds_the_same_schedule_through_json(make):
    import json

    s = make()
    again = schedules.ScheduleSpec.from_dict(json.loads(json.dumps(s.spec.to_dict()))).build()
    assert again.spec == s.spec
    np.testing.assert_array_equal(again.betas, s.betas)
    np.testing.assert_array_equal(again.alpha_bars, s.alpha_bars)


def test_add_noise_refuses_concrete_timesteps_outside_1_to_T(linear_schedule):
    x = jnp.zeros((3, 2))
    for t, match in [(jnp.array([0, 5, 7]), r"t must be in 1..1000 \(the schedule's timesteps\), got \[0\]"),
                     (np.array([1, 1001, 2000]), r"got \[1001, 2000\]"),
                     (np.arange(-20, 0), r"got \[-20, -19, -18, \.\.\., -3, -2, -1\] \(20 values\)"),
                     (jnp.array([1.0, 2.0, 3.0]), "t must be integer timesteps in 1..1000, got float32")]:
        with pytest.raises(ValueError, match=match):
            schedules.add_noise(linear_schedule, x, t, x)
    # under jit t is traced: no check, so the training step compiles as before
    out = jax.jit(lambda t: schedules.add_noise(linear_schedule, x + 1, t, x))(jnp.array([1, 1000, 1]))
    assert out.shape == (3, 2)
    assert schedules.brief(range(7)) == "[0, 1, 2, 3, 4, 5, 6]"
