"""Building blocks shared by the networks: time encoding, GroupNorm, the one attention function,
residual blocks, transformer blocks, down- and upsampling.

Everything is NHWC. Parameters are float32 (or as loaded); ``dtype`` is the compute dtype.
Normalisation statistics and the attention softmax are computed in float32 whatever ``dtype`` is.
Blocks that mirror diffusers carry diffusers' child names (``conv1``, ``to_q``, ``to_out_0``, ...)
so that a diffusers key maps onto our parameter path by the rule in jaxdiff/pretrained.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0, *,
                         flip_sin_to_cos: bool = False, freq_shift: float = 0.0) -> jax.Array:
    """The transformer's sin/cos encoding of timesteps, shape (B,) -> (B, dim), float32.

    Frequencies are ``max_period ** (-i / (dim // 2 - freq_shift))``; the halves are [sin, cos], or
    [cos, sin] with ``flip_sin_to_cos`` (diffusers' Timesteps; Stable Diffusion uses flip=True, shift=0).
    An odd ``dim`` gets a zero last column."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    halves = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(halves, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2))) if dim % 2 else emb


def group_norm(features: int, dtype, *, groups: int | None = None, eps: float = 1e-6,
               fast_variance: bool = True, name: str | None = None) -> nn.Module:
    """GroupNorm, not BatchNorm: no mutable batch statistics, and the same result at any batch size.

    ``groups=None`` is the small networks' rule, min(32, features // 4). Statistics are float32.
    ``fast_variance`` (E[x^2] - E[x]^2, one pass: flax's GroupNorm) is what the small networks were trained
    with; the pretrained blocks use ``ShiftedGroupNorm``, exact where activations have a large mean."""
    groups = groups or (min(32, features // 4) or 1)
    if fast_variance:
        return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=True, name=name)
    return ShiftedGroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


class ShiftedGroupNorm(nn.Module):
    """GroupNorm over the last axis with flax's parameters (scale, bias), float32 statistics from one pass:
    the mean and mean square of x - K, K each group's first value. The variance E[(x-K)^2] - E[x-K]^2 equals
    the two-pass one without its cancellation when |mean| >> std, and the two sums are one reduction over
    the input instead of two in sequence (fewer kernels per block: SD-1.5 sampling -10.8% at batch 1 on an
    H200). Its limit: the error grows with ((K - mean) / std)^2, so a group whose first value is an extreme
    outlier loses precision (1e-3 at 1e4 std, where two passes keep 4e-6)."""

    num_groups: int
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)
        first = xg[(slice(None),) + (0,) * (xg.ndim - 3) + (slice(None), 0)]  # (B, g)
        shift = jax.lax.stop_gradient(first).reshape(xg.shape[0], *(1,) * (xg.ndim - 3), g, 1)
        d = xg - shift
        m1 = jnp.mean(d, axes, keepdims=True)
        var = jnp.maximum(jnp.mean(d * d, axes, keepdims=True) - m1 * m1, 0.0)
        y = ((d - m1) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def layer_norm(eps: float, dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              implementation: str | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for each head: q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D).

    ``mask`` is boolean, True where a query may attend to a key, broadcastable to (B, H, Lq, Lk).
    Every attention in jaxdiff's networks comes through here, so ``implementation="cudnn"`` (the fused
    GPU kernel) is one switch; None lets JAX choose (XLA). Logits and softmax are float32 for bf16/fp16
    inputs (which is what diffusers' ``upcast_attention`` asks for). Where the fused kernel does not
    apply (float32, a head width it does not take, a mask), "cudnn" quietly means XLA, so one setting
    serves a whole network whose levels differ. Odd sequence lengths take cuDNN's forward with XLA's
    gradient (``_cudnn_forward_xla_gradient``)."""
    if implementation == "cudnn" and not cudnn_attention_fits(q, mask, k):
        implementation = None
    if implementation == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
        return _cudnn_forward_xla_gradient(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def cudnn_attention_fits(q, mask=None, k=None) -> bool:
    """cuDNN's fused attention takes bf16/fp16 heads whose width is a multiple of 8, at most 128 (256 on
    Hopper and later), and here no mask (the text encoder's causal mask stays on XLA: it is small). ``k``
    is not read: the keys' length no longer matters (benchmarks.sd_speed's lever variants wrap this)."""
    if mask is not None or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8:
        return False
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError):
        major = 0
    return q.shape[-1] <= (256 if major >= 9 else 128)


FUSED_FORWARD = "cudnn"  # the forward of _cudnn_forward_xla_gradient; a test runs its wiring on XLA


@jax.custom_vjp
def _cudnn_forward_xla_gradient(q, k, v):
    """cuDNN's forward kernel for sequences of odd length (cross-attention to CLIP's 77 tokens), whose cuDNN
    gradient jax 0.11.2 refuses: the gradient is XLA's, recomputed from the inputs (cheap with 77 keys), so
    a training step can still be differentiated while sampling gets the fused kernel."""
    return jax.nn.dot_product_attention(q, k, v, implementation=FUSED_FORWARD)


def _cudnn_forward(q, k, v):
    return _cudnn_forward_xla_gradient(q, k, v), (q, k, v)


def _xla_gradient(inputs, grad):
    return jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), *inputs)[1](grad)


_cudnn_forward_xla_gradient.defvjp(_cudnn_forward, _xla_gradient)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
    pad = (kernel - 1) // 2 if padding is None else padding
    pad = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


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


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: norm1-SiLU-conv1, + time_emb_proj(SiLU(temb)) when ``temb`` is given,
    norm2-SiLU-conv2, plus the input (through a 1x1 ``conv_shortcut`` when the width changes),
    divided by ``output_scale_factor``."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(x.shape[-1], self.dtype, groups=self.groups, eps=self.eps, fast_variance=False,
                               name="norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.out_channels, self.dtype, groups=self.groups, eps=self.eps, fast_variance=False,
                               name="norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention with diffusers' names: to_q, to_k, to_v (bias only with ``qkv_bias``), to_out_0.

    Input (B, L, C) or a feature map (B, H, W, C), whose pixels are the tokens. Without ``context`` it is
    self-attention; with ``context`` (B, Lk, D) keys and values come from it (cross-attention) and ``mask``
    (boolean, broadcastable to (B, heads, Lq, Lk)) says which keys count. ``norm_groups`` puts a GroupNorm
    named group_norm on the input first and ``residual`` adds the input back (the autoencoder's mid-block
    attention and the textbook's attention layer); a transformer block does both outside."""

    heads: int
    head_dim: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    norm_fast_variance: bool = False
    residual: bool = False
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        b, c = x.shape[0], x.shape[-1]
        h = x
        if self.norm_groups is not None:
            h = group_norm(c, self.dtype, groups=self.norm_groups, eps=self.norm_eps,
                           fast_variance=self.norm_fast_variance, name="group_norm")(h)
        h = h.reshape(b, -1, c)
        kv = h if context is None else context.astype(self.dtype)
        inner = self.heads * self.head_dim

        def project(name, inputs, bias):
            out = nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)(inputs)
            return out.reshape(b, -1, self.heads, self.head_dim)

        q = project("to_q", h, self.qkv_bias)
        k = project("to_k", kv, self.qkv_bias)
        v = project("to_v", kv, self.qkv_bias)
        out = attention(q, k, v, mask, implementation=self.implementation).reshape(b, -1, inner)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(x.shape)
        return x + out if self.residual else out


class GEGLU(nn.Module):
    """proj to 2 * inner, split into value and gate: value * GELU(gate), with the exact (erf) GELU."""

    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net_0 (GEGLU, to 4 * dim), net_2 (back to dim); net_1 is dropout."""

    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.mult * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (attn1), cross-attention to ``context`` (attn2), GEGLU feed-forward
    (ff), each with a residual: diffusers' BasicTransformerBlock as Stable Diffusion uses it."""

    heads: int
    head_dim: int
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        attn = dict(heads=self.heads, head_dim=self.head_dim, dtype=self.dtype, implementation=self.implementation)
        x = x + Attention(**attn, name="attn1")(layer_norm(self.norm_eps, self.dtype, "norm1")(x))
        x = x + Attention(**attn, name="attn2")(layer_norm(self.norm_eps, self.dtype, "norm2")(x), context,
                                                 context_mask)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(self.norm_eps, self.dtype, "norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel on a feature map: GroupNorm (eps 1e-6), proj_in (a 1x1 conv, or a
    Dense with ``use_linear_projection``), ``depth`` BasicTransformerBlocks over the pixels, proj_out,
    plus the input. ``context_mask`` is boolean, broadcastable to (B, heads, pixels, Lk)."""

    heads: int
    head_dim: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        b, hh, ww, c = x.shape
        inner = self.heads * self.head_dim
        h = group_norm(c, self.dtype, groups=self.groups, eps=1e-6, fast_variance=False, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
        else:
            h = _conv(inner, 1, self.dtype, "proj_in")(h).reshape(b, hh * ww, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.head_dim, dtype=self.dtype, implementation=self.implementation,
                                      name=f"transformer_blocks_{i}")(h, context, context_mask)
        if self.use_linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
        else:
            h = _conv(c, 1, self.dtype, "proj_out")(h.reshape(b, hh, ww, inner))
        return h + x


class Downsample(nn.Module):
    """A 3x3 stride-2 conv named conv. ``padding`` 1 pads every side (the U-Net's); ``padding=0`` pads
    only right and bottom by one, then convolves VALID (the autoencoder's, as diffusers does)."""

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)
        return _conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x`` to ``size`` with PyTorch's rule (source index
    floor(i * in / out)); doubling is a broadcast, not a gather."""
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)

    def index(n_in, n_out):  # float32 arithmetic, as PyTorch's kernel computes it
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

    return x[:, index(h, size[0])][:, :, index(w, size[1])]


class Upsample(nn.Module):
    """Nearest x2 (or to ``size``, as diffusers does when a skip's size is odd), then a 3x3 conv named conv."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return _conv(self.out_channels, 3, self.dtype, "conv")(x)
