"""Section 10.5: Stable Diffusion's elements on MNIST (or Fashion-MNIST), trained here.

Three stages, each in its own folder under --out with checkpoints (rerun with --resume):
  autoencoder/  a KL-regularised autoencoder, 28x28 <-> 4x8x8 latents, scaled to unit variance
  clip/         a transformer text encoder and a conv image encoder trained with symmetric
                InfoNCE on (image, caption) pairs made from the labels with varied templates
  ldm/          a U-Net on the latents with cross-attention to the frozen text encoder's tokens;
                10% of captions dropped to the empty prompt, for classifier-free guidance
Then samples the --prompt texts (and every class through a training template and a template
never seen in training) and decodes them. Writes prompts.png (rows = prompts, columns =
samples), classes.png (rows = classes; left half a training template, right half a held-out
one), and prints reconstruction error, KL and zero-shot accuracy of the text space.

    python -m experiments.mnist_text2img --prompt "a handwritten 3" --prompt "the number seven"
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxdiff import captions, data, guidance, schedules, train
from jaxdiff.nets.autoencoder import Autoencoder, gaussian_kl, vae_loss
from jaxdiff.nets.text import ImageEncoder, TextEncoder, Tokenizer, clip_loss
from jaxdiff.nets.unet import UNet
from jaxdiff.pipeline import run_sampler

MAX_LEN = 12


def stage_args(args, steps):
    return argparse.Namespace(**{**vars(args), "steps": steps})


def caption_table(tok, dataset, templates):
    """Token ids and masks (num_classes + 1, len(templates), L); the last class row is the empty prompt."""
    n = len(captions.CLASS_NAMES[dataset])
    texts = [[captions.caption(dataset, y, t) for t in templates] for y in range(n)] + [[""] * len(templates)]
    ids, mask = tok([t for row in texts for t in row])
    return ids.reshape(n + 1, len(templates), -1), mask.reshape(n + 1, len(templates), -1)


def pick_captions(table_ids, table_mask, y, keys):
    idx = jax.vmap(lambda k: jax.random.randint(k, (), 0, table_ids.shape[1]))(keys)
    return jnp.asarray(table_ids)[y, idx], jnp.asarray(table_mask)[y, idx]


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_text2img")
    p.set_defaults(channels="64,128")
    p.add_argument("--ae-steps", type=common.positive_int, default=3000, help="autoencoder steps")
    p.add_argument("--clip-steps", type=common.positive_int, default=2000, help="contrastive text-image steps")
    p.add_argument("--prompt", action="append", default=None, help="prompt to sample (repeatable)")
    p.add_argument("--negative-prompt", default="", help="condition to steer away from (default: the empty prompt)")
    p.add_argument("--gamma", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--per-prompt", type=common.positive_int, default=8, help="samples per prompt")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    args = p.parse_args(argv)
    if not math.isfinite(args.gamma):
        common.fail(f"--gamma must be finite, got {args.gamma}")
    prompts = args.prompt or (["a handwritten 3", "the number three", "seven"] if args.dataset == "mnist"
                              else ["a photo of a sneaker", "an image of a bag", "trouser"])
    dtype = common.compute_dtype(args.dtype)
    images, labels = common.load_data(args)
    test_images, test_labels = common.load_data(argparse.Namespace(**{**vars(args), "split": "test"}))
    n_cls = data.NUM_CLASSES[args.dataset]
    sched = schedules.linear(1000)
    base = dict(dataset=args.dataset, split=args.split, image_shape=list(images.shape[1:]), schedule="linear",
                num_timesteps=1000)

    # 1. autoencoder
    ae = Autoencoder(channels=(32, 64, 128), latent_channels=4, dtype=dtype)
    ae_f32 = Autoencoder(channels=(32, 64, 128), latent_channels=4)
    ae_params = ae_f32.init(jax.random.key(args.seed), jnp.zeros((1, 28, 28, 1)), jax.random.key(1))
    cfg = {**base, "model": "autoencoder", "channels": [32, 64, 128], "latent_channels": 4, "kl_weight": args.kl_weight}
    out = os.path.join(args.out, "autoencoder")
    os.makedirs(out, exist_ok=True)
    state, _, _ = common.run_training(stage_args(args, args.ae_steps), cfg, ae_params,
                                      vae_loss(ae.apply, kl_weight=args.kl_weight), images, labels, out, "autoencoder")
    ae_params = jax.device_get(state.ema_params)
    encode = jax.jit(lambda x: ae_f32.apply(ae_params, data.to_float(x), method=Autoencoder.encode))
    decode = jax.jit(lambda z: ae_f32.apply(ae_params, z, method=Autoencoder.decode))
    sub = test_images[:2000]
    mean, logvar = encode(sub)
    recon = np.asarray(decode(mean))
    mse = float(np.mean((recon - data.to_float(sub)) ** 2))
    kl = float(np.mean(gaussian_kl(mean, logvar)))
    train_means = np.asarray(encode(images[:5000])[0])
    scale = float(1.0 / train_means.std())
    print(f"autoencoder: test reconstruction MSE {mse:.4f} (images in [-1, 1]), KL {kl:.1f} nats/image, "
          f"latent std {1 / scale:.3f} -> scale {scale:.3f}", file=sys.stderr)

    # 2. contrastive text and image encoders
    tok = Tokenizer.from_texts(captions.all_texts(args.dataset), MAX_LEN)
    text = TextEncoder(vocab_size=len(tok), max_len=MAX_LEN, dtype=dtype)
    text_f32 = TextEncoder(vocab_size=len(tok), max_len=MAX_LEN)
    image = ImageEncoder(dtype=dtype)
    ids0, mask0 = tok(["a"])
    clip_params = {"text": text_f32.init(jax.random.key(args.seed + 1), ids0, mask0),
                   "image": ImageEncoder().init(jax.random.key(args.seed + 2), jnp.zeros((1, 28, 28, 1))),
                   "logit_scale": jnp.asarray(math.log(10.0), jnp.float32)}
    train_ids, train_mask = caption_table(tok, args.dataset, captions.TRAIN_TEMPLATES[args.dataset])

    def clip_loss_fn(params, x_uint8, y, key, offset):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, offset + jnp.arange(y.shape[0]))
        ids, mask = pick_captions(train_ids, train_mask, y, keys)
        img = image.apply(params["image"], data.to_float(x_uint8))
        txt = text.apply(params["text"], ids, mask)[1]
        return clip_loss(img, txt, params["logit_scale"], groups=y)

    cfg = {**base, "model": "clip", "vocab": tok.vocab, "max_len": MAX_LEN}
    out = os.path.join(args.out, "clip")
    os.makedirs(out, exist_ok=True)
    state, _, _ = common.run_training(stage_args(args, args.clip_steps), cfg, clip_params, clip_loss_fn,
                                      images, labels, out, "clip")
    clip_params = jax.device_get(state.ema_params)
    text_tokens = jax.jit(lambda ids, mask: text_f32.apply(clip_params["text"], ids, mask))
    judged = test_images[:5000], test_labels[:5000]
    img_emb = np.asarray(jax.jit(lambda x: ImageEncoder().apply(clip_params["image"], data.to_float(x)))(judged[0]))
    img_emb = img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
    for name, templates in [("training", captions.TRAIN_TEMPLATES), ("held-out", captions.HELD_OUT_TEMPLATES)]:
        ids, mask = caption_table(tok, args.dataset, templates[args.dataset])
        emb = np.asarray(text_tokens(ids[:n_cls].reshape(-1, MAX_LEN), mask[:n_cls].reshape(-1, MAX_LEN))[1])
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).reshape(n_cls, -1, emb.shape[-1]).mean(1)
        acc = float(np.mean(np.argmax(img_emb @ emb.T, 1) == judged[1]))
        print(f"zero-shot accuracy on {len(judged[1])} test images from {name} templates alone: {acc:.4f}", file=sys.stderr)

    # 3. latent diffusion with cross-attention to the text tokens
    channels = common.parse_channels(args.channels)
    levels = list(range(len(channels)))
    unet = UNet(num_classes=0, channels=channels, cond_dim=128, cross_attention_levels=levels, out_channels=4, dtype=dtype)
    unet_params = UNet(num_classes=0, channels=channels, cond_dim=128, cross_attention_levels=levels, out_channels=4).init(
        jax.random.key(args.seed + 3), jnp.zeros((1, 8, 8, 4)), jnp.ones((1,), jnp.int32), None,
        jnp.zeros((1, MAX_LEN, text_f32.width)), jnp.ones((1, MAX_LEN), bool))

    def prepare(x_uint8, y, keys):
        ids, mask = pick_captions(train_ids, train_mask, y, keys)  # y = n_cls is the empty prompt
        tokens = text_f32.apply(clip_params["text"], ids, mask)[0]
        z = ae_f32.apply(ae_params, data.to_float(x_uint8), method=Autoencoder.encode)[0] * scale
        return z, (tokens, mask)

    eps_model = lambda params, x, t, c: unet.apply(params, x, t, None, c[0], c[1])
    loss_fn = train.diffusion_loss(eps_model, sched, p_uncond=0.1, null_label=n_cls, prepare=prepare)
    cfg = {**base, "model": "ldm", "channels": list(channels), "cross_attention_levels": levels, "latent_scale": scale}
    out = os.path.join(args.out, "ldm")
    os.makedirs(out, exist_ok=True)
    state, ldm_s, rate = common.run_training(args, cfg, unet_params, loss_fn, images, labels, out, "ldm")
    unet_params = jax.device_get(state.ema_params)

    @jax.jit
    def generate(params, ids, mask, neg_ids, neg_mask, key):
        cond = text_tokens(ids, mask)[0], mask
        uncond = text_tokens(neg_ids, neg_mask)[0], neg_mask
        eps_fn = guidance.cfg(lambda x, t, c: eps_model(params, x, t, c), cond, uncond, args.gamma)
        k1, k2 = jax.random.split(key)
        z = run_sampler(args.sampler, eps_fn, sched, jax.random.normal(k1, (ids.shape[0], 8, 8, 4)), k2, args.sample_steps)
        return decode(z / scale)

    def sample(texts, seed):
        ids, mask = tok(texts)
        nid, nmask = tok([args.negative_prompt] * len(texts))
        return data.to_uint8(generate(unet_params, ids, mask, nid, nmask, jax.random.key(seed)))

    t0 = time.perf_counter()
    k = args.per_prompt
    common.save_grid(os.path.join(args.out, "prompts.png"), sample([q for q in prompts for _ in range(k)], args.seed),
                     len(prompts), k)
    half = max(k // 2, 1)
    texts = [captions.caption(args.dataset, y, tpl) for y in range(n_cls)
             for tpl in [captions.TRAIN_TEMPLATES[args.dataset][0]] * half + [captions.HELD_OUT_TEMPLATES[args.dataset][0]] * half]
    common.save_grid(os.path.join(args.out, "classes.png"), sample(texts, args.seed + 1), n_cls, 2 * half)
    print(f"done: latent diffusion {args.steps} steps in {ldm_s:.1f}s ({rate:,.0f} img/s after compile), sampling "
          f"{time.perf_counter() - t0:.1f}s; prompts {prompts}; outputs in {args.out}")


if __name__ == "__main__":
    main()
