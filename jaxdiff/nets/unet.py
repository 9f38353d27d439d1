"""The textbook's conditional U-Net (UNetCond), stateless, with its size as configuration."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import Attention, ConvBlock, sinusoidal_embedding


class UNet(nn.Module):
    """eps_theta(x_t, t, y): channels per level, max-pool down, bilinear up, skip concatenation.

    The condition vector is an MLP of the sinusoidal time encoding plus a label embedding;
    label ``num_classes`` is the null label ("no condition") used by classifier-free guidance.
    ``num_classes = 0`` gives an unconditional model (every label is the null one).
    Defaults follow the textbook: channels 64/128/256, one block per level, no attention.
    Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on GPU/TPU).

    With ``cross_attention_levels``, ``context`` (B, L, D) tokens (a text encoder's output) and
    their ``context_mask`` (B, L) enter through cross-attention at those levels, as in Stable
    Diffusion's U-Net; queries come from the image features.
    """

    num_classes: int = 10
    channels: Sequence[int] = (64, 128, 256)
    blocks_per_level: int = 1
    attention_levels: Sequence[int] = ()
    cross_attention_levels: Sequence[int] = ()
    num_heads: int = 4
    cond_dim: int = 256
    residual: bool = True
    out_channels: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None) -> jax.Array:
        if self.cross_attention_levels and context is None:
            raise ValueError("this U-Net has cross-attention levels: pass context (B, L, D)")
        if y is None:
            y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        temb = sinusoidal_embedding(t, self.cond_dim)
        temb = nn.Dense(self.cond_dim, dtype=self.dtype)(temb)
        temb = nn.Dense(self.cond_dim, dtype=self.dtype)(nn.silu(temb))
        cond = temb + nn.Embed(self.num_classes + 1, self.cond_dim, dtype=self.dtype)(y)

        h = nn.Conv(self.channels[0], (3, 3), dtype=self.dtype)(x.astype(self.dtype))
        skips = []
        for level, ch in enumerate(self.channels):
            for _ in range(self.blocks_per_level):
                h = ConvBlock(ch, self.residual, self.dtype)(h, cond)
            h = self._attend(h, level, context, context_mask)
            if level < len(self.channels) - 1:
                skips.append(h)
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        for level in reversed(range(len(self.channels) - 1)):
            skip = skips.pop()
            h = jax.image.resize(h, (h.shape[0], *skip.shape[1:3], h.shape[-1]), "bilinear")
            h = jnp.concatenate([h, skip], axis=-1)
            for _ in range(self.blocks_per_level):
                h = ConvBlock(self.channels[level], self.residual, self.dtype)(h, cond)
            h = self._attend(h, level, context, context_mask)
        out = nn.Conv(self.out_channels or x.shape[-1], (1, 1), dtype=jnp.float32)(h.astype(jnp.float32))
        return out

    def _attend(self, h, level, context, context_mask):
        if level in self.attention_levels:
            h = Attention(self.num_heads, self.dtype)(h)
        if level in self.cross_attention_levels:
            h = Attention(self.num_heads, self.dtype)(h, context, context_mask)
        return h


def textbook_unet(**kwargs) -> UNet:
    """The textbook's network (placeholder until the U-Net family lands)."""
    return UNet(**kwargs)
