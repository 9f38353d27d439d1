"""One conditional U-Net family: the textbook's UNetCond and Stable Diffusion's UNet2DConditionModel are
configurations of the same module, ``UNet``, whose fields select the blocks.

``textbook_unet(...)`` gives the textbook's network (ConvBlocks that add an MLP of the condition to their
input, max-pool down, bilinear up, one skip per level, optional self-/cross-attention after a level).
``jaxdiff.pretrained.configs.unet_from_config(cfg)`` gives a diffusers UNet2DConditionModel (ResnetBlocks,
Transformer2D after every block of a cross-attention level, strided-conv down, nearest+conv up, one skip
per block, a mid block), with diffusers' parameter names.

Call: ``model.apply(params, x, t, y=None, context=None, context_mask=None)`` with x (B, H, W, C) NHWC,
t (B,) integer timesteps fed to the time embedding as given (jaxdiff's t in 1..T for the textbook
networks; for a Stable Diffusion U-Net the eps adapter passes diffusers' tau = t - 1), y (B,) class labels
(the null label when omitted, where the configuration has one), context (B, L, D) tokens for
cross-attention and context_mask (B, L) boolean (True = a real token). Returns eps, float32, (B, H, W, out).
SDXL's U-Nets (``addition_time_embed_dim`` set: diffusers' addition_embed_type "text_time") also read
``text_embeds`` (B, P), the pooled text embedding, and ``time_ids`` (B, K) float micro-conditioning (SDXL base:
original size, crop top-left, target size; refiner: original size, crop, aesthetic score).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import (
    Attention,
    ConvBlock,
    Downsample,
    ResnetBlock,
    Transformer2D,
    Upsample,
    group_norm,
    sinusoidal_embedding,
)

RESNETS = ("resnet", "conv_block")
DOWNSAMPLES = ("conv", "max_pool")
UPSAMPLES = ("nearest_conv", "bilinear")
SKIPS = ("per_layer", "per_level")
# what follows the resnets of a level: nothing; a Transformer2D after every resnet (diffusers' CrossAttn
# blocks, named attentions_j); or the textbook's attention layers after the level's last block
# (named self_attn and cross_attn)
ATTENTIONS = ("", "transformer", "self", "cross", "self+cross")


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2 (diffusers' TimestepEmbedding; the textbook's time MLP)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What every block of one U-Net shares (the UNet fields its blocks read), hashable for linen."""

    resnet: str
    conv_block_residual: bool
    norm_num_groups: int
    norm_eps: float
    use_linear_projection: bool
    skips: str
    downsample: str
    downsample_padding: int
    upsample: str
    dtype: Any
    attention_implementation: str | None


class _Level(nn.Module):
    """The blocks a U-Net level has on its way down and up: resnets_j, then the attention the
    configuration asks for. ``in_skips`` (up path, per-layer skips) are concatenated one per resnet."""

    spec: BlockSpec
    channels: int
    num_layers: int
    attention: str
    heads: int
    transformer_layers: int

    def resnet(self, j, h, emb):
        s = self.spec
        if s.resnet == "conv_block":
            return ConvBlock(self.channels, s.conv_block_residual, s.dtype, name=f"resnets_{j}")(h, emb)
        return ResnetBlock(self.channels, s.norm_num_groups, s.norm_eps, 1.0, s.dtype, name=f"resnets_{j}")(h, emb)

    def transformer(self, j, h, context, mask):
        s = self.spec
        return Transformer2D(self.heads, self.channels // self.heads, self.transformer_layers, s.norm_num_groups,
                             s.use_linear_projection, s.dtype, s.attention_implementation,
                             name=f"attentions_{j}")(h, context, mask)

    def level_attention(self, h, context, mask):
        s, ch = self.spec, self.channels
        # the textbook's layer: GroupNorm (the small networks' rule), multi-head attention with biased
        # projections, residual
        kw = dict(heads=self.heads, head_dim=ch // self.heads, qkv_bias=True, norm_groups=min(32, ch // 4) or 1,
                  norm_fast_variance=True, residual=True, dtype=s.dtype, implementation=s.attention_implementation)
        kinds = self.attention.split("+")
        if "self" in kinds:
            h = Attention(**kw, name="self_attn")(h)
        if "cross" in kinds:
            h = Attention(**kw, name="cross_attn")(h, context, mask)
        return h

    def layers(self, h, emb, context, mask, in_skips=None):
        out_skips = []
        for j in range(self.num_layers):
            if in_skips:
                h = jnp.concatenate([h, in_skips.pop()], axis=-1)
            h = self.resnet(j, h, emb)
            if self.attention == "transformer":
                h = self.transformer(j, h, context, mask)
            out_skips.append(h)
        if self.attention not in ("", "transformer"):
            h = self.level_attention(h, context, mask)
        return h, out_skips


class DownBlock(_Level):
    """One level down: its layers, then (except at the bottom) the downsampler. Returns (h, skips):
    per-layer skips are every layer's output and the downsampled one; a per-level skip is the
    output before downsampling."""

    downsample: bool = True

    @nn.compact
    def __call__(self, h, emb, context, mask):
        s = self.spec
        h, skips = self.layers(h, emb, context, mask)
        if s.skips == "per_level":
            skips = [h] if self.downsample else []
        if self.downsample:
            if s.downsample == "max_pool":
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            else:
                h = Downsample(self.channels, s.downsample_padding, s.dtype, name="downsamplers_0")(h)
            if s.skips == "per_layer":
                skips.append(h)
        return h, skips


class UpBlock(_Level):
    """One level up. Per-layer skips: each resnet takes one skip, then the upsampler (to ``size``, the next
    skip's). Per-level skip: upsample to the skip's size first, concatenate it, then the layers."""

    upsample: bool = True

    def resample(self, h, size):
        if self.spec.upsample == "bilinear":
            return jax.image.resize(h, (h.shape[0], *size, h.shape[-1]), "bilinear")
        return Upsample(self.channels, self.spec.dtype, name="upsamplers_0")(h, size)

    @nn.compact
    def __call__(self, h, emb, context, mask, skips, size=None):
        skips = list(skips)
        if self.spec.skips == "per_level":
            skip = skips.pop()
            h = jnp.concatenate([self.resample(h, skip.shape[1:3]), skip], axis=-1)
            return self.layers(h, emb, context, mask)[0]
        h = self.layers(h, emb, context, mask, skips)[0]
        return self.resample(h, size) if self.upsample else h


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnets_0, attentions_0 (a Transformer2D), resnets_1."""

    spec: BlockSpec
    channels: int
    heads: int
    transformer_layers: int
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, h, emb, context, mask):
        s, ch = self.spec, self.channels
        res = dict(out_channels=ch, groups=s.norm_num_groups, eps=s.norm_eps,
                   output_scale_factor=self.output_scale_factor, dtype=s.dtype)
        h = ResnetBlock(**res, name="resnets_0")(h, emb)
        h = Transformer2D(self.heads, ch // self.heads, self.transformer_layers, s.norm_num_groups,
                          s.use_linear_projection, s.dtype, s.attention_implementation,
                          name="attentions_0")(h, context, mask)
        return ResnetBlock(**res, name="resnets_1")(h, emb)


class UNet(nn.Module):
    """eps_theta(x_t, t, y, context): a U-Net whose fields select its blocks (see the module docstring).

    Levels i = 0..n-1 have ``block_out_channels[i]`` channels and ``layers_per_block[i]`` blocks on the
    way down; ``down_attention[i]`` / ``up_attention[k]`` say what follows them (ATTENTIONS); up block k
    serves level n-1-k with per-layer skips (``layers_per_block + 1`` blocks) and level n-2-k with a
    per-level skip (no up block at the bottom). ``num_heads[i]`` heads of width channels // heads.
    The condition vector is time_embedding(sinusoidal(t)) plus, with ``num_class_embeds``, a label
    embedding; ``null_label`` is the label used when y is omitted (classifier-free guidance's "no
    condition"). Parameters are float32 (or as loaded); ``dtype`` is the compute dtype; the last conv is
    float32 so eps leaves in float32.
    """

    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: Sequence[int] = (2, 2, 2, 2)
    down_attention: Sequence[str] = ("transformer", "transformer", "transformer", "")
    up_attention: Sequence[str] = ("", "transformer", "transformer", "transformer")
    mid_block: bool = True
    num_heads: Sequence[int] = (8, 8, 8, 8)
    transformer_layers: Sequence[int] = (1, 1, 1, 1)
    cross_attention_dim: int | None = 768  # None: whatever width the context has
    use_linear_projection: bool = False
    resnet: str = "resnet"
    conv_block_residual: bool = True
    downsample: str = "conv"
    downsample_padding: int = 1
    upsample: str = "nearest_conv"
    skips: str = "per_layer"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    conv_norm_out: bool = True
    out_channels: int | None = 4  # None: as many as the input has
    time_proj_dim: int | None = None  # None: block_out_channels[0]
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int | None = None  # None: 4 * block_out_channels[0]
    num_class_embeds: int | None = None
    null_label: int | None = None
    # SDXL's "text_time" added embedding: each time id through a sinusoidal embedding this wide, concatenated
    # after the pooled text embedding, through add_embedding (linear_1, SiLU, linear_2), added to the time
    # embedding; addition_embed_input_dim is that concatenation's width (the config's
    # projection_class_embeddings_input_dim), checked at the call
    addition_time_embed_dim: int | None = None
    addition_embed_input_dim: int | None = None
    center_input_sample: bool = False
    dtype: Any = jnp.float32
    attention_implementation: str | None = None
    # gradient checkpointing: each down, mid and up block keeps only its inputs for the backward pass and
    # recomputes its activations there (less memory, one more forward per block); same parameters and outputs
    remat: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        choices = dict(resnet=RESNETS, downsample=DOWNSAMPLES, upsample=UPSAMPLES, skips=SKIPS)
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"UNet {field}={getattr(self, field)!r}; expected one of {allowed}")
        n_up = n if self.skips == "per_layer" else n - 1
        for field, length in (("layers_per_block", n), ("down_attention", n), ("num_heads", n),
                              ("transformer_layers", n), ("up_attention", n_up)):
            if len(getattr(self, field)) != length:
                raise ValueError(f"UNet {field} has {len(getattr(self, field))} entries; expected {length} "
                                 f"(block_out_channels {tuple(self.block_out_channels)}, skips {self.skips!r})")
        for field in ("down_attention", "up_attention"):
            bad = [a for a in getattr(self, field) if a not in ATTENTIONS]
            if bad:
                raise ValueError(f"UNet {field} holds {bad}; expected entries from {ATTENTIONS}")
        if self.num_class_embeds is not None and self.null_label is not None and \
                not 0 <= self.null_label < self.num_class_embeds:
            raise ValueError(f"UNet null_label={self.null_label} is not below num_class_embeds={self.num_class_embeds}")
        super().__post_init__()

    def block_spec(self) -> BlockSpec:
        return BlockSpec(self.resnet, self.conv_block_residual, self.norm_num_groups, self.norm_eps,
                         self.use_linear_projection, self.skips, self.downsample, self.downsample_padding,
                         self.upsample, self.dtype, self.attention_implementation)

    @property
    def uses_context(self) -> bool:
        kinds = {k for a in (*self.down_attention, *self.up_attention) for k in a.split("+")}
        return self.mid_block or "transformer" in kinds or "cross" in kinds

    def added_embedding(self, emb, text_embeds, time_ids):
        """time embedding + add_embedding([text_embeds, sinusoidal(time_ids) per id]) (diffusers' text_time)."""
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net has SDXL's text_time embedding: pass text_embeds (B, P), the pooled text "
                             "embedding, and time_ids (B, K), the micro-conditioning")
        d = self.addition_time_embed_dim
        width = text_embeds.shape[-1] + time_ids.shape[-1] * d
        if self.addition_embed_input_dim is not None and width != self.addition_embed_input_dim:
            raise ValueError(f"text_embeds ({text_embeds.shape[-1]} wide) and {time_ids.shape[-1]} time_ids of "
                             f"{d} each make {width}; this U-Net's projection_class_embeddings_input_dim is "
                             f"{self.addition_embed_input_dim}")
        b = emb.shape[0]
        ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (b, time_ids.shape[-1]))
        ids = sinusoidal_embedding(ids.reshape(-1), d, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift).reshape(b, -1)
        pooled = jnp.broadcast_to(jnp.asarray(text_embeds, jnp.float32), (b, text_embeds.shape[-1]))
        added = jnp.concatenate([pooled, ids], axis=-1).astype(emb.dtype)
        return emb + TimestepEmbedding(emb.shape[-1], self.dtype, name="add_embedding")(added)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        if self.uses_context and context is None:
            raise ValueError("this U-Net has cross-attention: pass context (B, L, D)")
        width = self.cross_attention_dim
        if context is not None and width is not None and context.shape[-1] != width:
            raise ValueError(f"context has width {context.shape[-1]}; this U-Net's cross_attention_dim is "
                             f"{self.cross_attention_dim}")
        b, n = x.shape[0], len(self.block_out_channels)
        ch0 = self.block_out_channels[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        emb = sinusoidal_embedding(t, self.time_proj_dim or ch0, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift)
        emb = TimestepEmbedding(self.time_embed_dim or 4 * ch0, self.dtype, name="time_embedding")(emb)
        if self.num_class_embeds is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError(f"this U-Net has a class embedding (num_class_embeds={self.num_class_embeds}): "
                                     f"pass y (B,) class labels")
                y = jnp.full((b,), self.null_label, jnp.int32)
            emb = emb + nn.Embed(self.num_class_embeds, emb.shape[-1], dtype=self.dtype, name="class_embedding")(y)
        if self.addition_time_embed_dim is not None:
            emb = self.added_embedding(emb, text_embeds, time_ids)
        # (B, L) -> (B, 1, 1, L): the same keys for every head and query
        mask = None if context_mask is None else context_mask[:, None, None, :]

        h = x.astype(self.dtype)
        if self.center_input_sample:
            h = 2 * h - 1.0
        h = nn.Conv(ch0, (self.conv_in_kernel,) * 2, padding=(self.conv_in_kernel - 1) // 2, dtype=self.dtype,
                    name="conv_in")(h)
        spec = self.block_spec()

        def level(i, layers, attention):
            return dict(spec=spec, channels=self.block_out_channels[i], num_layers=layers, attention=attention,
                        heads=self.num_heads[i], transformer_layers=self.transformer_layers[i])

        # nn.remat counts self as argument 0: UpBlock's size (a tuple of ints, or None) is static
        Down, Mid, Up = (nn.remat(DownBlock), nn.remat(MidBlock), nn.remat(UpBlock, static_argnums=(6,))) \
            if self.remat else (DownBlock, MidBlock, UpBlock)
        skips = [h] if self.skips == "per_layer" else []
        for i in range(n):
            h, level_skips = Down(**level(i, self.layers_per_block[i], self.down_attention[i]),
                                       downsample=i < n - 1, name=f"down_blocks_{i}")(h, emb, context, mask)
            skips += level_skips
        if self.mid_block:
            h = Mid(spec, self.block_out_channels[-1], self.num_heads[-1], self.transformer_layers[-1],
                         self.mid_block_scale_factor, name="mid_block")(h, emb, context, mask)
        if self.skips == "per_layer":
            for k in range(n):
                i = n - 1 - k
                m = self.layers_per_block[i] + 1
                block_skips, skips = skips[-m:], skips[:-m]
                size = skips[-1].shape[1:3] if skips else None
                h = Up(**level(i, m, self.up_attention[k]), upsample=k < n - 1,
                            name=f"up_blocks_{k}")(h, emb, context, mask, block_skips, size)
        else:
            for k in range(n - 1):
                i = n - 2 - k
                h = Up(**level(i, self.layers_per_block[i], self.up_attention[k]),
                            name=f"up_blocks_{k}")(h, emb, context, mask, [skips.pop()])
        if self.conv_norm_out:
            h = nn.silu(group_norm(h.shape[-1], self.dtype, groups=self.norm_num_groups, eps=self.norm_eps,
                                   fast_variance=False, name="conv_norm_out")(h))
        # eps in float32: the samplers' arithmetic is float32 whatever the compute dtype
        return nn.Conv(self.out_channels or x.shape[-1], (self.conv_out_kernel,) * 2,
                       padding=(self.conv_out_kernel - 1) // 2, dtype=jnp.float32,
                       name="conv_out")(h.astype(jnp.float32))


def textbook_unet(num_classes: int = 10, channels: Sequence[int] = (64, 128, 256), blocks_per_level: int = 1,
                  attention_levels: Sequence[int] = (), cross_attention_levels: Sequence[int] = (),
                  num_heads: int = 4, cond_dim: int = 256, residual: bool = True, out_channels: int | None = None,
                  dtype=jnp.float32) -> UNet:
    """The textbook's conditional U-Net (UNetCond) as a configuration of ``UNet``.

    Channels per level, ``blocks_per_level`` ConvBlocks per level, max-pool down, bilinear up, skip
    concatenation once per level. The condition vector is an MLP of the sinusoidal time encoding
    (``cond_dim`` wide) plus a label embedding; label ``num_classes`` is the null label ("no condition")
    used by classifier-free guidance and when y is omitted; ``num_classes = 0`` gives an unconditional
    model. ``attention_levels`` / ``cross_attention_levels``: self- / cross-attention (context (B, L, D)
    and context_mask (B, L)) after those levels' blocks, on the way down and up. Defaults follow the
    textbook: 64/128/256, one block per level, no attention (2,372,673 parameters on 1-channel images).
    """
    channels = tuple(channels)
    n = len(channels)
    if n < 1 or blocks_per_level < 1 or num_classes < 0:
        raise ValueError(f"textbook_unet: channels {channels} (one level or more), blocks_per_level "
                         f"{blocks_per_level} (>= 1), num_classes {num_classes} (>= 0)")

    def kind(level):
        return "+".join(k for k, levels in (("self", attention_levels), ("cross", cross_attention_levels))
                        if level in levels)

    return UNet(block_out_channels=channels, layers_per_block=(blocks_per_level,) * n,
                down_attention=tuple(kind(i) for i in range(n)),
                up_attention=tuple(kind(i) for i in reversed(range(n - 1))), mid_block=False,
                num_heads=(num_heads,) * n, transformer_layers=(1,) * n, cross_attention_dim=None,
                resnet="conv_block", conv_block_residual=residual, downsample="max_pool", upsample="bilinear",
                skips="per_level", conv_in_kernel=3, conv_out_kernel=1, conv_norm_out=False,
                out_channels=out_channels, time_proj_dim=cond_dim, flip_sin_to_cos=False, freq_shift=0.0,
                time_embed_dim=cond_dim, num_class_embeds=num_classes + 1, null_label=num_classes, dtype=dtype)


def textbook_params_from_legacy(legacy: dict, model: UNet) -> dict:
    """Parameters of a textbook U-Net saved before the U-Net family (jaxdiff <= 7a6669d: auto-named
    Dense_0, ConvBlock_3, Attention_1/MultiHeadDotProductAttention_0/query, ...) renamed for
    ``model = textbook_unet(...)`` of the same settings. Accepts {"params": tree} or the tree."""
    tree = legacy.get("params", legacy)
    n = len(model.block_out_channels)
    # the legacy module created its children in this order: time MLP, label embedding, stem conv, then
    # per level down and per level up its ConvBlocks and then its attention layers, then the output conv
    blocks, attns = [], []
    for prefix, levels, kinds in (("down_blocks", range(n), model.down_attention),
                                  ("up_blocks", range(n - 1), model.up_attention)):
        for i in levels:
            level = i if prefix == "down_blocks" else n - 2 - i
            blocks += [(f"{prefix}_{i}", f"resnets_{j}") for j in range(model.layers_per_block[level])]
            attns += [(f"{prefix}_{i}", f"{k}_attn") for k in kinds[i].split("+") if k]
    expected = {"Dense_0", "Dense_1", "Embed_0", "Conv_0", "Conv_1"} | {f"ConvBlock_{k}" for k in range(len(blocks))} \
        | {f"Attention_{k}" for k in range(len(attns))}
    if set(tree) != expected:
        raise ValueError(f"legacy parameters hold {sorted(set(tree) - expected)} and lack "
                         f"{sorted(expected - set(tree))}: not the textbook U-Net these settings describe")
    new: dict = {}

    def put(path, value):
        node = new
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value

    put(("time_embedding", "linear_1"), tree["Dense_0"])
    put(("time_embedding", "linear_2"), tree["Dense_1"])
    put(("class_embedding",), tree["Embed_0"])
    put(("conv_in",), tree["Conv_0"])
    put(("conv_out",), tree["Conv_1"])
    for k, path in enumerate(blocks):
        put(path, tree[f"ConvBlock_{k}"])
    for k, path in enumerate(attns):
        old = tree[f"Attention_{k}"]
        mha = old["MultiHeadDotProductAttention_0"]
        flat = lambda a: a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)  # (C, H, D) -> (C, H*D)
        attn = {"group_norm": old["GroupNorm_0"],
                "to_out_0": {"kernel": mha["out"]["kernel"].reshape(-1, mha["out"]["kernel"].shape[-1]),
                             "bias": mha["out"]["bias"]}}
        for src, dst in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
            attn[dst] = {leaf: flat(v) for leaf, v in mha[src].items()}
        put(path, attn)
    return {"params": new}
