"""Conversions between the network targets: eps, score, x0 and v (textbook eqs. 10-1, 10-4).

Each takes ``alpha_bar`` = abar_t, a scalar or per-example array of shape (B,) that is
broadcast against x. With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:

- score:  grad log p(x_t) = -eps / sqrt(1 - abar)            (eq. 10-1)
- Tweedie: E[x0 | x_t] = (x_t + (1 - abar) score) / sqrt(abar) (eq. 10-4)
- v = sqrt(abar) eps - sqrt(1 - abar) x0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.schedules import expand_to


def score_from_eps(eps: jax.Array, *, alpha_bar) -> jax.Array:
    return -eps / jnp.sqrt(1.0 - expand_to(alpha_bar, eps))


def eps_from_score(score: jax.Array, *, alpha_bar) -> jax.Array:
    return -jnp.sqrt(1.0 - expand_to(alpha_bar, score)) * score


def x0_from_eps(x_t: jax.Array, eps: jax.Array, *, alpha_bar) -> jax.Array:
    abar = expand_to(alpha_bar, x_t)
    return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(x_t: jax.Array, x0: jax.Array, *, alpha_bar) -> jax.Array:
    abar = expand_to(alpha_bar, x_t)
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def tweedie_x0(x_t: jax.Array, score: jax.Array, *, alpha_bar) -> jax.Array:
    """E[x0 | x_t] from the score of p(x_t) (Tweedie's formula)."""
    abar = expand_to(alpha_bar, x_t)
    return (x_t + (1.0 - abar) * score) / jnp.sqrt(abar)


def v_from_eps(eps: jax.Array, x0: jax.Array, *, alpha_bar) -> jax.Array:
    abar = expand_to(alpha_bar, eps)
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def eps_from_v(x_t: jax.Array, v: jax.Array, *, alpha_bar) -> jax.Array:
    abar = expand_to(alpha_bar, x_t)
    return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * x_t


def x0_from_v(x_t: jax.Array, v: jax.Array, *, alpha_bar) -> jax.Array:
    abar = expand_to(alpha_bar, x_t)
    return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * v
