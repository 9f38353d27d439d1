"""The noisy classifier p_phi(y | x_t, t) that classifier guidance differentiates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import ConvBlock, sinusoidal_embedding


class NoisyClassifier(nn.Module):
    """Logits over ``num_classes`` for an image noised to timestep t: conditioned conv blocks on
    the time encoding, max-pooling, global average pooling, a linear head.
    ``features=True`` returns the penultimate features instead of logits."""

    num_classes: int = 10
    channels: Sequence[int] = (32, 64, 128)
    cond_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, features: bool = False) -> jax.Array:
        temb = sinusoidal_embedding(t, self.cond_dim)
        cond = nn.Dense(self.cond_dim, dtype=self.dtype)(nn.silu(nn.Dense(self.cond_dim, dtype=self.dtype)(temb)))
        h = nn.Conv(self.channels[0], (3, 3), dtype=self.dtype)(x.astype(self.dtype))
        for level, ch in enumerate(self.channels):
            h = ConvBlock(ch, True, self.dtype)(h, cond)
            if level < len(self.channels) - 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        if features:
            return h
        return nn.Dense(self.num_classes, dtype=jnp.float32)(h)


class EvalClassifier(nn.Module):
    """A clean-image classifier used only to judge samples (accuracy, and FID in its
    penultimate ``feature_dim``-d features); never used for guidance."""

    num_classes: int = 10
    channels: Sequence[int] = (32, 64, 128)
    feature_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
        h = x.astype(self.dtype)
        for level, ch in enumerate(self.channels):
            for _ in range(2):
                h = nn.Conv(ch, (3, 3), dtype=self.dtype)(h)
                h = nn.silu(nn.GroupNorm(num_groups=min(32, ch // 4), dtype=self.dtype)(h))
            if level < len(self.channels) - 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        h = nn.silu(nn.Dense(self.feature_dim, dtype=jnp.float32)(h))
        if features:
            return h
        return nn.Dense(self.num_classes, dtype=jnp.float32)(h)
