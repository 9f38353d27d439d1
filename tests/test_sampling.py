"""Samplers: step formulas against float64 NumPy chains, distributions against exact scores, the
order of convergence against steps, and the contract (one signature, one scan, per-example keys)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import component_stats
from fast_xla import FULL_OPT

from jaxdiff import mixture, sampling, schedules


def toy_eps(x, t):
    """A smooth made-up eps_fn that depends on x and t, for checking step arithmetic."""
    return 0.3 * x + 0.1 * jnp.sin(t.astype(x.dtype))[:, None]


def np_toy_eps(x, t):
    return 0.3 * x + 0.1 * np.sin(t)


def np_noise(key, i, shape):
    """The noise the samplers draw at scan step i: normal(fold_in(key, i))."""
    return np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64)


def small_schedule(T=50):
    return schedules.linear(T, 1e-3, 0.2), np.cumprod(1 - np.linspace(1e-3, 0.2, T))


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_equals_textbook_denoise_in_float64(variance):
    T = 7
    s = schedules.linear(T, 0.05, 0.3)
    beta = np.linspace(0.05, 0.3, T)
    alpha, abar = 1 - beta, np.cumprod(1 - beta)
    x_T = np.random.default_rng(0).normal(size=(3, 2))
    key = jax.random.key(4)
    x = x_T.copy()
    for i, t in enumerate(range(T, 0, -1)):
        mean = (x - beta[t - 1] / np.sqrt(1 - abar[t - 1]) * np_toy_eps(x, t)) / np.sqrt(alpha[t - 1])
        prev = abar[t - 2] if t > 1 else 1.0
        var = beta[t - 1] if variance == "beta" else beta[t - 1] * (1 - prev) / (1 - abar[t - 1])
        x = mean + (np.sqrt(var) * np_noise(key, i, x.shape) if t > 1 else 0.0)
    got = sampling.ddpm(toy_eps, s, jnp.asarray(x_T, jnp.float32), key=key, variance=variance)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_its_equation_in_float64(eta):
    steps = 6
    s, abar = small_schedule()
    ts = schedules.timesteps(s, steps)
    x_T = np.random.default_rng(1).normal(size=(3, 2))
    key = jax.random.key(5)
    x = x_T.copy()
    for i in range(steps):
        a_t, a_s = abar[ts[i] - 1], (abar[ts[i + 1] - 1] if ts[i + 1] else 1.0)
        eps = np_toy_eps(x, ts[i])
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        sig = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
        x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sig**2) * eps + (sig * np_noise(key, i, x.shape) if eta else 0)
    got = sampling.ddim(toy_eps, s, jnp.asarray(x_T, jnp.float32), key=key, steps=steps, eta=eta)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_pp_equals_the_paper_algorithm_in_float64():
    """Lu et al. 2022, Algorithm 2, written in lambda: x_i = s_i/s_{i-1} x - a_i (e^{-h} - 1) D."""
    steps = 6
    s, abar = small_schedule()
    ts = schedules.timesteps(s, steps, "logsnr")[:-1]
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


def ve(abar):
    """Karras et al.'s sigma for a discrete abar, and the VE variable's scale."""
    return np.sqrt((1 - abar) / abar), np.sqrt(abar)


@pytest.mark.parametrize("name", ["euler", "heun", "euler_a"])
def test_karras_samplers_equal_k_diffusion_loops_in_float64(name):
    """k-diffusion's loops in the VE variable x / sqrt(abar) = x0 + sigma eps, written from Karras et
    al. (Algorithm 1 for Heun; sigma_up / sigma_down for Euler ancestral)."""
    steps = 5
    s, abar = small_schedule()
    ts = schedules.timesteps(s, steps, "uniform")
    ab = np.append(abar[ts[:-1] - 1], 1.0)
    sig, scale = ve(ab)
    x_T = np.random.default_rng(3).normal(size=(3, 2))
    key = jax.random.key(6)
    d_at = lambda y, i: np_toy_eps(y * scale[i], ts[i])  # eps at the VE point y, timestep i
    y = x_T / scale[0]
    for i in range(steps):
        d = d_at(y, i)
        if name == "euler" or (name == "heun" and sig[i + 1] == 0):
            y = y + (sig[i + 1] - sig[i]) * d
        elif name == "heun":
            y_e = y + (sig[i + 1] - sig[i]) * d
            y = y + (sig[i + 1] - sig[i]) * 0.5 * (d + d_at(y_e, i + 1))
        else:
            up = min(sig[i + 1], np.sqrt(sig[i + 1] ** 2 * (sig[i] ** 2 - sig[i + 1] ** 2) / sig[i] ** 2))
            down = np.sqrt(sig[i + 1] ** 2 - up**2)
            y = y + (down - sig[i]) * d + up * np_noise(key, i, y.shape)
    kwargs = {"key": key} if name == "euler_a" else {}
    got = sampling.run(name, toy_eps, s, jnp.asarray(x_T, jnp.float32), steps=steps, spacing="uniform", **kwargs)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_euler_is_ddim_and_euler_ancestral_is_ddim_eta_1(mixture2d, linear_schedule):
    """Two derivations in two coordinate systems that must give one path: Euler in sigma is DDIM with
    eta = 0, and Euler ancestral is DDIM with eta = 1 (the same noise draws)."""
    f = mixture2d.eps_fn(linear_schedule)
    x_T = jax.random.normal(jax.random.key(0), (512, 2))
    key = jax.random.key(1)
    chex.assert_trees_all_close(sampling.euler(f, linear_schedule, x_T, steps=15, spacing="uniform"),
                                sampling.ddim(f, linear_schedule, x_T, steps=15), atol=1e-4)
    chex.assert_trees_all_close(sampling.euler_ancestral(f, linear_schedule, x_T, key=key, steps=15),
                                sampling.ddim(f, linear_schedule, x_T, key=key, steps=15, eta=1.0), atol=1e-4)


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


@pytest.fixture(scope="module")
def x_T_many():
    return jax.random.normal(jax.random.key(7), (100_000, 2))


# Each band is the sampler's own bias at these steps, measured once on 200k draws (largest covariance
# error, largest mean error), plus four standard errors of 100k draws (the 0.2-weight component's
# covariance ~1% each, its mean ~0.004): DDPM-1000 1.4% / 0.004, DDIM-50 5.3% / 0.041, DDIM-250 eta 1
# and Euler ancestral-250 3.9% / 0.009, DPM-Solver++-20 8.0% / 0.025 (it widens the spread), Heun-20
# 7.3% / 0.045. With 10k draws (one standard error ~3%) the bands sat one standard error above the
# bias, and other seeds crossed them (dpm++ and heun at 1.1-1.5x their band).
@pytest.mark.parametrize("name, steps, kwargs, mean_tol, cov_rtol", [
    ("ddpm", None, {}, 0.03, 0.06),
    ("ddim", 50, {}, 0.06, 0.10),
    ("ddim", 250, {"eta": 1.0}, 0.03, 0.08),
    ("dpm++", 20, {}, 0.045, 0.12),
    ("heun", 20, {}, 0.065, 0.11),
    ("euler_a", 250, {}, 0.03, 0.08),
])
def test_samplers_reproduce_the_mixture(name, steps, kwargs, mean_tol, cov_rtol, mixture2d, linear_schedule,
                                        reference_stats, x_T_many):
    f = mixture2d.eps_fn(linear_schedule)
    x = jax.jit(lambda k: sampling.run(name, f, linear_schedule, x_T_many, key=k, steps=steps, **kwargs),
                compiler_options=FULL_OPT)(jax.random.key(0))
    assert_matches_mixture(mixture2d, reference_stats, x, mean_tol, cov_rtol)


def test_dpm_solver_pp_in_6_dimensions(linear_schedule):
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


@pytest.mark.parametrize("name, low, high", [("ddim", 0.9, 1.1), ("euler", 0.9, 1.1), ("dpm++", 1.5, 2.3),
                                             ("heun", 1.6, 2.3)])
def test_order_of_convergence_on_the_mixture(name, low, high, mixture2d, linear_schedule):
    """The error against the exact probability-flow solution from the same x_T falls as steps^-p:
    p about 1 for DDIM and Euler (measured 0.99), about 2 for DPM-Solver++(2M) (1.67: its first and
    last steps are first order) and Heun (1.83). The reference is Heun on
    every one of the T = 1000 timesteps (its own error ~1e-6 here)."""
    f = mixture2d.eps_fn(linear_schedule)
    x_T = jax.random.normal(jax.random.key(2), (512, 2))
    ref = jax.jit(lambda: sampling.heun(f, linear_schedule, x_T, timesteps=np.arange(1000, -1, -1)))()
    steps = np.array([20, 40, 80, 160])
    errs = [float(jnp.sqrt(jnp.mean((sampling.run(name, f, linear_schedule, x_T, steps=int(n), spacing="logsnr")
                                     - ref) ** 2))) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert low < slope < high, (name, slope, errs)


def test_per_example_keys_make_each_row_independent_of_the_batch(mixture2d, linear_schedule):
    f = mixture2d.eps_fn(linear_schedule)
    keys = jax.random.split(jax.random.key(0), 8)
    x_T = jax.random.normal(jax.random.key(1), (8, 2))
    for name in ("ddpm", "euler_a"):
        big = sampling.run(name, f, linear_schedule, x_T, key=keys, steps=20)
        small = sampling.run(name, f, linear_schedule, x_T[:3], key=keys[:3], steps=20)
        chex.assert_trees_all_close(big[:3], small, atol=1e-5)
    with pytest.raises(ValueError, match="one per example"):
        sampling.ddpm(f, linear_schedule, x_T, key=keys[:3])


def test_trajectory_starts_at_x_T_and_ends_at_the_sample(linear_schedule):
    x_T = jax.random.normal(jax.random.key(0), (4, 2))
    for name, steps in [("ddim", 7), ("dpm++", 5), ("heun", 3)]:
        x, xs = sampling.run(name, toy_eps, linear_schedule, x_T, steps=steps, return_trajectory=True)
        assert xs.shape == (steps + 1, 4, 2)
        np.testing.assert_array_equal(xs[0], x_T)
        np.testing.assert_array_equal(xs[-1], x)


def test_a_grid_of_ones_own_ending_before_clean_data(linear_schedule):
    """timesteps= overrides steps; ending at t = 1 (as Stable Diffusion's DDIM does) stops at x_1."""
    x_T = jax.random.normal(jax.random.key(0), (4, 2))
    grid = np.array([1000, 600, 200, 40, 1])
    x, xs = sampling.ddim(toy_eps, linear_schedule, x_T, timesteps=grid, return_trajectory=True)
    assert xs.shape == (5, 4, 2)
    # the last jump, 40 -> 1, by the DDIM equation from the state at 40
    a_t, a_s = (float(linear_schedule.alpha_bar(t)) for t in (40, 1))
    x40 = np.asarray(xs[-2], np.float64)
    eps = np_toy_eps(x40, 40)
    x0 = (x40 - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    np.testing.assert_allclose(x, np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps, rtol=1e-5, atol=1e-5)


class TestDeterminism(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_key_same_samples_new_key_new_samples(self):
        sched = schedules.linear()
        gm = mixture.GaussianMixture.create([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [np.eye(2) * 0.3] * 2)
        x_T = jax.random.normal(jax.random.key(0), (16, 2))
        run = self.variant(lambda k: sampling.ddim(gm.eps_fn(sched), sched, x_T, key=k, steps=10, eta=1.0))
        a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
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


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "heun", "euler_a"])
def test_one_scan_whatever_the_number_of_steps(name, linear_schedule):
    """No Python loop per step: the traced program has the same size at 10 and 50 steps."""
    x = jnp.zeros((2, 2))

    def size(n):
        jaxpr = jax.make_jaxpr(lambda x: sampling.run(name, toy_eps, linear_schedule, x, key=jax.random.key(0),
                                                      steps=n))(x).jaxpr
        return len(jaxpr.eqns), sum(e.primitive.name == "scan" for e in jaxpr.eqns)

    (n10, scans10), (n50, scans50) = size(10), size(50)
    assert scans10 == scans50 == 1 and n10 == n50


def test_the_table_names_every_sampler_and_its_cost(linear_schedule):
    assert set(sampling.SAMPLERS) == {"ddpm", "ddim", "dpm++", "euler", "heun", "euler_a"}
    assert sampling.nfe("ddpm", 20, linear_schedule) == 1000
    assert sampling.nfe("dpm++", 20, linear_schedule) == 20
    assert sampling.nfe("heun", 10, linear_schedule) == 20
    calls = []
    counting = lambda x, t: (calls.append(1), toy_eps(x, t))[1]
    for name in sampling.SAMPLERS:
        calls.clear()
        jax.make_jaxpr(lambda x, name=name: sampling.run(name, counting, linear_schedule, x, key=jax.random.key(0),
                                                         steps=4))(jnp.zeros((2, 2)))
        per_step = sampling.nfe(name, 4, linear_schedule) // (1000 if name == "ddpm" else 4)
        assert len(calls) == per_step, name  # evaluations traced into one scan step


def test_clip_x0_bounds_the_samples(mixture2d, linear_schedule):
    x_T = jax.random.normal(jax.random.key(0), (256, 2))
    x = sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=20, clip_x0=1.0)
    assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
    free = sampling.ddim(mixture2d.eps_fn(linear_schedule), linear_schedule, x_T, steps=20)
    assert float(jnp.max(jnp.abs(free))) > 1.5


def test_bad_arguments(linear_schedule):
    x = jnp.zeros((2, 2))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="key"):
        sampling.ddim(toy_eps, linear_schedule, x, steps=5, eta=0.5)
    with pytest.raises(ValueError, match="key"):
        sampling.ddpm(toy_eps, linear_schedule, x)
    with pytest.raises(ValueError, match="eta"):
        sampling.ddim(toy_eps, linear_schedule, x, steps=5, eta=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        sampling.dpm_solver_pp(toy_eps, linear_schedule, x, steps=1001)
    with pytest.raises(ValueError, match="steps"):
        sampling.heun(toy_eps, linear_schedule, x, steps=2.5)
    with pytest.raises(ValueError, match="timesteps"):
        sampling.euler(toy_eps, linear_schedule, x, timesteps=[10, 20, 0])
    with pytest.raises(ValueError, match="variance"):
        sampling.ddpm(toy_eps, linear_schedule, x, key=k, variance="large")
    with pytest.raises(ValueError, match="clip_x0"):
        sampling.ddim(toy_eps, linear_schedule, x, clip_x0=-1.0)
    with pytest.raises(ValueError, match="batch"):
        sampling.ddim(toy_eps, linear_schedule, jnp.zeros(()), steps=5)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sampling.run("plms", toy_eps, linear_schedule, x)


ALL = list(sampling.SAMPLERS)



def run_small(name, x_T, **kwargs):
    s, _ = small_schedule()
    return sampling.run(name, toy_eps, s, x_T, key=jax.random.key(0), steps=3, **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_one_dtype_rule_for_every_sampler(name):
    """x_T must be floating; bf16 runs like float32 (the state carried in float32) and comes back bf16."""
    x_T = np.random.default_rng(7).normal(size=(2, 3))
    for bad in (jnp.zeros((2, 3), jnp.int32), np.zeros((2, 3), bool)):
        with pytest.raises(ValueError, match="x_T must be a floating-point array"):
            run_small(name, bad)
    x_bf16 = jnp.asarray(x_T, jnp.bfloat16)
    low, xs = run_small(name, x_bf16, return_trajectory=True)
    assert low.dtype == xs.dtype == jnp.bfloat16 and xs.shape == ((51 if name == "ddpm" else 4), 2, 3)
    # the float32 run from the same (bf16-rounded) start, rounded to bf16 once at the end
    same = run_small(name, x_bf16.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(low, np.float32), same, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, "3"])
def test_run_refuses_step_counts_that_are_not_positive_integers(linear_schedule, steps):
    for name in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            sampling.run(name, toy_eps, linear_schedule, jnp.zeros((1, 2)), key=jax.random.key(0), steps=steps)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sampling.nfe("ddim", steps, linear_schedule)


def test_numpy_numbers_and_legacy_keys_are_accepted():
    s, _ = small_schedule()
    x_T = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3)), jnp.float32)
    plain = sampling.ddim(toy_eps, s, x_T, key=jax.random.key(3), steps=4, eta=0.5, clip_x0=1.5)
    numpy = sampling.ddim(toy_eps, s, x_T, key=jax.random.key(3), steps=4, eta=np.float32(0.5),
                          clip_x0=np.float32(1.5))
    np.testing.assert_array_equal(plain, numpy)
    # a legacy uint32 key holds the same bits as the typed key of the same seed: the same noise
    typed = sampling.euler_ancestral(toy_eps, s, x_T, key=jax.random.key(3), steps=4)
    np.testing.assert_array_equal(sampling.euler_ancestral(toy_eps, s, x_T, key=jax.random.PRNGKey(3), steps=4), typed)
    per_example = jax.random.split(jax.random.PRNGKey(3), 2)  # (2, 2) uint32: one legacy key per example
    typed = sampling.ddpm(toy_eps, s, x_T, key=jax.random.wrap_key_data(per_example))
    np.testing.assert_array_equal(sampling.ddpm(toy_eps, s, x_T, key=per_example), typed)
    with pytest.raises(ValueError, match=r"key must be a PRNG key .* got int32 of shape \(3,\)"):
        sampling.ddpm(toy_eps, s, x_T, key=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"one per example \(2\), got keys of shape \(3,\)"):
        sampling.ddpm(toy_eps, s, x_T, key=jax.random.split(jax.random.PRNGKey(0), 3))
    for bad in (np.bool_(True), float("inf")):
        with pytest.raises(ValueError, match="eta must be a finite number"):
            sampling.ddim(toy_eps, s, x_T, key=jax.random.key(0), steps=4, eta=bad)
        with pytest.raises(ValueError, match="clip_x0 must be None or a positive number"):
            sampling.ddim(toy_eps, s, x_T, steps=4, clip_x0=bad)


def test_final_first_order_ends_with_the_predicted_x0_step():
    """With the flag, the last step of a grid ending at t > 0 is the first-order (DDIM) jump from x0_t:
    on the same grid and state, a DDIM step from the second-to-last sample gives the same x."""
    s, abar = small_schedule()
    ts = np.array([50, 30, 15, 6, 2], np.int32)
    x_T = jnp.asarray(np.random.default_rng(9).normal(size=(3, 2)), jnp.float32)
    _, xs = sampling.dpm_solver_pp(toy_eps, s, x_T, timesteps=ts, final_first_order=True, return_trajectory=True)
    second = sampling.dpm_solver_pp(toy_eps, s, x_T, timesteps=ts)
    ddim_last = sampling.ddim(toy_eps, s, xs[-2], timesteps=ts[-2:])
    np.testing.assert_allclose(xs[-1], ddim_last, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(second) - np.asarray(xs[-1])).max() > 1e-3
    with pytest.raises(ValueError, match="final_first_order must be True or False"):
        sampling.dpm_solver_pp(toy_eps, s, x_T, timesteps=ts, final_first_order="yes")
