"""A labelled Gaussian mixture whose noisy scores are exact at every t.

If x0 ~ sum_k w_k N(mu_k, S_k), then under q(x_t | x0) each component stays Gaussian:
x_t | y=k ~ N(sqrt(abar) mu_k, abar S_k + (1 - abar) I). So p(x_t), p(x_t | y), p(y | x_t),
their scores and the exact eps are closed forms: the ground truth that samplers and
guidance are checked against before any network is trusted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.parametrization import eps_from_score
from jaxdiff.schedules import Schedule


@struct.dataclass
class GaussianMixture:
    """K weighted Gaussians in d dimensions. Label K (``null_label``) means "no label"."""

    weights: jax.Array  # (K,)
    means: jax.Array  # (K, d)
    covs: jax.Array  # (K, d, d)
    # S_k = U diag(lam) U^T, so abar S_k + (1 - abar) I = U diag(abar lam + 1 - abar) U^T: its inverse
    # and log-determinant are closed forms, with no matrix solve in a sampler's loop
    eigvals: jax.Array  # (K, d)
    eigvecs: jax.Array  # (K, d, d)

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def null_label(self) -> int:
        return self.weights.shape[0]

    @classmethod
    def create(cls, weights, means, covs) -> GaussianMixture:
        w, m, c = (np.asarray(a, np.float64) for a in (weights, means, covs))
        if w.ndim != 1 or m.ndim != 2 or c.ndim != 3 or not (len(w) == len(m) == len(c)):
            raise ValueError(f"need weights (K,), means (K, d), covs (K, d, d); got {w.shape}, {m.shape}, {c.shape}")
        if c.shape[1:] != (m.shape[1], m.shape[1]):
            raise ValueError(f"covs must be (K, {m.shape[1]}, {m.shape[1]}), got {c.shape}")
        if np.any(w <= 0):
            raise ValueError("weights must be positive")
        if np.any(np.linalg.eigvalsh(c) <= 0):
            raise ValueError("every covariance must be symmetric positive definite")
        lam, vecs = np.linalg.eigh((c + np.swapaxes(c, 1, 2)) / 2)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(f32(w / w.sum()), f32(m), f32(c), f32(lam), f32(vecs))

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """n draws of (x0, y)."""
        ky, kz = jax.random.split(key)
        y = jax.random.categorical(ky, jnp.log(self.weights), shape=(n,))
        chol = jnp.linalg.cholesky(self.covs)[y]
        z = jax.random.normal(kz, (n, self.means.shape[1]))
        return self.means[y] + jnp.einsum("nij,nj->ni", chol, z), y

    def _log_joint_and_scores(self, x, alpha_bar):
        """log w_k + log N(x; m_k, C_k) of shape (B, K) and each component's score (B, K, d), where
        x_t | y=k ~ N(sqrt(abar) mu_k, C_k = abar S_k + (1 - abar) I) for per-example abar (B,)."""
        abar = jnp.asarray(alpha_bar)[:, None, None]
        diff = x[:, None, :] - jnp.sqrt(abar) * self.means[None]
        var = abar * self.eigvals[None] + (1 - abar)  # (B, K, d): C_k's eigenvalues
        rotated = jnp.einsum("kdj,bkd->bkj", self.eigvecs, diff)  # U^T diff
        prec_diff = jnp.einsum("kdj,bkj->bkd", self.eigvecs, rotated / var)
        logdet = jnp.sum(jnp.log(var), axis=-1)
        d = x.shape[-1]
        log_n = -0.5 * (jnp.sum(diff * prec_diff, -1) + logdet + d * jnp.log(2 * jnp.pi))
        return jnp.log(self.weights) + log_n, -prec_diff

    def log_prob(self, x, alpha_bar, y=None):
        """log p(x_t) (y None or the null label) or log p(x_t | y), per example."""
        log_joint, _ = self._log_joint_and_scores(x, alpha_bar)
        return jax.nn.logsumexp(log_joint + self._label_mask(x, y), axis=-1) - jnp.where(
            self._is_conditional(x, y), jnp.take(jnp.log(self.weights), self._safe(x, y)), 0.0
        )

    def score(self, x, alpha_bar, y=None):
        """grad_x log p(x_t), or grad_x log p(x_t | y) for labels y (null label: marginal)."""
        log_joint, comp_scores = self._log_joint_and_scores(x, alpha_bar)
        resp = jax.nn.softmax(log_joint + self._label_mask(x, y), axis=-1)
        return jnp.einsum("bk,bkd->bd", resp, comp_scores)

    def log_posterior(self, x, alpha_bar):
        """log p(y | x_t) for every label, shape (B, K): the exact noisy classifier."""
        log_joint, _ = self._log_joint_and_scores(x, alpha_bar)
        return jax.nn.log_softmax(log_joint, axis=-1)

    def _is_conditional(self, x, y):
        if y is None:
            return jnp.zeros((x.shape[0],), bool)
        return jnp.broadcast_to(jnp.asarray(y), (x.shape[0],)) < self.num_components

    def _safe(self, x, y):
        y = jnp.zeros((x.shape[0],), jnp.int32) if y is None else jnp.broadcast_to(jnp.asarray(y), (x.shape[0],))
        return jnp.minimum(y, self.num_components - 1)

    def _label_mask(self, x, y):
        """0 on the allowed components, -inf elsewhere: label y keeps only component y."""
        onehot = jax.nn.one_hot(self._safe(x, y), self.num_components, dtype=bool)
        keep = jnp.where(self._is_conditional(x, y)[:, None], onehot, True)
        return jnp.where(keep, 0.0, -jnp.inf)

    # Closures in the shapes the samplers and guidance take.
    def eps_fn(self, schedule: Schedule, y=None):
        """Exact ``eps_fn(x_t, t)`` of p(x_t) or of p(x_t | y)."""
        return lambda x, t: self.cond_eps_fn(schedule)(x, t, y)

    def cond_eps_fn(self, schedule: Schedule):
        """Exact ``cond_eps_fn(x_t, t, y)``; y = null_label gives the unconditional eps."""

        def fn(x, t, y):
            abar = schedule.alpha_bar(t)
            return eps_from_score(self.score(x, abar, y), alpha_bar=abar)

        return fn

    def classifier_log_prob(self, schedule: Schedule):
        """Exact ``log_prob_fn(x_t, t, y) -> (B,)`` = log p(y | x_t)."""

        def fn(x, t, y):
            logp = self.log_posterior(x, schedule.alpha_bar(t))
            return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

        return fn
