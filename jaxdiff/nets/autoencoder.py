"""A KL-regularised convolutional autoencoder: 28x28 images <-> small latents (Stable Diffusion's first stage).

28x28 is padded to 32x32, halved twice to 8x8 with ``latent_channels`` channels (4 x 8 x 8 by
default). The encoder gives the mean and log-variance of a diagonal Gaussian posterior.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import group_norm

PAD = 2  # 28 + 2 * 2 = 32, so two halvings land on 8


class ResBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(nn.silu(group_norm(x.shape[-1], self.dtype)(x)))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(nn.silu(group_norm(self.features, self.dtype)(h)))
        skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
        return skip + h


class Encoder(nn.Module):
    channels: Sequence[int] = (32, 64, 128)
    latent_channels: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = jnp.pad(x.astype(self.dtype), ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), constant_values=-1.0)
        h = nn.Conv(self.channels[0], (3, 3), dtype=self.dtype)(h)
        for i, ch in enumerate(self.channels):
            h = ResBlock(ch, self.dtype)(h)
            if i < len(self.channels) - 1:
                h = nn.Conv(ch, (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        h = nn.silu(group_norm(h.shape[-1], self.dtype)(h))
        moments = nn.Conv(2 * self.latent_channels, (1, 1), dtype=jnp.float32)(h.astype(jnp.float32))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    channels: Sequence[int] = (32, 64, 128)
    out_channels: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        h = nn.Conv(self.channels[-1], (3, 3), dtype=self.dtype)(z.astype(self.dtype))
        for i, ch in enumerate(reversed(self.channels)):
            h = ResBlock(ch, self.dtype)(h)
            if i < len(self.channels) - 1:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = nn.Conv(ch, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(group_norm(h.shape[-1], self.dtype)(h))
        out = nn.Conv(self.out_channels, (3, 3), dtype=jnp.float32)(h.astype(jnp.float32))
        return out[:, PAD:-PAD, PAD:-PAD, :]


class Autoencoder(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; calling it returns (reconstruction, mean, logvar)."""

    channels: Sequence[int] = (32, 64, 128)
    latent_channels: int = 4
    out_channels: int = 1
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.channels, self.latent_channels, self.dtype)
        self.decoder = Decoder(self.channels, self.out_channels, self.dtype)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x, key):
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent."""
    kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)
