"""Samplers: step formulas against float64 NumPy chains, distributions against exact scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import component_stats

from jaxdiff import sampling, schedules


def toy_eps(x, t):
    """A smooth made-up eps_fn that depends on x and t, for checking step arithmetic."""
    return 0.3 * x + 0.1 * jnp.sin(t.astype(x.dtype))[:, None]


def np_toy_eps(x, t):
    return 0.3 * x + 0.1 * np.sin(t)


def np_chain_inputs(T, shape, key, steps):
    keys = jax.random.split(key, steps)
    return [np.asarray(jax.random.normal(k, shape), np.float64) for k in keys]


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_equals_textbook_denoise_in_float64(variance):
    T = 7
    s = schedules.linear(T, 0.05, 0.3)
    beta = np.linspace(0.05, 0.3, T)
    alpha, abar = 1 - beta, np.cumprod(1 - beta)
    x_T = np.random.default_rng(0).normal(size=(3, 2))
    key = jax.random.key(4)
    z = np_chain_inputs(T, x_T.shape, key, T)
    x = x_T.copy()
    for i, t in enumerate(range(T, 0, -1)):
        mean = (x - beta[t - 1] / np.sqrt(1 - abar[t - 1]) * np_toy_eps(x, t)) / np.sqrt(alpha[t - 1])
        prev = abar[t - 2] if t > 1 else 1.0
        var = beta[t - 1] if variance == "beta" else beta[t - 1] * (1 - prev) / (1 - abar[t - 1])
        x = mean + (np.sqrt(var) * z[i] if t > 1 else 0.0)
    got = sampling.ddpm(toy_eps, s, jnp.asarray(x_T, jnp.float32), key, variance=variance)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_its_equation_in_float64(eta):
    T, steps = 50, 6
    s = schedules.linear(T, 1e-3, 0.2)
    abar = np.cumprod(1 - np.linspace(1e-3, 0.2, T))
    ts = schedules.timesteps(s, steps)
    x_T = np.random.default_rng(1).normal(size=(3, 2))
    key = jax.random.key(5)
    z = np_chain_inputs(T, x_T.shape, key, steps)
    x = x_T.copy()
    for i, t in enumerate(ts):
        a_t = abar[t - 1]
        a_s = abar[ts[i + 1] - 1] if i + 1 < steps else 1.0
        eps = np_toy_eps(x, t)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        sig = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
        x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sig**2) * eps + sig * z[i]
    got = sampling.ddim(toy_eps, s, jnp.asarray(x_T, jnp.float32), key, steps=steps, eta=eta)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_pp_equals_the_paper_algorithm_in_float64():
    """Lu et al. 2022, Algorithm 2, written in lambda: x_i = s_i/s_{i-1} x - a_i (e^{-h} - 1) D."""
    T, steps = 50, 6
    s = schedules.linear(T, 1e-3, 0.2)
    abar = np.cumprod(1 - np.linspace(1e-3, 0.2, T))
    ts = schedules.timesteps(s, steps, "logsnr")
    a, sg = np.sqrt(abar[ts - 1]), np.sqrt(1 - abar[ts - 1])
    lam = np.log(a / sg)
    x = np.random.default_rng(2).normal(size=(3, 2))
    x_T = x.copy()
    x0s = []
    for i, t in enumerate(ts):
        eps = np_toy_eps(x, t)
        x0s.append((x - sg[i] * eps) / a[i])
        if i + 1 == steps:  # last step to t = 0, first order
            x = x0s[-1]
            break
        h = lam[i + 1] - lam[i]
        if i == 0:
            d = x0s[-1]
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0s[-1] - 1 / (2 * r) * x0s[-2]
        x = sg[i + 1] / sg[i] * x - a[i + 1] * (np.exp(-h) - 1) * d
    got = sampling.dpm_solver_pp(toy_eps, s, jnp.asarray(x_T, jnp.float32), steps=steps)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


N = 10_000


def assert_matches_mixture(gm, ref, x, mean_tol, cov_rtol):
    w, m, c = component_stats(gm, x)
    rw, rm, rc = ref
    # weights: binomial standard error on N draws, 5 of them
    np.testing.assert_array_less(np.abs(w - rw), 5 * np.sqrt(rw * (1 - rw) / len(x)))
    np.testing.assert_array_less(np.abs(m - rm), mean_tol)
    for k in range(len(rw)):
        rel = np.linalg.norm(c[k] - rc[k]) / np.linalg.norm(rc[k])
        assert rel < cov_rtol, f"component {k}: covariance off by {rel:.3f} relative"


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(7), (N, 2))


def test_ddpm_1000_steps_reproduces_the_mixture(mixture2d, linear_schedule, reference_stats, x_T):
    x = jax.jit(lambda k: sampling.ddpm(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, k))(jax.random.key(0))
    # sampling error alone: ~0.02 on the means, ~5% on the covariances at 2-5k draws per component
    assert_matches_mixture(mixture2d, reference_stats, x, mean_tol=0.04, cov_rtol=0.08)


def test_ddim_50_steps_reproduces_the_mixture(mixture2d, linear_schedule, reference_stats, x_T):
    x = jax.jit(lambda: sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=50))()
    # the probability-flow ODE in 50 steps shrinks the spread a few percent: allow 10%
    assert_matches_mixture(mixture2d, reference_stats, x, mean_tol=0.05, cov_rtol=0.10)


def test_ddim_eta_1_reproduces_the_mixture(mixture2d, linear_schedule, reference_stats, x_T):
    # stochastic jumps need more steps than the ODE: at 50 the spread is ~15% low, at 250 ~5%
    fn = lambda k: sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, k, steps=250, eta=1.0)
    assert_matches_mixture(mixture2d, reference_stats, jax.jit(fn)(jax.random.key(1)), mean_tol=0.05, cov_rtol=0.10)


def test_dpm_solver_pp_20_steps_reproduces_the_mixture(mixture2d, linear_schedule, reference_stats, x_T):
    x = jax.jit(lambda: sampling.dpm_solver_pp(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=20))()
    assert_matches_mixture(mixture2d, reference_stats, x, mean_tol=0.05, cov_rtol=0.10)


def test_dpm_solver_pp_in_6_dimensions(linear_schedule):
    from jaxdiff import mixture

    rng = np.random.default_rng(3)
    covs = []
    for _ in range(2):
        a = rng.normal(size=(6, 6)) * 0.25
        covs.append(a @ a.T + 0.1 * np.eye(6))
    gm = mixture.GaussianMixture.create([0.6, 0.4], rng.normal(size=(2, 6)) * 2, covs)
    x_ref, _ = gm.sample(jax.random.key(0), 200_000)
    ref = component_stats(gm, x_ref)
    x_T = jax.random.normal(jax.random.key(8), (N, 6))
    x = jax.jit(lambda: sampling.dpm_solver_pp(gm.eps_fn(linear_schedule), linear_schedule, x_T, steps=25))()
    assert_matches_mixture(gm, ref, x, mean_tol=0.06, cov_rtol=0.10)


def test_same_key_same_samples_and_new_key_new_samples(mixture2d, linear_schedule):
    x_T = jax.random.normal(jax.random.key(0), (16, 2))
    f = jax.jit(lambda k: sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, k, steps=10, eta=1.0))
    a, b, c = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_new_key_or_condition_does_not_recompile(mixture2d, linear_schedule):
    traces = []

    @jax.jit
    def generate(labels, key):
        traces.append(1)
        x_T = jax.random.normal(key, (labels.shape[0], 2))
        eps_fn = lambda x, t: mixture2d.cond_eps_fn(linear_schedule)(x, t, labels)
        return sampling.dpm_solver_pp(eps_fn, linear_schedule, x_T, steps=10)

    for i in range(3):
        generate(jnp.full((8,), i), jax.random.key(i)).block_until_ready()
    assert len(traces) == 1


@pytest.mark.parametrize(
    "sampler",
    [
        lambda f, s, x, n: sampling.ddim(f, s, x, steps=n),
        lambda f, s, x, n: sampling.dpm_solver_pp(f, s, x, steps=n),
    ],
)
def test_one_scan_whatever_the_number_of_steps(sampler, linear_schedule):
    """No Python loop per step: the traced program has the same size at 10 and 50 steps."""
    x = jnp.zeros((2, 2))

    def size(n):
        jaxpr = jax.make_jaxpr(lambda x: sampler(toy_eps, linear_schedule, x, n))(x).jaxpr
        return len(jaxpr.eqns), sum(e.primitive.name == "scan" for e in jaxpr.eqns)

    (n10, scans10), (n50, scans50) = size(10), size(50)
    assert scans10 == scans50 == 1 and n10 == n50


def test_clip_x0_bounds_the_samples(mixture2d, linear_schedule):
    x_T = jax.random.normal(jax.random.key(0), (256, 2))
    x = sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=20, clip_x0=1.0)
    assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
    free = sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=20)
    assert float(jnp.max(jnp.abs(free))) > 1.5


def test_bad_arguments(linear_schedule):
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="key"):
        sampling.ddim(toy_eps, linear_schedule, x, steps=5, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        sampling.ddim(toy_eps, linear_schedule, x, steps=5, eta=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        sampling.dpm_solver_pp(toy_eps, linear_schedule, x, steps=1001)
    with pytest.raises(ValueError, match="variance"):
        sampling.ddpm(toy_eps, linear_schedule, x, jax.random.key(0), variance="large")
    with pytest.raises(ValueError, match="clip_x0"):
        sampling.ddim(toy_eps, linear_schedule, x, clip_x0=-1.0)
    with pytest.raises(ValueError, match="batch"):
        sampling.ddim(toy_eps, linear_schedule, jnp.zeros(()), steps=5)
