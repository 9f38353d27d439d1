"""A CLIP-style text encoder: a word-level tokenizer, a transformer giving per-token embeddings
(for cross-attention) and a pooled embedding, an image encoder, and the symmetric InfoNCE loss
with a learned temperature that trains them together."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


class Tokenizer:
    """Lower-cased words and digits; unknown words map to <unk>. Sequences are
    <bos> words <eos>, padded with <pad> (id 0) to ``max_len`` with a mask."""

    def __init__(self, vocabulary: Sequence[str], max_len: int = 16):
        words = [w for w in dict.fromkeys(vocabulary) if w not in (PAD, UNK, BOS, EOS)]
        self.vocab = [PAD, UNK, BOS, EOS] + words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|\d", text.lower())

    @classmethod
    def from_texts(cls, texts, max_len: int = 16) -> Tokenizer:
        return cls(sorted({w for t in texts for w in cls.words(t)}), max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (N, max_len); words past max_len - 2 are cut."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.zeros((len(texts), self.max_len), np.int32)
        for i, text in enumerate(texts):
            toks = [self.ids[BOS]] + [self.ids.get(w, self.ids[UNK]) for w in self.words(text)][: self.max_len - 2]
            toks.append(self.ids[EOS])
            ids[i, : len(toks)] = toks
        return ids, ids != 0

    def decode(self, ids) -> list[str]:
        return [" ".join(self.vocab[i] for i in row if self.vocab[i] not in (PAD, BOS, EOS)) for row in np.asarray(ids)]


class TransformerBlock(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        attn_mask = mask[:, None, None, :]
        h = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(h, h, mask=attn_mask)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.Dense(4 * d, dtype=self.dtype)(h)
        return x + nn.Dense(d, dtype=self.dtype)(nn.gelu(h))


class TextEncoder(nn.Module):
    """ids (B, L), mask (B, L) -> (tokens (B, L, width), pooled (B, embed_dim)).

    Pooled is the masked mean of the final tokens, projected; tokens feed cross-attention."""

    vocab_size: int
    width: int = 128
    depth: int = 3
    num_heads: int = 4
    embed_dim: int = 128
    max_len: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(self.vocab_size, self.width)(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))[: ids.shape[1]]
        x = x.astype(self.dtype)
        for _ in range(self.depth):
            x = TransformerBlock(self.num_heads, self.dtype)(x, mask)
        tokens = nn.LayerNorm(dtype=jnp.float32)(x.astype(jnp.float32))
        m = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(tokens * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return tokens, nn.Dense(self.embed_dim, use_bias=False, name="proj")(pooled)


class ImageEncoder(nn.Module):
    """The image tower of the contrastive pair: conv levels, global pool, projection."""

    channels: Sequence[int] = (32, 64, 128)
    embed_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            h = nn.Conv(ch, (3, 3), dtype=self.dtype)(h)
            h = nn.silu(nn.GroupNorm(num_groups=min(32, ch // 4), dtype=self.dtype)(h))
            if i < len(self.channels) - 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.embed_dim, use_bias=False)(h)
