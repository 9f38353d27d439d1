"""diffusers' sigma-space schedulers in jaxdiff (``jaxdiff.sigma_sampling``), against diffusers' recorded runs.

tests/fixtures/make_ksched_fixtures.py ran EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, LMSDiscreteScheduler and DPMSolverMultistepScheduler (2M, and 2M SDE) swapped into
SD 1.5's and SD 2.1's (v-prediction) scheduler configs, at 20 steps and short runs, Karras sigmas on and
off, the three timestep spacings, final_sigmas_type, and recorded their timesteps, sigmas, init_noise_sigma
and the samples of a run driven by a fixed analytic network (with the noise it drew). Measured: walks on
diffusers' own alphas_cumprod agree to 1.5e-7 relative, samples to 5e-7 of their largest value.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff import sigma_sampling as K
from jaxdiff.pretrained import scheduler as S
from jaxdiff.pretrained import walks
from jaxdiff.pretrained.scheduler import SchedulerConfigError

HERE = pathlib.Path(__file__).parent / "fixtures"
FIXTURE = json.loads((HERE / "sd_ksched" / "expected.json").read_text())
RUNS = FIXTURE["runs"]
# diffusers' float32 alphas_cumprod of SD's scaled_linear betas (recorded by make_scheduler_fixtures.py)
DIFFUSERS_ABAR = np.asarray(
    json.loads((HERE / "sd_scheduler" / "expected.json").read_text())["alphas_cumprod"]["sd15"], np.float64)
# the betas that give exactly those alpha_bars: a config override that puts diffusers' table under the walks
DIFFUSERS_BETAS = (1 - DIFFUSERS_ABAR / np.concatenate([[1.0], DIFFUSERS_ABAR[:-1]])).tolist()


def run_id(r):
    extra = ",".join(f"{k}={v}" for k, v in r["overrides"].items())
    return f"{r['config']}-{r['sampler']}-{r['steps']}" + (f"-{extra}" if extra else "")


def network(x_in, t):
    """The fixture's network f(x_in, tau) = (0.2 + 0.8 tau / 1000) x_in + 0.1 sin(tau / 50), tau = t - 1."""
    tau = (t - 1.0)[:, None]
    return (0.2 + 0.8 * tau / 1000) * x_in + 0.1 * jnp.sin(tau / 50)


def diffusers_walk(r):
    """(t, sigmas) as diffusers listed them, Heun's repeats removed."""
    t, s = np.asarray(r["timesteps"]), np.asarray(r["sigmas"])
    if r["sampler"] == "heun_discrete":
        t, s = np.concatenate([t[:1], t[1::2]]), np.concatenate([s[:1], s[1::2]])
    return t, s


@pytest.mark.parametrize("r", RUNS, ids=[run_id(r) for r in RUNS])
def test_walks_equal_diffusers(r):
    setup = S.sigma_setup(FIXTURE["configs"][r["config"]], r["steps"], r["sampler"], **r["overrides"])
    t, sigmas = diffusers_walk(r)
    assert setup.prediction == r["prediction_type"]
    # the network's time: diffusers' timestep + 1, as float32 (fractional with linspace and Karras, where
    # it moves with the table below)
    np.testing.assert_allclose(np.asarray(setup.walk.t) - 1, t, rtol=1e-5, atol=1e-4)
    # jaxdiff's alpha_bars are a float64 product, diffusers' float32: 2e-5 apart (test_pretrained_scheduler)
    np.testing.assert_allclose(setup.walk.sigmas, sigmas, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(setup.walk.init_sigma, r["init_noise_sigma"], rtol=2e-5)


# a cross-section for whole runs (each compiles a scan): every sampler under v-prediction (SD 2.1) with Karras
# sigmas at 7 steps (Euler ancestral, which has none, at 20), Euler under epsilon, and the DPM-Solver runs whose
# last step differs (a sigma_min endpoint under 15 steps, euler_at_final)
SAMPLED = [r for r in RUNS if (r["config"], r["steps"], r["overrides"]) == ("sd21", 7, {"use_karras_sigmas": True})
           or (r["config"], r["sampler"], r["steps"], r["overrides"]) in [
               ("sd21", "euler_ancestral_discrete", 20, {}),
               ("sd15", "euler_discrete", 7, {"use_karras_sigmas": True}),
               ("sd15", "dpm_solver_pp_sde", 10, {"final_sigmas_type": "sigma_min"}),
               ("sd15", "dpm_solver_pp_sde", 20, {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
               ("sd15", "dpm_solver_pp_2m", 10, {"solver_type": "heun", "use_karras_sigmas": True}),
           ]]
assert len(SAMPLED) == 10


@pytest.mark.parametrize("r", SAMPLED, ids=[run_id(r) for r in SAMPLED])
def test_runs_equal_diffusers(r):
    setup = S.sigma_setup(FIXTURE["configs"][r["config"]], r["steps"], r["sampler"], trained_betas=DIFFUSERS_BETAS,
                          **r["overrides"])
    t, sigmas = diffusers_walk(r)
    np.testing.assert_allclose(setup.walk.sigmas, sigmas, rtol=3e-7, atol=1e-8)
    kwargs = dict(walk=setup.walk, prediction=setup.prediction, **setup.options)
    x_T = jnp.asarray(FIXTURE["x_T"], jnp.float32)
    if "noise" in r:
        kwargs["noise"] = jnp.asarray(r["noise"], jnp.float32).reshape(-1, *x_T.shape)
    x, xs = getattr(K, r["sampler"])(network, None, x_T, return_trajectory=True, **kwargs)
    final = np.asarray(r["final"]).reshape(x_T.shape)
    for got, want in ((xs[1], r["after_first"]), (x, final)):  # float32 rounding, relative to the sample's size
        want = np.asarray(want).ravel()
        np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=0, atol=2e-6 * np.abs(want).max())
    # one sample per network evaluation, from the scaled start on
    assert xs.shape[0] == len(r["timesteps"]) + 1 == walks.NFE[r["sampler"]][1](r["steps"]) + 1


def test_nfe_per_step():
    evals = {name: walks.NFE[name][1](10) / 10 for name in S.SIGMA_SAMPLERS}
    assert evals == {"euler_discrete": 1, "euler_ancestral_discrete": 1, "heun_discrete": 1.9, "lms_discrete": 1,
                     "dpm_solver_pp_sde": 1, "dpm_solver_pp_2m": 1}
    calls = []

    def counting(x, t):
        calls.append(1)  # once per trace: each scan body evaluates the network once
        return x

    w = K.euler_walk(DIFFUSERS_ABAR, 5)
    for name in ("euler_discrete", "heun_discrete", "lms_discrete"):
        calls.clear()
        jax.make_jaxpr(lambda x, name=name: getattr(K, name)(counting, None, x, walk=w))(jnp.zeros((1, 2)))
        assert len(calls) == 1, name


def linear_gaussian_variance(name, walk, data_var):
    """The exact variance of a stochastic sampler's output for data N(0, data_var) and the exact denoiser,
    propagated through the walk in float64: the noise path checked apart from diffusers' noise."""
    s = np.asarray(walk.sigmas, np.float64)
    if name == "euler_ancestral_discrete":
        var = walk.init_sigma**2
        for i in range(walk.steps):
            k = data_var / (data_var + s[i] ** 2)  # x0_hat = k x
            up = s[i + 1] * np.sqrt(1 - s[i + 1] ** 2 / s[i] ** 2)
            a = 1 + (1 - k) * (s[i + 1] ** 2 / s[i] - s[i]) / s[i]
            var = a**2 * var + up**2
        return var
    coef = K.dpm_coefficients(s, final_first_order=True)
    cov = np.zeros((2, 2))  # of (x, x0_prev)
    cov[0, 0] = 1.0
    for i in range(walk.steps):
        alpha, sd = coef["alpha"][i], coef["s"][i]
        g = alpha * data_var / (alpha**2 * data_var + sd**2)  # x0_hat = g x
        m = np.array([[coef["a"][i] + coef["b"][i] * (1 + coef["w"][i]) * g, -coef["b"][i] * coef["w"][i]],
                      [g, 0.0]])
        cov = m @ cov @ m.T + np.diag([coef["c"][i] ** 2, 0.0])
    return cov[0, 0]


@pytest.mark.parametrize("name", ["euler_ancestral_discrete", "dpm_solver_pp_sde"])
def test_noise_from_the_key_has_the_variance_the_walk_implies(name):
    """Data N(0, 0.25), the exact eps at integer times ("trailing" spacing): the samples' variance is the one
    the recursion predicts (4 standard errors of 20k draws: 4%); a step reusing another step's noise, or
    noise off by a factor, misses it by far more."""
    data_var = 0.25
    table = K.sigma_table(DIFFUSERS_ABAR)
    taus = np.arange(1000, 0, -1000 / 12).round().astype(np.int64) - 1
    walk = K.dpm_walk(DIFFUSERS_ABAR, 12, taus=taus) if name == "dpm_solver_pp_sde" else \
        K.euler_walk(DIFFUSERS_ABAR, 12, spacing="trailing")
    sig = jnp.asarray(table, jnp.float32)

    def exact(x_in, t):  # eps of the data's noised law, at the training sigma of integer time t
        sigma = sig[jnp.round(t - 1).astype(jnp.int32)][:, None]
        abar = 1 / (1 + sigma**2)
        return jnp.sqrt(1 - abar) * x_in / (abar * data_var + 1 - abar)

    x_T = jax.random.normal(jax.random.key(3), (10_000, 2))
    x = getattr(K, name)(exact, None, x_T, walk=walk, key=jax.random.key(4))
    want = linear_gaussian_variance(name, walk, data_var)
    got = float(np.var(np.asarray(x, np.float64)))
    assert abs(got / want - 1) < 4 * np.sqrt(2 / x.size), (got, want)
    assert abs(np.mean(np.asarray(x))) < 4 * np.sqrt(want / x.size)


def test_a_key_per_example_and_noise_of_the_wrong_shape():
    w = K.euler_walk(DIFFUSERS_ABAR, 4)
    x_T = jnp.ones((3, 2))
    keys = jax.random.split(jax.random.key(0), 5)
    f = K.euler_ancestral_discrete
    run = jax.jit(lambda k: f(network, None, x_T, walk=w, key=k))
    a, b = np.asarray(run(keys[:3])), np.asarray(run(keys[jnp.array([0, 3, 4])]))
    np.testing.assert_array_equal(a[0], b[0])  # row i depends on key i alone
    assert np.all(a[1:] != b[1:])
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 3, 2\)"):
        f(network, None, x_T, walk=w, noise=jnp.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="pass key="):
        f(network, None, x_T, walk=w)


def test_lms_coefficients_integrate_the_interpolating_polynomial():
    """Against a closed form: the weights reproduce the integral of any cubic through the last 4 points."""
    s = np.array([14.6, 9.0, 5.5, 3.1, 1.7, 0.0])
    coef = K.lms_coefficients(s)
    cubic = np.polynomial.Polynomial([0.3, -1.1, 0.4, 0.05])
    for i in range(3, 5):
        nodes = s[i - np.arange(4)]
        integral = cubic.integ()(s[i + 1]) - cubic.integ()(s[i])
        np.testing.assert_allclose(coef[i] @ cubic(nodes), integral, rtol=1e-12)
    np.testing.assert_allclose(coef[0], [s[1] - s[0], 0, 0, 0])  # the first step is Euler


def test_defaults_tables_are_diffusers_defaults():
    for name in S.SIGMA_SAMPLERS:
        cls, table = S.SAMPLERS[name]
        recorded = FIXTURE["defaults"][cls]
        for key, value in table.items():
            if key in recorded:  # JSON has no -inf: the fixture writes it as a string
                assert (str(value) if value == -np.inf else value) == recorded[key], (name, key)


@pytest.mark.parametrize("sampler, overrides, match", [
    ("euler_discrete", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler_discrete", {"timestep_type": "continuous"}, "timestep_type"),
    ("lms_discrete", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("dpm_solver_pp_sde", {"algorithm_type": "dpmsolver++"}, "sde-dpmsolver"),
    ("dpm_solver_pp_sde", {"solver_order": 3}, "solver_order"),
    ("euler_ancestral_discrete", {"use_karras_sigmas": True}, "has no setting 'use_karras_sigmas'"),
    ("heun_discrete", {"timestep_spacing": "even"}, "timestep_spacing"),
    ("ddim", {}, "sigma_setup is for"),
])
def test_settings_jaxdiff_cannot_walk_are_refused(sampler, overrides, match):
    with pytest.raises(SchedulerConfigError, match=match):
        S.sigma_setup(FIXTURE["configs"]["sd15"], 10, sampler, **overrides)


def test_a_config_key_the_class_lacks_is_ignored_as_diffusers_ignores_it():
    karras_config = {**FIXTURE["configs"]["sd15"], "use_karras_sigmas": True}
    plain = S.sigma_setup(FIXTURE["configs"]["sd15"], 10, "euler_ancestral_discrete")
    assert S.sigma_setup(karras_config, 10, "euler_ancestral_discrete").walk == plain.walk
    assert S.sigma_setup(karras_config, 10, "euler_discrete").walk == S.sigma_setup(
        FIXTURE["configs"]["sd15"], 10, "euler_discrete", use_karras_sigmas=True).walk


def test_sampler_arguments_are_checked():
    f = K.euler_discrete
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="walks sigmas"):
        f(network, None, x, timesteps=np.array([10, 0]))
    with pytest.raises(ValueError, match="prediction must be"):
        f(network, None, x, walk=K.euler_walk(DIFFUSERS_ABAR, 3), prediction="sample")
    with pytest.raises(ValueError, match="needs a schedule"):
        f(network, None, x)
    # without a walk: diffusers' class defaults on the schedule's alpha_bars (Karras sigmas with karras=True)
    sched = schedules.scaled_linear()
    np.testing.assert_array_equal(np.asarray(f(network, sched, x, steps=3)),
                                  np.asarray(f(network, None, x, walk=K.euler_walk(sched.alpha_bars, 3))))
    np.testing.assert_array_equal(
        np.asarray(f(network, sched, x, steps=3, karras=True)),
        np.asarray(f(network, None, x, walk=K.euler_walk(sched.alpha_bars, 3, karras=True))))
    # a bfloat16 start comes back in bfloat16, computed in float32
    low = f(network, sched, x.astype(jnp.bfloat16), steps=3)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(f(network, sched, x, steps=3)), rtol=1e-2)
