"""KL-regularised convolutional autoencoders (Stable Diffusion's first stage).

``Autoencoder``: the small one trained here, 28x28 images <-> small latents. 28x28 is padded to 32x32,
halved twice to 8x8 with ``latent_channels`` channels (4 x 8 x 8 by default).

``AutoencoderKL``: diffusers' AutoencoderKL (Stable Diffusion's VAE) with its parameter names, built from
its config by ``jaxdiff.pretrained.configs.autoencoder_from_config``.

Both encoders give the mean and log-variance (clipped to [-30, 20]) of a diagonal Gaussian posterior.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import Attention, Downsample, ResnetBlock, Upsample, group_norm

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


def _conv(features, kernel, dtype, name):
    return nn.Conv(features, (kernel, kernel), padding=(kernel - 1) // 2, dtype=dtype, name=name)


class KLMidBlock(nn.Module):
    """diffusers' UNetMidBlock2D as the VAE uses it: resnets_0, attentions_0 (GroupNorm, one head as wide as
    the block, residual), resnets_1; no time embedding."""

    channels: int
    groups: int = 32
    add_attention: bool = True
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, h):
        h = ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(h)
        if self.add_attention:
            h = Attention(heads=1, head_dim=self.channels, qkv_bias=True, norm_groups=self.groups, norm_eps=1e-6,
                          residual=True, dtype=self.dtype, implementation=self.implementation,
                          name="attentions_0")(h)
        return ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(h)


class _KLDownBlock(nn.Module):
    channels: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(h)
        if self.downsample:
            h = Downsample(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(h)
        return h


class _KLUpBlock(nn.Module):
    channels: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(h)
        if self.upsample:
            h = Upsample(self.channels, self.dtype, name="upsamplers_0")(h)
        return h


class KLEncoder(nn.Module):
    """conv_in, down_blocks_i{resnets_j, downsamplers_0} (pad (0, 1), VALID stride 2), mid_block,
    conv_norm_out, SiLU, conv_out to 2 * latent_channels (mean and log-variance)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        chans = self.block_out_channels
        h = _conv(chans[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            h = _KLDownBlock(ch, self.layers_per_block, self.groups, i < len(chans) - 1, self.dtype,
                             name=f"down_blocks_{i}")(h)
        h = KLMidBlock(chans[-1], self.groups, self.mid_block_add_attention, self.dtype, self.implementation,
                       name="mid_block")(h)
        h = nn.silu(group_norm(chans[-1], self.dtype, groups=self.groups, eps=1e-6, fast_variance=False,
                               name="conv_norm_out")(h))
        return _conv(2 * self.latent_channels, 3, jnp.float32, "conv_out")(h.astype(jnp.float32))


class KLDecoder(nn.Module):
    """conv_in, mid_block, up_blocks_i{resnets_j (layers_per_block + 1), upsamplers_0} from the widest
    level down, conv_norm_out, SiLU, conv_out."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, z):
        chans = self.block_out_channels
        h = _conv(chans[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = KLMidBlock(chans[-1], self.groups, self.mid_block_add_attention, self.dtype, self.implementation,
                       name="mid_block")(h)
        for i, ch in enumerate(reversed(chans)):
            h = _KLUpBlock(ch, self.layers_per_block + 1, self.groups, i < len(chans) - 1, self.dtype,
                           name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(chans[0], self.dtype, groups=self.groups, eps=1e-6, fast_variance=False,
                               name="conv_norm_out")(h))
        return _conv(self.out_channels, 3, jnp.float32, "conv_out")(h.astype(jnp.float32))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE (diffusers' AutoencoderKL): ``encode(x) -> (mean, logvar)`` with x (B, H, W, C)
    in [-1, 1], ``decode(z) -> x``; calling it returns (reconstruction, mean, logvar), decoding the mean, or a
    sample of the posterior when given a ``key``. Latents are unscaled: the pipeline multiplies by
    ``scaling_factor`` (and subtracts ``shift_factor`` where a config has one), which this module only
    carries. Moments and reconstructions are float32 whatever the compute ``dtype``."""

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    dtype: Any = jnp.float32
    attention_implementation: str | None = None

    def setup(self):
        chans = tuple(self.block_out_channels)
        common = dict(groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype, implementation=self.attention_implementation)
        self.encoder = KLEncoder(chans, self.layers_per_block, self.latent_channels, **common)
        self.decoder = KLDecoder(chans, self.layers_per_block, self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=jnp.float32)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=jnp.float32)

    def encode(self, x):
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        z = z.astype(jnp.float32)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key=None):
        mean, logvar = self.encode(x)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent."""
    kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)
