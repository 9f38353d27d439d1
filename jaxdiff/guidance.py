"""Guidance: each function turns eps functions into another ``eps_fn(x_t, t) -> eps``.

A conditional model is ``cond_eps_fn(x_t, t, c) -> eps`` where ``c`` is a batch of
conditions (labels, text embeddings, any pytree with a leading batch axis). Guidance never
sees a sampler, and samplers never see conditions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule, expand_to

CondEpsFn = Callable[[jax.Array, jax.Array, object], jax.Array]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_gamma(gamma) -> None:
    """Reject a non-finite guidance weight when it is known on the host; traced values pass.

    The check runs in NumPy, so a Python number passed while tracing (inside ``jit``) is
    checked too, without creating a traced boolean.
    """
    if isinstance(gamma, jax.core.Tracer):
        return
    try:
        values = np.asarray(gamma, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"gamma must be a number or an array of numbers, got {gamma!r}") from err
    if not np.all(np.isfinite(values)):
        raise ValueError(f"gamma must be finite, got {gamma!r}")


def cfg(cond_eps_fn: CondEpsFn, cond, uncond, gamma) -> EpsFn:
    """Classifier-free guidance: eps_u + gamma (eps_c - eps_u).

    Both halves run as ONE forward pass over a doubled batch. ``uncond`` is the null
    condition, or a negative condition (a "negative prompt") to steer away from; it is
    broadcast to the shape of ``cond``. ``gamma`` is a scalar or per-example (B,).
    gamma = 0 is unconditional, gamma = 1 conditional, gamma > 1 pushes further toward c.
    """
    _check_gamma(gamma)
    uncond = jax.tree.map(lambda c, u: jnp.broadcast_to(jnp.asarray(u, jnp.asarray(c).dtype), jnp.shape(c)),
                          cond, uncond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def eps_fn(x, t):
        n = x.shape[0]
        eps = cond_eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        eps_c, eps_u = eps[:n], eps[n:]
        return eps_u + expand_to(gamma, x).astype(x.dtype) * (eps_c - eps_u)

    return eps_fn


def log_prob_from_logits(logits_fn: Callable[[jax.Array, jax.Array], jax.Array]):
    """Turn a noisy classifier ``logits_fn(x_t, t) -> (B, K)`` into
    ``log_prob_fn(x_t, t, y) -> (B,)`` = log softmax(logits)[y]."""

    def log_prob_fn(x, t, y):
        logp = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

    return log_prob_fn


def classifier_guidance(eps_fn: EpsFn, log_prob_fn, y, gamma, schedule: Schedule) -> EpsFn:
    """Classifier guidance (eq. 10-6 in eps form): eps - gamma sqrt(1 - abar_t) grad_x log p(y | x_t).

    ``log_prob_fn(x_t, t, y) -> (B,)`` is the noisy classifier's per-example log-probability.
    The gradient of its sum is each example's own gradient, since examples do not interact.
    """
    _check_gamma(gamma)

    def guided(x, t):
        grad = jax.grad(lambda x_: jnp.sum(log_prob_fn(x_, t, y)))(x)
        scale = expand_to(gamma * jnp.sqrt(1.0 - schedule.alpha_bar(t)), x)
        return eps_fn(x, t) - (scale * grad).astype(x.dtype)

    return guided
