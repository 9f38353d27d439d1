"""Building blocks shared by the networks: time encoding, the conditioned conv block, attention."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """The transformer's sin/cos encoding of integer timesteps, shape (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def group_norm(features: int, dtype) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no mutable batch statistics, and the same result at any batch size
    return nn.GroupNorm(num_groups=min(32, features // 4) or 1, dtype=dtype)


class ConvBlock(nn.Module):
    """Two 3x3 conv-norm-SiLU layers; an MLP of the condition vector is added to the input first,
    as the textbook's ConvBlock does. ``residual`` adds a skip around the block."""

    features: int
    residual: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        c = nn.Dense(x.shape[-1], dtype=self.dtype, name="cond_mlp")(nn.silu(cond))
        h = x + c[:, None, None, :].astype(x.dtype)
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(group_norm(self.features, self.dtype)(h))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(group_norm(self.features, self.dtype)(h))
        if self.residual:
            skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
            h = h + skip
        return h


class Attention(nn.Module):
    """Pre-norm multi-head attention over the pixels of a feature map, with a residual.

    Without ``context`` it is self-attention; with ``context`` (B, L, D) the keys and values
    come from it (cross-attention, as Stable Diffusion's U-Net does with text tokens)."""

    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        b, h, w, c = x.shape
        q = group_norm(c, self.dtype)(x).reshape(b, h * w, c)
        kv = q if context is None else context.astype(self.dtype)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(q, kv, mask=mask)
        return x + out.reshape(b, h, w, c)
