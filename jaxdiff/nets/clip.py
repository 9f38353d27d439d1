"""CLIP's text transformer (transformers' CLIPTextModel), the text encoder of Stable Diffusion, with
transformers' parameter names. Built from its config by ``jaxdiff.pretrained.configs.clip_text_from_config``.

Pre-LayerNorm transformer over token + learned position embeddings, causal self-attention (a token sees
itself and those before it), MLP with quick_gelu (x * sigmoid(1.702 x)) or the exact GELU, final LayerNorm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import attention, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm, float32
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at each sequence's end-of-text token
    hidden_states: tuple | None = None  # embeddings, then every layer's output (no final norm): for clip-skip
    text_embeds: jax.Array | None = None  # (B, projection_dim): CLIPTextModelWithProjection's projected pooled output


class CLIPAttention(nn.Module):
    heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        b, n, d = x.shape
        split = lambda name: nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, self.heads, d // self.heads)
        out = attention(split("q_proj"), split("k_proj"), split("v_proj"), mask, implementation=self.implementation)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, n, d))


class CLIPMLP(nn.Module):
    intermediate_size: int
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = ACTIVATIONS[self.activation](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    heads: int
    intermediate_size: int
    activation: str
    eps: float
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        h = layer_norm(self.eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.heads, self.dtype, self.implementation, name="self_attn")(h, mask)
        h = layer_norm(self.eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.intermediate_size, self.activation, self.dtype, name="mlp")(h)


class CLIPEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int

    @nn.compact
    def __call__(self, ids):
        tok = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")(ids)
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding")(
            jnp.arange(ids.shape[1]))
        return tok + pos[None]


class CLIPEncoder(nn.Module):
    num_layers: int
    heads: int
    intermediate_size: int
    activation: str
    eps: float
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        hidden = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.activation, self.eps, self.dtype,
                                 self.implementation, name=f"layers_{i}")(x, mask)
            hidden.append(x)
        return hidden


class CLIPTextModel(nn.Module):
    """ids (B, L) int -> CLIPTextOutput(last_hidden_state, pooler_output, hidden_states).

    ``attention_mask`` (B, L), 1 for real tokens, hides padded keys (Stable Diffusion passes none: its
    padding tokens are attended to, causally). ``output_hidden_states`` adds the embeddings and every
    layer's output (clip-skip k takes ``hidden_states[-1 - k]`` and applies the final LayerNorm).
    The pooled output is the final state at the end-of-text token: its first occurrence, or, when
    ``eos_token_id == 2`` (configs older than transformers' fix), the position of the largest id."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    dtype: Any = jnp.float32
    attention_implementation: str | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextModel hidden_act={self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextModel hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        super().__post_init__()

    @nn.compact
    def __call__(self, ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(ids, attention_mask, output_hidden_states)

    def text_model(self, ids, attention_mask, output_hidden_states) -> CLIPTextOutput:
        if ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"ids have {ids.shape[1]} tokens; this text encoder takes at most "
                             f"{self.max_position_embeddings}")
        fields = {f: getattr(self, f) for f in _TEXT_FIELDS}
        return _TextTransformer(**fields, name="text_model")(ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' CLIPTextModelWithProjection (SDXL's second text encoder, OpenCLIP bigG): the text
    transformer of ``CLIPTextModel`` and ``text_projection``, a bias-free linear map of the pooled output to
    ``projection_dim``, returned as ``text_embeds`` beside the other outputs."""

    projection_dim: int = 512

    @nn.compact
    def __call__(self, ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        out = self.text_model(ids, attention_mask, output_hidden_states)
        embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=jnp.float32, name="text_projection")(
            out.pooler_output)
        return out._replace(text_embeds=embeds)


_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "dtype",
                "attention_implementation")


class _TextTransformer(nn.Module):
    """The ``text_model`` scope of transformers' tree: embeddings, encoder, final_layer_norm."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    dtype: Any
    attention_implementation: str | None

    @nn.compact
    def __call__(self, ids, attention_mask, output_hidden_states):
        c = self
        length = ids.shape[1]
        x = CLIPEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size, name="embeddings")(ids)
        # causal: query i sees keys 0..i; a padding mask also hides padded keys
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden = CLIPEncoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                             c.layer_norm_eps, c.dtype, c.attention_implementation,
                             name="encoder")(x.astype(c.dtype), mask)
        last = layer_norm(c.layer_norm_eps, jnp.float32, "final_layer_norm")(hidden[-1].astype(jnp.float32))
        if c.eos_token_id == 2:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == c.eos_token_id, axis=-1)  # the first end-of-text token
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None)
