"""The mappings between eps, score, x0 and v, each against an independent computation: the forward
process (schedules.add_noise), and closed forms for Gaussian data (the optimal eps predictor is a
linear regression of eps on x_t; Tweedie's mean is the Gaussian posterior mean)."""

import jax.numpy as jnp
import numpy as np

from jaxdiff import mixture, schedules
from jaxdiff import parametrization as P


def close(got, expected, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol, atol=tol)


def f32(a):
    return jnp.asarray(a, jnp.float32)


def forward(seed=0, B=6):
    """x0, eps, abar and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps made by the library's forward process."""
    rng = np.random.default_rng(seed)
    sched = schedules.linear()
    t = rng.integers(1, 1001, size=B)
    x0, eps = rng.normal(size=(B, 3, 3, 2)), rng.normal(size=(B, 3, 3, 2))
    x_t = np.asarray(schedules.add_noise(sched, f32(x0), jnp.asarray(t), f32(eps)), np.float64)
    return x0, eps, np.asarray(sched.alpha_bar(jnp.asarray(t)), np.float64), x_t


def test_x0_and_eps_invert_the_forward_process():
    x0, eps, abar, x_t = forward()
    close(P.x0_from_eps(f32(x_t), f32(eps), alpha_bar=f32(abar)), x0, tol=2e-3)  # abar near 0 amplifies
    close(P.eps_from_x0(f32(x_t), f32(x0), alpha_bar=f32(abar)), eps, tol=2e-3)


def test_v_carries_both_and_gives_them_back():
    x0, eps, abar, x_t = forward(1)
    v = P.v_from_eps(f32(eps), f32(x0), alpha_bar=f32(abar))
    close(P.eps_from_v(f32(x_t), v, alpha_bar=f32(abar)), eps, tol=1e-4)
    close(P.x0_from_v(f32(x_t), v, alpha_bar=f32(abar)), x0, tol=1e-4)
    # v is the velocity d x_t / d phi on the circle x_t = cos(phi) x0 + sin(phi) eps, phi = arccos(sqrt(abar))
    phi = np.arccos(np.sqrt(abar))[:, None, None, None]
    close(v, -np.sin(phi) * x0 + np.cos(phi) * eps, tol=1e-4)


def gaussian_case(seed=2):
    """x0 ~ N(mu, s2 I) in 2-D: p(x_t) = N(sqrt(abar) mu, (abar s2 + 1 - abar) I)."""
    rng = np.random.default_rng(seed)
    mu, s2 = np.array([1.5, -0.5]), 0.7
    abar = rng.uniform(0.01, 0.99, size=6)
    x_t = rng.normal(size=(6, 2)) * 2
    var = (abar * s2 + 1 - abar)[:, None]
    return mu, s2, abar, x_t, var


def test_eq_10_1_the_score_is_minus_eps_over_sqrt_one_minus_abar():
    """For Gaussian data E[eps | x_t] is the regression Cov(eps, x_t) / Var(x_t) (x_t - E x_t)
    = sqrt(1 - abar) (x_t - sqrt(abar) mu) / var, and the score is -(x_t - sqrt(abar) mu) / var:
    eps_from_score must map the one to the other, and score_from_eps back."""
    mu, s2, abar, x_t, var = gaussian_case()
    score = -(x_t - np.sqrt(abar)[:, None] * mu) / var
    best_eps = np.sqrt(1 - abar)[:, None] * (x_t - np.sqrt(abar)[:, None] * mu) / var
    close(P.eps_from_score(f32(score), alpha_bar=f32(abar)), best_eps)
    close(P.score_from_eps(f32(best_eps), alpha_bar=f32(abar)), score)
    close(P.score_from_eps(f32(best_eps), alpha_bar=0.3)[:1],
          -best_eps[:1] / np.sqrt(0.7))  # a scalar abar broadcasts


def test_tweedie_on_a_gaussian_equals_its_posterior_mean():
    """x0 ~ N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)."""
    mu, s2, abar, x_t, var = gaussian_case(3)
    g = mixture.GaussianMixture.create([1.0], [mu], [np.eye(2) * s2])
    expected = mu + np.sqrt(abar)[:, None] * s2 / var * (x_t - np.sqrt(abar)[:, None] * mu)
    score = g.score(f32(x_t), f32(abar))
    close(P.tweedie_x0(f32(x_t), score, alpha_bar=f32(abar)), expected)
