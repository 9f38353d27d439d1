"""Tokenizer, text encoder, contrastive loss, captions and cross-attention in the U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import captions
from jaxdiff.nets.text import ImageEncoder, TextEncoder, Tokenizer
from jaxdiff.nets.unet import textbook_unet
from jaxdiff.specs import _init_once
from jaxdiff.train import clip_loss

TOK = Tokenizer.from_texts(captions.all_texts("mnist"), max_len=8)


def test_tokenizer_ids_mask_unknown_and_truncation():
    ids, mask = TOK(["a handwritten seven", "zebra 7", "one two three four five six seven eight"])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == np.int32
    assert TOK.decode(ids)[0] == "a handwritten seven"
    assert TOK.decode(ids)[1] == "<unk> 7"
    assert mask[2].all() and TOK.decode(ids[2:])[0] == "one two three four five six"
    assert mask[0].sum() == 5  # <bos> a handwritten seven <eos>


def test_padding_tokens_do_not_change_the_encoding():
    enc = TextEncoder(vocab_size=len(TOK), width=32, depth=2, embed_dim=16, max_len=8)
    ids, mask = TOK(["the digit 3", "a handwritten nine"])
    # init and apply each one program: op by op, XLA:CPU compiles every operation by itself
    params = _init_once(lambda key: enc.init(key, ids, mask), jax.random.key(0))
    apply = jax.jit(enc.apply)
    tokens, pooled = apply(params, ids, mask)
    garbage = np.where(mask, ids, 7)  # other ids where the mask is off
    tokens2, pooled2 = apply(params, garbage, mask)
    np.testing.assert_allclose(pooled, pooled2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tokens)[mask], np.asarray(tokens2)[mask], rtol=1e-5, atol=1e-6)
    other, _ = TOK(["the digit 4", "a handwritten nine"])
    assert not np.allclose(apply(params, other, mask)[1][0], pooled[0])


def test_clip_loss_against_float64_numpy():
    rng = np.random.default_rng(0)
    a, b, scale = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), 1.3
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    lg = np.exp(scale) * an @ bn.T

    def ce(m):
        m = m - m.max(1, keepdims=True)
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(1)))

    expected = 0.5 * (ce(lg) + ce(lg.T))
    assert abs(float(clip_loss(jnp.asarray(a), jnp.asarray(b), scale)) - expected) < 1e-5
    # with groups, same-group pairs share the target: here groups {0,1,2},{3,4,5}
    g = np.array([0, 0, 0, 1, 1, 1])
    tgt = (g[:, None] == g[None, :]) / 3.0
    ls = lambda m: m - m.max(1, keepdims=True) - np.log(np.exp(m - m.max(1, keepdims=True)).sum(1, keepdims=True))
    expected_g = 0.5 * (-np.mean((tgt * ls(lg)).sum(1)) - np.mean((tgt * ls(lg.T)).sum(1)))
    assert abs(float(clip_loss(jnp.asarray(a), jnp.asarray(b), scale, jnp.asarray(g))) - expected_g) < 1e-5
    # aligned pairs score far lower than shuffled ones
    assert float(clip_loss(jnp.asarray(a), jnp.asarray(a), 3.0)) < float(clip_loss(jnp.asarray(a), jnp.asarray(b), 3.0))


def test_contrastive_training_aligns_images_and_captions():
    """300 steps on 10 synthetic 'classes' (a bar whose height is the class; pooled features are
    blind to position, so size is what tells them apart). The learning rate decays to zero: at a
    constant 3e-3, Adam's steps grow as the loss (and the gradient) shrinks, and a loss spike can
    land on the last step (1 seed in 8 ended at 1.1 with 4 of 10 right). Decayed, 12 seeds of both
    encoders all ended at loss 0.025..0.156, every image and every caption nearest its partner by a
    cosine margin of 0.085..0.254."""
    import optax

    imgs = np.zeros((10, 28, 28, 1), np.float32) - 1
    for k in range(10):
        imgs[k, 4 : 6 + 2 * k, 4:24] = 1
    text = TextEncoder(vocab_size=len(TOK), width=32, depth=1, embed_dim=16, max_len=8)
    image = ImageEncoder(channels=(8, 16), embed_dim=16)
    ids, mask = TOK([captions.caption("mnist", k, "a handwritten {name}") for k in range(10)])
    params = {"text": _init_once(lambda key: text.init(key, ids, mask), jax.random.key(0)),
              "image": _init_once(lambda key: image.init(key, imgs), jax.random.key(1)),
              "logit_scale": jnp.asarray(np.log(10.0))}

    def loss(p):
        return clip_loss(image.apply(p["image"], imgs), text.apply(p["text"], ids, mask)[1], p["logit_scale"])

    steps = 300
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        u, o = tx.update(jax.grad(loss)(p), o)
        return optax.apply_updates(p, u), o

    for _ in range(steps):
        params, opt = step(params, opt)
    # chance (uniform logits) is log 10 = 2.3
    final, img_emb, txt_emb = jax.jit(lambda p: (loss(p), image.apply(p["image"], imgs),
                                                 text.apply(p["text"], ids, mask)[1]))(params)
    assert float(final) < 0.3, float(final)
    img_emb, txt_emb = np.asarray(img_emb, np.float64), np.asarray(txt_emb, np.float64)
    cos = (img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)) @ (
        txt_emb / np.linalg.norm(txt_emb, axis=1, keepdims=True)).T
    # zero-shot: every image's nearest caption is its own, both ways (chance is 1 in 10)
    assert (cos.argmax(1) == np.arange(10)).all() and (cos.argmax(0) == np.arange(10)).all(), cos.round(2)


def test_held_out_templates_are_unseen():
    train = {captions.caption("mnist", y, t) for t in captions.TRAIN_TEMPLATES["mnist"] for y in range(10)}
    held = {captions.caption("mnist", y, t) for t in captions.HELD_OUT_TEMPLATES["mnist"] for y in range(10)}
    assert not train & held
    rng = np.random.default_rng(0)
    assert captions.random_captions("fashion_mnist", [7, 9], rng)[0].count("sneaker") == 1


def test_cross_attention_reads_the_context_and_ignores_its_padding():
    unet = textbook_unet(num_classes=0, channels=(8, 16), cond_dim=16, cross_attention_levels=(1,), num_heads=2)
    x, t = jnp.ones((2, 8, 8, 1)) * 0.3, jnp.array([5, 500])
    ctx = jax.random.normal(jax.random.key(0), (2, 4, 12))
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    params = _init_once(lambda key: unet.init(key, x, t, None, ctx, mask), jax.random.key(1))
    apply = jax.jit(lambda p, c: unet.apply(p, x, t, None, c, mask))  # one program, not op by op
    out = apply(params, ctx)
    padded = ctx.at[:, 3].set(100.0).at[0, 2].set(-50.0)  # only masked positions change
    np.testing.assert_allclose(apply(params, padded), out, rtol=1e-5, atol=1e-5)
    changed = ctx.at[:, 0].set(3.0)
    assert not np.allclose(apply(params, changed), out, atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        unet.apply(params, x, t)
