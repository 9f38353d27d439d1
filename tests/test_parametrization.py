"""Every mapping against float64 NumPy written from the equations, and Tweedie against a closed form."""

import jax.numpy as jnp
import numpy as np

from jaxdiff import mixture, parametrization as P

rng = np.random.default_rng(0)
B = 6
X_T = rng.normal(size=(B, 3, 3, 2))
EPS = rng.normal(size=(B, 3, 3, 2))
X0 = rng.normal(size=(B, 3, 3, 2))
ABAR = rng.uniform(0.01, 0.99, size=B)
A = ABAR[:, None, None, None]


def close(got, expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-5, atol=2e-5)


def f32(a):
    return jnp.asarray(a, jnp.float32)


def test_score_eps_eq_10_1():
    close(P.score_from_eps(f32(EPS), alpha_bar=f32(ABAR)), -EPS / np.sqrt(1 - A))
    close(P.eps_from_score(f32(EPS), alpha_bar=f32(ABAR)), -np.sqrt(1 - A) * EPS)


def test_x0_eps():
    close(P.x0_from_eps(f32(X_T), f32(EPS), alpha_bar=f32(ABAR)), (X_T - np.sqrt(1 - A) * EPS) / np.sqrt(A))
    close(P.eps_from_x0(f32(X_T), f32(X0), alpha_bar=f32(ABAR)), (X_T - np.sqrt(A) * X0) / np.sqrt(1 - A))


def test_v():
    v = np.sqrt(A) * EPS - np.sqrt(1 - A) * X0
    close(P.v_from_eps(f32(EPS), f32(X0), alpha_bar=f32(ABAR)), v)
    x_t = np.sqrt(A) * X0 + np.sqrt(1 - A) * EPS
    close(P.eps_from_v(f32(x_t), f32(v), alpha_bar=f32(ABAR)), EPS)
    close(P.x0_from_v(f32(x_t), f32(v), alpha_bar=f32(ABAR)), X0)


def test_tweedie_eq_10_4():
    score = -EPS / np.sqrt(1 - A)
    close(P.tweedie_x0(f32(X_T), f32(score), alpha_bar=f32(ABAR)), (X_T + (1 - A) * score) / np.sqrt(A))


def test_scalar_alpha_bar_broadcasts():
    close(P.x0_from_eps(f32(X_T), f32(EPS), alpha_bar=0.3), (X_T - np.sqrt(0.7) * EPS) / np.sqrt(0.3))


def test_tweedie_on_a_gaussian_equals_its_posterior_mean():
    """x0 ~ N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)."""
    mu, s2 = np.array([1.5, -0.5]), 0.7
    g = mixture.GaussianMixture.create([1.0], [mu], [np.eye(2) * s2])
    x_t = rng.normal(size=(B, 2)) * 2
    abar = ABAR[:, None]
    expected = mu + np.sqrt(abar) * s2 / (abar * s2 + 1 - abar) * (x_t - np.sqrt(abar) * mu)
    score = g.score(f32(x_t), f32(ABAR))
    close(P.tweedie_x0(f32(x_t), score, alpha_bar=f32(ABAR)), expected)
