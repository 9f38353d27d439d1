"""Samplers over an ``eps_fn(x_t, t) -> eps`` closure, each one ``lax.scan`` over timesteps.

The samplers know nothing of labels, guidance or parameters: any function of that shape
will do. ``t`` reaches ``eps_fn`` as an int32 array of shape (B,), in 1..T (see
``jaxdiff.schedules``). Every sampler traces under ``jax.jit``; wrap the code that builds
``eps_fn`` from its parameters and condition in one ``jit`` so that a new key or a new
condition reuses the compiled program, e.g.::

    @jax.jit
    def generate(params, labels, key):
        eps_fn = guidance.cfg(model_eps(params), labels, null, gamma=3.0)
        return sampling.ddim(eps_fn, schedule, jax.random.normal(key, shape), steps=50)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.parametrization import eps_from_x0, x0_from_eps
from jaxdiff.schedules import Schedule, timesteps

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_common(x_T, clip_x0) -> None:
    if getattr(x_T, "ndim", 0) < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must have a leading batch axis, got shape {getattr(x_T, 'shape', None)}")
    if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive number, got {clip_x0!r}")


def _predict(eps_fn, x, t, abar, clip_x0):
    """eps and x0 predictions at one step, with x0 optionally clipped (eps made consistent)."""
    eps = eps_fn(x, jnp.full((x.shape[0],), t, dtype=jnp.int32))
    x0 = x0_from_eps(x, eps, alpha_bar=abar)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_x0(x, x0, alpha_bar=abar)
    return eps, x0


def ddpm(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    clip_x0: float | None = None,
    variance: str = "beta",
) -> jax.Array:
    """Ancestral sampling over all T steps, the textbook's ``denoise`` in a scan.

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, with no noise
    at t = 1. ``variance="beta"`` is sigma_t^2 = beta_t (the textbook's);
    ``"posterior"`` is beta_t (1 - abar_{t-1}) / (1 - abar_t).
    """
    _check_common(x_T, clip_x0)
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    T = schedule.num_timesteps
    ts = jnp.arange(T, 0, -1, dtype=jnp.int32)

    def step(x, inputs):
        t, k = inputs
        beta, alpha = schedule.betas[t - 1], schedule.alphas[t - 1]
        abar, abar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - 1)
        eps, _ = _predict(eps_fn, x, t, abar, clip_x0)
        mean = (x - beta / jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(alpha)
        var = beta if variance == "beta" else beta * (1.0 - abar_prev) / (1.0 - abar)
        sigma = jnp.where(t > 1, jnp.sqrt(var), 0.0).astype(x.dtype)
        return mean + sigma * jax.random.normal(k, x.shape, x.dtype), None

    x, _ = jax.lax.scan(step, x_T, (ts, jax.random.split(key, T)))
    return x


def ddim(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    clip_x0: float | None = None,
    spacing: str = "uniform",
) -> jax.Array:
    """DDIM (Song et al.) over ``steps`` evenly spaced timesteps; eta = 0 is deterministic,
    eta = 1 matches DDPM's posterior variance at each jump."""
    _check_common(x_T, clip_x0)
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta > 0 and key is None:
        raise ValueError("ddim with eta > 0 draws noise: pass a PRNG key")
    ts = jnp.asarray(timesteps(schedule, steps, spacing))
    prev = jnp.concatenate([ts[1:], jnp.zeros((1,), jnp.int32)])
    keys = jax.random.split(key if key is not None else jax.random.key(0), len(ts))

    def step(x, inputs):
        t, s, k = inputs
        abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
        eps, x0 = _predict(eps_fn, x, t, abar_t, clip_x0)
        x_s = jnp.sqrt(abar_s) * x0
        if eta > 0:
            sigma = eta * jnp.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
            x_s += jnp.sqrt(jnp.maximum(1 - abar_s - sigma**2, 0.0)) * eps
            x_s += sigma * jax.random.normal(k, x.shape, x.dtype)
        else:
            x_s += jnp.sqrt(1 - abar_s) * eps
        return x_s.astype(x.dtype), None

    x, _ = jax.lax.scan(step, x_T, (ts, prev, keys))
    return x


def dpm_solver_pp(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    *,
    steps: int = 20,
    clip_x0: float | None = None,
    spacing: str = "logsnr",
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in the data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_s - lambda_t, one step from t to s is
    x_s = sigma_s / sigma_t x_t + (alpha_s - alpha_t sigma_s / sigma_t) D, where
    D = x0_t + h / (2 h_prev) (x0_t - x0_prev). The first step and the last (to t = 0)
    are first order, so the last returns D = x0_t itself.
    """
    _check_common(x_T, clip_x0)
    ts = jnp.asarray(timesteps(schedule, steps, spacing))
    prev = jnp.concatenate([ts[1:], jnp.zeros((1,), jnp.int32)])
    abar_t, abar_s = schedule.alpha_bar(ts), schedule.alpha_bar(prev)
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t)
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1 - abar_s)
    lam_t = jnp.log(alpha_t / sigma_t)
    final = prev == 0
    # lambda at t = 0 is +inf; the last step is first order, so its h is never used
    lam_s = jnp.where(final, 0.0, jnp.log(alpha_s / jnp.where(final, 1.0, sigma_s)))
    h = lam_s - lam_t
    h_prev = jnp.concatenate([jnp.ones((1,)), h[:-1]])
    first = jnp.arange(len(ts)) == 0
    w = jnp.where(first | final, 0.0, h / (2 * h_prev))

    def step(carry, inputs):
        x, x0_prev = carry
        t, ab_t, a_t, s_t, a_s, s_s, w_i = inputs
        _, x0 = _predict(eps_fn, x, t, ab_t, clip_x0)
        d = x0 + w_i * (x0 - x0_prev)
        x_s = (s_s / s_t) * x + (a_s - a_t * s_s / s_t) * d
        return (x_s.astype(x.dtype), x0), None

    (x, _), _ = jax.lax.scan(
        step, (x_T, jnp.zeros_like(x_T)), (ts, abar_t, alpha_t, sigma_t, alpha_s, sigma_s, w)
    )
    return x
