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
one), and prints reconstruction error, KL and zero-shot accuracy of the text space. With
--eval-classifier, an evaluation classifier judges samples of every template at several gammas
(text2img_quality.md). The run's folder loads back as a prompt pipeline:
Pipeline.from_checkpoint(out)(["a handwritten 3"]).

    python -m experiments.mnist_text2img --prompt "a handwritten 3" --prompt "the number seven"
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.mnist_autoencoder import train_autoencoder
from jaxdiff import captions, data, schedules, train
from jaxdiff.nets.autoencoder import Autoencoder
from jaxdiff.nets.text import Tokenizer, clip_loss
from jaxdiff.pipeline import Pipeline, init_params, model_from_config, text_eps

MAX_LEN = 12


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
    g = p.add_argument_group("judging samples")
    g.add_argument("--eval-classifier", default=None,
                   help="folder of an evaluation classifier (made there first if absent): judge samples of every "
                        "template at each --eval-gammas, write text2img_quality.md")
    g.add_argument("--eval-gammas", type=common.finite_floats, default=[1.0, 3.0, 5.0])
    g.add_argument("--eval-per-class", type=common.positive_int, default=100, help="samples per class and template")
    g.add_argument("--eval-images", type=common.positive_int, default=2000, help="real test images for the ceiling")
    g.add_argument("--judge-steps", type=common.positive_int, default=3000, help="steps to train an absent evaluation classifier")
    args = p.parse_args(argv)
    if not math.isfinite(args.gamma):
        common.fail(f"--gamma must be finite, got {args.gamma}")
    prompts = args.prompt or (["a handwritten 3", "the number three", "seven"] if args.dataset == "mnist"
                              else ["a photo of a sneaker", "an image of a bag", "trouser"])
    dtype = common.compute_dtype(args.dtype)
    images, labels = common.load_data(args)
    test_images, test_labels = common.load_data(common.override(args, split="test"))
    n_cls = data.NUM_CLASSES[args.dataset]
    sched = schedules.linear(1000)
    base = dict(dataset=args.dataset, split=args.split, image_shape=list(images.shape[1:]), schedule="linear",
                num_timesteps=1000)

    # 1. autoencoder
    ae_f32, ae_params, encode, decode, scale = train_autoencoder(args, images, labels, test_images,
                                                                 os.path.join(args.out, "autoencoder"), args.ae_steps)
    mean = encode(test_images[:1])[0]

    # 2. contrastive text and image encoders
    tok = Tokenizer.from_texts(captions.all_texts(args.dataset), MAX_LEN)
    cfg = {**base, "model": "clip", "vocab": tok.vocab, "max_len": MAX_LEN}
    (text, image), (text_f32, image_f32) = model_from_config(cfg, dtype), model_from_config(cfg)
    clip_params = init_params((text_f32, image_f32), cfg, args.seed + 1)
    train_ids, train_mask = caption_table(tok, args.dataset, captions.TRAIN_TEMPLATES[args.dataset])

    def clip_loss_fn(params, x_uint8, y, key, offset):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, offset + jnp.arange(y.shape[0]))
        ids, mask = pick_captions(train_ids, train_mask, y, keys)
        img = image.apply(params["image"], data.to_float(x_uint8))
        txt = text.apply(params["text"], ids, mask)[1]
        return clip_loss(img, txt, params["logit_scale"], groups=y)

    out = os.path.join(args.out, "clip")
    os.makedirs(out, exist_ok=True)
    state, _, _ = common.run_training(common.override(args, steps=args.clip_steps), cfg, clip_params, clip_loss_fn,
                                      images, labels, out, "clip")
    clip_params = jax.device_get(state.ema_params)
    text_tokens = jax.jit(lambda ids, mask: text_f32.apply(clip_params["text"], ids, mask))
    judged = test_images[:5000], test_labels[:5000]
    img_emb = np.asarray(jax.jit(lambda x: image_f32.apply(clip_params["image"], data.to_float(x)))(judged[0]))
    img_emb = img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
    for name, templates in [("training", captions.TRAIN_TEMPLATES), ("held-out", captions.HELD_OUT_TEMPLATES)]:
        ids, mask = caption_table(tok, args.dataset, templates[args.dataset])
        emb = np.asarray(text_tokens(ids[:n_cls].reshape(-1, MAX_LEN), mask[:n_cls].reshape(-1, MAX_LEN))[1])
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).reshape(n_cls, -1, emb.shape[-1]).mean(1)
        acc = float(np.mean(np.argmax(img_emb @ emb.T, 1) == judged[1]))
        print(f"zero-shot accuracy on {len(judged[1])} test images from {name} templates alone: {acc:.4f}", file=sys.stderr)

    # 3. latent diffusion with cross-attention to the text tokens
    channels = common.parse_channels(args.channels)
    cfg = {**base, "model": "ldm", "channels": list(channels), "cross_attention_levels": list(range(len(channels))),
           "cond_dim": 128, "latent_shape": list(mean.shape[1:]), "context_dim": text_f32.width, "max_len": MAX_LEN,
           "latent_scale": scale}
    unet = model_from_config(cfg, dtype)
    unet_params = init_params(model_from_config(cfg), cfg, args.seed + 3)

    def prepare(x_uint8, y, keys):
        ids, mask = pick_captions(train_ids, train_mask, y, keys)  # y = n_cls is the empty prompt
        tokens = text_f32.apply(clip_params["text"], ids, mask)[0]
        z = ae_f32.apply(ae_params, data.to_float(x_uint8), method=Autoencoder.encode)[0] * scale
        return z, (tokens, mask)

    loss_fn = train.diffusion_loss(text_eps(unet), sched, p_uncond=0.1, null_label=n_cls, prepare=prepare)
    out = os.path.join(args.out, "ldm")
    os.makedirs(out, exist_ok=True)
    state, ldm_s, rate = common.run_training(args, cfg, unet_params, loss_fn, images, labels, out, "ldm")
    pipe = Pipeline.for_prompts(unet, {"unet": jax.device_get(state.ema_params), "text": clip_params["text"],
                                       "autoencoder": ae_params}, sched, tok, text_f32, ae_f32, cfg)

    def sample(texts, seed, gamma=args.gamma):
        return pipe(texts, args.negative_prompt or None, gamma=gamma, sampler=args.sampler, steps=args.sample_steps,
                    seed=seed)

    t0 = time.perf_counter()
    k = args.per_prompt
    common.save_grid(os.path.join(args.out, "prompts.png"), sample([q for q in prompts for _ in range(k)], args.seed),
                     len(prompts), k)
    half = max(k // 2, 1)
    texts = [captions.caption(args.dataset, y, tpl) for y in range(n_cls)
             for tpl in [captions.TRAIN_TEMPLATES[args.dataset][0]] * half + [captions.HELD_OUT_TEMPLATES[args.dataset][0]] * half]
    common.save_grid(os.path.join(args.out, "classes.png"), sample(texts, args.seed + 1), n_cls, 2 * half)
    sample_s = time.perf_counter() - t0
    quality = ""
    if args.eval_classifier:
        quality = judge_samples(args, sample, test_images, test_labels, lambda x: decode(encode(x)[0]))
    print(f"done: latent diffusion {args.steps} steps in {ldm_s:.1f}s ({rate:,.0f} img/s after compile), sampling "
          f"{sample_s:.1f}s; {quality}prompts {prompts}; outputs in {args.out}")


def judge_samples(args, sample, test_images, test_labels, reconstruct) -> str:
    """The evaluation classifier's accuracy on samples of every prompt template (training and held-out)
    at each --eval-gammas, beside its accuracy on real test images and on their autoencoder
    reconstructions (the ceiling a latent model can reach). Writes text2img_quality.csv/.md."""
    logits, _ = common.judge(args, args.eval_classifier, args.judge_steps)
    real, real_y = test_images[: args.eval_images], test_labels[: args.eval_images]
    acc_real = float(np.mean(common.batched(logits, real).argmax(-1) == real_y))
    recon = data.to_uint8(common.batched(reconstruct, real))
    acc_recon = float(np.mean(common.batched(logits, recon).argmax(-1) == real_y))
    n_cls = data.NUM_CLASSES[args.dataset]
    asked = np.repeat(np.arange(n_cls), args.eval_per_class)
    rows = []
    for gamma in args.eval_gammas:
        for kind, templates in [("training", captions.TRAIN_TEMPLATES), ("held-out", captions.HELD_OUT_TEMPLATES)]:
            for i, tpl in enumerate(templates[args.dataset]):
                texts = [captions.caption(args.dataset, int(y), tpl) for y in asked]
                imgs = np.concatenate([sample(texts[j : j + 1000], args.seed + 7 * i + j, gamma)
                                       for j in range(0, len(texts), 1000)])
                acc = float(np.mean(common.batched(logits, imgs).argmax(-1) == asked))
                rows.append((gamma, kind, tpl, acc))
                print(f"judged: gamma {gamma:g} {kind:>9} template {tpl!r:<34} accuracy {acc:.4f}", file=sys.stderr)
    with open(os.path.join(args.out, "text2img_quality.csv"), "w") as f:
        f.write("gamma,templates,template,accuracy\n")
        f.writelines(f'{g},{k},"{t}",{a:.4f}\n' for g, k, t, a in rows)
    lines = [f"Evaluation classifier accuracy on {len(real)} real test images {acc_real:.4f}, on their autoencoder "
             f"reconstructions {acc_recon:.4f} (the ceiling); samples: {len(asked)} per template and gamma "
             f"({args.eval_per_class} per class), {args.sampler} {args.sample_steps} steps.", "",
             "| gamma | templates | template | accuracy |", "| --- | --- | --- | --- |"]
    lines += [f"| {g:g} | {k} | `{t}` | {a:.4f} |" for g, k, t, a in rows]
    for g in args.eval_gammas:
        for k in ("training", "held-out"):
            mean_acc = np.mean([a for gg, kk, _, a in rows if gg == g and kk == k])
            lines.append(f"| {g:g} | {k}, mean | | {mean_acc:.4f} |")
    with open(os.path.join(args.out, "text2img_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    held = [a for g, k, _, a in rows if k == "held-out" and g == args.gamma] or [a for *_, a in rows]
    return (f"class accuracy of held-out-template samples {np.mean(held):.4f} (real {acc_real:.4f}, "
            f"reconstructions {acc_recon:.4f}), ")


if __name__ == "__main__":
    main()
