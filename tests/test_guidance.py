"""Guidance on a mixture whose conditional eps and classifier are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assign

from jaxdiff import guidance, sampling


def points(n, d=2, scale=2.0, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) * scale, jnp.float32)


def times(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed + 1000).integers(1, 1001, size=n), jnp.int32)


def labels(n, k=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed + 2000).integers(0, k, n))


def test_cfg_is_one_batched_forward_pass(mixture2d, linear_schedule):
    calls = []
    exact = mixture2d.cond_eps_fn(linear_schedule)

    def model(x, t, y):
        calls.append(x.shape[0])
        return exact(x, t, y)

    y = jnp.array([0, 1, 2])
    guidance.cfg(model, y, mixture2d.null_label, 2.0)(points(3), times(3))
    assert calls == [6]


def test_cfg_formula_and_its_endpoints(mixture2d, linear_schedule):
    exact = mixture2d.cond_eps_fn(linear_schedule)
    x, t, y = points(64, seed=1), times(64, seed=1), labels(64, seed=1)
    null = jnp.full((64,), mixture2d.null_label)
    e_c, e_u = np.asarray(exact(x, t, y)), np.asarray(exact(x, t, null))
    for gamma in (0.0, 1.0, 3.5):
        got = guidance.cfg(exact, y, mixture2d.null_label, gamma)(x, t)
        np.testing.assert_allclose(got, e_u + gamma * (e_c - e_u), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(guidance.cfg(exact, y, mixture2d.null_label, 1.0)(x, t), e_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(guidance.cfg(exact, y, mixture2d.null_label, 0.0)(x, t), e_u, rtol=1e-4, atol=1e-5)
    # per-example gamma, for a grid of guidance strengths in one batch
    gammas = jnp.linspace(0, 4, 64)
    got = guidance.cfg(exact, y, mixture2d.null_label, gammas)(x, t)
    np.testing.assert_allclose(got, e_u + np.asarray(gammas)[:, None] * (e_c - e_u), rtol=1e-4, atol=1e-4)


def test_conditional_sampling_gives_the_asked_component(mixture2d, linear_schedule):
    n = 4000
    x_T = jax.random.normal(jax.random.key(0), (n, 2))
    y = jnp.full((n,), 2)
    eps_fn = guidance.cfg(mixture2d.cond_eps_fn(linear_schedule), y, mixture2d.null_label, 1.0)
    x = np.asarray(sampling.dpm_solver_pp(eps_fn, linear_schedule, x_T, steps=20))
    # exact draws of component 2 are grouped with it at this rate (a few tail points are not)
    x_ref, y_ref = mixture2d.sample(jax.random.key(9), 100_000)
    rate = np.mean(assign(mixture2d, x_ref[np.asarray(y_ref) == 2]) == 2)
    assert abs(np.mean(assign(mixture2d, x) == 2) - rate) < 0.006
    np.testing.assert_allclose(x.mean(0), mixture2d.means[2], atol=0.05)
    rel = np.linalg.norm(np.cov(x.T) - mixture2d.covs[2]) / np.linalg.norm(mixture2d.covs[2])
    assert rel < 0.12


def mass_on(gm, x, label):
    """Mean exact p(label | x0) over samples: how much of the output is class ``label``."""
    return float(jnp.mean(jnp.exp(gm.log_posterior(jnp.asarray(x), jnp.ones(len(x)))[:, label])))


def test_guidance_scale_moves_mass_toward_the_label(overlapping2d, linear_schedule):
    n = 4000
    x_T = jax.random.normal(jax.random.key(1), (n, 2))
    y = jnp.zeros((n,), jnp.int32)
    exact = overlapping2d.cond_eps_fn(linear_schedule)
    run = jax.jit(lambda g: sampling.dpm_solver_pp(guidance.cfg(exact, y, overlapping2d.null_label, g), linear_schedule,
                                                   x_T, steps=20))
    mass = {g: mass_on(overlapping2d, run(g), 0) for g in (0.0, 1.0, 3.0)}
    # unconditional: half the mass; conditional: the exact E[p(0|x0) | y=0] (~0.74 here); more beyond
    assert abs(mass[0.0] - 0.5) < 0.03
    x_c, _ = overlapping2d.sample(jax.random.key(2), 200_000)
    exact_cond = mass_on(overlapping2d, x_c[np.asarray(_) == 0], 0)
    assert abs(mass[1.0] - exact_cond) < 0.02
    assert mass[3.0] > mass[1.0] + 0.05


def test_negative_condition_steers_away_from_it(overlapping2d, linear_schedule):
    n = 4000
    x_T = jax.random.normal(jax.random.key(3), (n, 2))
    exact = overlapping2d.cond_eps_fn(linear_schedule)
    y, negative = jnp.zeros((n,), jnp.int32), jnp.ones((n,), jnp.int32)
    with_null = sampling.dpm_solver_pp(guidance.cfg(exact, y, overlapping2d.null_label, 2.0), linear_schedule, x_T,
                                       steps=20)
    with_neg = sampling.dpm_solver_pp(guidance.cfg(exact, y, negative, 2.0), linear_schedule, x_T, steps=20)
    assert mass_on(overlapping2d, with_neg, 1) < mass_on(overlapping2d, with_null, 1) - 0.03


def np_log_posterior(gm, x, abar, y):
    w, mu, cov = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    logs = []
    for k in range(len(w)):
        c = abar * cov[k] + (1 - abar) * np.eye(len(x))
        diff = x - np.sqrt(abar) * mu[k]
        logs.append(np.log(w[k]) - 0.5 * (diff @ np.linalg.solve(c, diff) + np.log(np.linalg.det(c))))
    logs = np.array(logs)
    return logs[y] - np.log(np.exp(logs).sum())


def test_classifier_gradient_matches_finite_differences(mixture2d, linear_schedule):
    """The guidance term -gamma sqrt(1 - abar) grad log p(y|x_t) against central differences in float64."""
    zero = lambda x, t: jnp.zeros_like(x)
    log_prob = mixture2d.classifier_log_prob(linear_schedule)
    x, t, y = points(6, scale=1.0, seed=2), times(6, seed=2), labels(6, seed=2)
    gamma = 1.7
    got = np.asarray(guidance.classifier_guidance(zero, log_prob, y, gamma, linear_schedule)(x, t))
    h = 1e-5
    for i in range(6):
        abar = float(linear_schedule.alpha_bar(t[i]))
        xi = np.asarray(x[i], np.float64)
        f = lambda z, abar=abar, i=i: np_log_posterior(mixture2d, z, abar, int(y[i]))
        grad = np.array([(f(xi + h * e) - f(xi - h * e)) / (2 * h) for e in np.eye(2)])
        np.testing.assert_allclose(got[i], -gamma * np.sqrt(1 - abar) * grad, rtol=2e-3, atol=2e-4)


def test_exact_classifier_guidance_at_gamma_1_is_the_conditional(mixture2d, linear_schedule):
    exact = mixture2d.cond_eps_fn(linear_schedule)
    x, t, y = points(128, seed=3), times(128, seed=3), labels(128, seed=3)
    guided = guidance.classifier_guidance(
        mixture2d.eps_fn(linear_schedule), mixture2d.classifier_log_prob(linear_schedule), y, 1.0, linear_schedule
    )
    np.testing.assert_allclose(guided(x, t), exact(x, t, y), rtol=1e-3, atol=2e-4)
    # and as a sampler: component y, as conditional sampling gives
    n = 3000
    yy = jnp.full((n,), 1)
    guided = guidance.classifier_guidance(
        mixture2d.eps_fn(linear_schedule), mixture2d.classifier_log_prob(linear_schedule), yy, 1.0, linear_schedule
    )
    xs = np.asarray(sampling.dpm_solver_pp(guided, linear_schedule, jax.random.normal(jax.random.key(4), (n, 2)),
                                           steps=20))
    assert np.mean(assign(mixture2d, xs) == 1) > 0.99
    np.testing.assert_allclose(xs.mean(0), mixture2d.means[1], atol=0.05)


def test_log_prob_from_logits(mixture2d):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)), jnp.float32)
    y = jnp.array([0, 2, 1, 1, 0])
    got = guidance.log_prob_from_logits(lambda x, t: logits)(None, None, y)
    lg = np.asarray(logits, np.float64)
    expected = lg[np.arange(5), np.asarray(y)] - np.log(np.exp(lg).sum(1))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), np.array([1.0, np.inf])])
def test_non_finite_gamma_is_refused(mixture2d, linear_schedule, gamma):
    with pytest.raises(ValueError, match="gamma"):
        guidance.cfg(mixture2d.cond_eps_fn(linear_schedule), jnp.array([0, 1]), 3, gamma)
    with pytest.raises(ValueError, match="gamma"):
        guidance.classifier_guidance(lambda x, t: x, lambda x, t, y: x[:, 0], jnp.array([0]), gamma, linear_schedule)


def test_guidance_with_a_python_gamma_inside_jit(mixture2d, linear_schedule):
    """A constant gamma written into jitted code is checked on the host, not traced."""
    exact = mixture2d.cond_eps_fn(linear_schedule)
    x, t, y = points(4), times(4), jnp.array([0, 1, 2, 0])
    f = jax.jit(lambda x, t: guidance.cfg(exact, y, mixture2d.null_label, 3.0)(x, t))
    np.testing.assert_allclose(f(x, t), guidance.cfg(exact, y, mixture2d.null_label, 3.0)(x, t), rtol=1e-5, atol=1e-6)
    log_prob = mixture2d.classifier_log_prob(linear_schedule)
    guided = lambda x, t: guidance.classifier_guidance(mixture2d.eps_fn(linear_schedule), log_prob, y, 2.0,
                                                       linear_schedule)(x, t)
    np.testing.assert_allclose(jax.jit(guided)(x, t), guided(x, t), rtol=1e-5, atol=1e-6)
    # and it is the guidance formula: eps - 2 sqrt(1 - abar) grad log p(y | x_t)
    grad = jax.grad(lambda z: jnp.sum(log_prob(z, t, y)))(x)
    expected = (mixture2d.eps_fn(linear_schedule)(x, t)
                - 2.0 * jnp.sqrt(1 - linear_schedule.alpha_bar(t))[:, None] * grad)
    np.testing.assert_allclose(jax.jit(guided)(x, t), expected, rtol=1e-5, atol=1e-6)
