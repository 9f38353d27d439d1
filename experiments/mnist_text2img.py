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

import time

import jax
import numpy as np

from experiments import common
from experiments.mnist_autoencoder import add_flags as add_autoencoder_flags
from experiments.mnist_autoencoder import train_autoencoder
from jaxdiff import captions, data, specs, train
from jaxdiff.judge import Judge
from jaxdiff.nets.text import Tokenizer
from jaxdiff.pipeline import Pipeline

MAX_LEN = 12


def caption_table(tok, dataset, templates):
    """Token ids and masks (num_classes + 1, len(templates), L); the last class row is the empty prompt."""
    n = len(captions.CLASS_NAMES[dataset])
    texts = [[captions.caption(dataset, y, t) for t in templates] for y in range(n)] + [[""] * len(templates)]
    ids, mask = tok([t for row in texts for t in row])
    return ids.reshape(n + 1, len(templates), -1), mask.reshape(n + 1, len(templates), -1)


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_text2img")
    p.set_defaults(channels=(64, 128))
    p.add_argument("--ae-steps", type=common.positive_int, default=3000, help="autoencoder steps")
    p.add_argument("--clip-steps", type=common.positive_int, default=2000, help="contrastive text-image steps")
    p.add_argument("--prompt", action="append", default=None, help="prompt to sample (repeatable)")
    p.add_argument("--negative-prompt", default="", help="condition to steer away from (default: the empty prompt)")
    p.add_argument("--gamma", type=common.finite_float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--per-prompt", type=common.positive_int, default=8, help="samples per prompt")
    p.add_argument("--kl-weight", type=common.finite_float, default=1e-4)
    add_autoencoder_flags(p)
    g = p.add_argument_group("judging samples")
    g.add_argument("--eval-classifier", default=None,
                   help="folder of an evaluation classifier (made there first if absent): judge samples of every "
                        "template at each --eval-gammas, write text2img_quality.md")
    g.add_argument("--eval-gammas", type=common.finite_floats, default=[1.0, 3.0, 5.0])
    g.add_argument("--eval-per-class", type=common.positive_int, default=100, help="samples per class and template")
    g.add_argument("--eval-images", type=common.positive_int, default=2000, help="real test images for the ceiling")
    g.add_argument("--judge-steps", type=common.positive_int, default=3000,
                   help="steps to train an absent evaluation classifier")
    args = p.parse_args(argv)
    with common.cli(args) as out:
        run(args, out)


def run(args, out):
    prompts = args.prompt or (["a handwritten 3", "the number three", "seven"] if args.dataset == "mnist"
                              else ["a photo of a sneaker", "an image of a bag", "trouser"])
    dtype = common.compute_dtype(args.dtype)
    images, labels = common.load_data(args)
    test_images, test_labels = common.load_data(args, "test")
    n_cls = data.NUM_CLASSES[args.dataset]
    meta = {"dataset": args.dataset, "split": args.split}

    # 1. autoencoder
    ae, ae_params, encode, decode, scale = train_autoencoder(args, images, labels, test_images, out / "autoencoder",
                                                             args.ae_steps, stage=True)
    mean = encode(test_images[:1])[0]

    # 2. contrastive text and image encoders, the negatives gathered over every device
    tok = Tokenizer.from_texts(captions.all_texts(args.dataset), MAX_LEN)
    clip_spec = specs.ContrastiveText(vocab=tuple(tok.vocab), max_len=MAX_LEN, image_shape=images.shape[1:])
    text, image = clip_spec.module(dtype)
    train_ids, train_mask = caption_table(tok, args.dataset, captions.TRAIN_TEMPLATES[args.dataset])
    result = common.fit(args, clip_spec, train.contrastive_loss(text, image, train_ids, train_mask), images, labels,
                        out / "clip", meta=meta, label="clip", stage=True,
                        config=common.train_config(args, steps=args.clip_steps))
    clip_params = jax.device_get(result.state.ema_params)
    text_f32, image_f32 = clip_spec.module()
    text_tokens = jax.jit(lambda ids, mask: text_f32.apply(clip_params["text"], ids, mask))
    judged = test_images[:5000], test_labels[:5000]
    img_emb = np.asarray(jax.jit(lambda x: image_f32.apply(clip_params["image"], data.to_float(x)))(judged[0]))
    img_emb = img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
    for name, templates in [("training", captions.TRAIN_TEMPLATES), ("held-out", captions.HELD_OUT_TEMPLATES)]:
        ids, mask = caption_table(tok, args.dataset, templates[args.dataset])
        emb = np.asarray(text_tokens(ids[:n_cls].reshape(-1, MAX_LEN), mask[:n_cls].reshape(-1, MAX_LEN))[1])
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).reshape(n_cls, -1, emb.shape[-1]).mean(1)
        acc = float(np.mean(np.argmax(img_emb @ emb.T, 1) == judged[1]))
        common.note(f"zero-shot accuracy on {len(judged[1])} test images from {name} templates alone: {acc:.4f}")

    # 3. latent diffusion with cross-attention to the frozen text encoder's tokens
    spec = specs.LatentUNet(channels=args.channels, cross_attention_levels=tuple(range(len(args.channels))),
                            latent_shape=tuple(mean.shape[1:]), context_dim=text_f32.width, max_len=MAX_LEN,
                            latent_scale=scale)
    unet = spec.module(dtype)

    def prepare(x_uint8, y, keys):
        ids, mask = train.pick_captions(train_ids, train_mask, y, keys)  # y = n_cls is the empty prompt
        tokens = text_f32.apply(clip_params["text"], ids, mask)[0]
        z = ae.apply(ae_params, data.to_float(x_uint8), method="encode")[0] * scale
        return z, (tokens, mask)

    loss_fn = train.diffusion_loss(spec.eps_model(unet), spec.build_schedule(), p_uncond=0.1, null_label=n_cls,
                                   prepare=prepare)
    result = common.fit(args, spec, loss_fn, images, labels, out / "ldm", meta={**meta, "p_uncond": 0.1}, label="ldm",
                        stage=True)
    pipe = Pipeline.for_prompts(spec, unet, {"unet": jax.device_get(result.state.ema_params),
                                             "text": clip_params["text"], "autoencoder": ae_params},
                                tok, text_f32, ae)

    def sample(texts, seed, gamma=args.gamma):
        return pipe(texts, args.negative_prompt or None, gamma=gamma, sampler=args.sampler, steps=args.sample_steps,
                    seed=seed)

    t0 = time.perf_counter()
    k = args.per_prompt
    common.save_grid(out / "prompts.png", sample([q for q in prompts for _ in range(k)], args.seed), len(prompts), k)
    half = max(k // 2, 1)
    texts = [captions.caption(args.dataset, y, tpl) for y in range(n_cls)
             for tpl in [captions.TRAIN_TEMPLATES[args.dataset][0]] * half
             + [captions.HELD_OUT_TEMPLATES[args.dataset][0]] * half]
    common.save_grid(out / "classes.png", sample(texts, args.seed + 1), n_cls, 2 * half)
    sample_s = time.perf_counter() - t0
    quality = ""
    if args.eval_classifier:
        train_images, train_labels = common.load_data(args, "train")
        judge = Judge.train_or_load(args.eval_classifier, train_images, train_labels, dataset=args.dataset,
                                    steps=args.judge_steps, seed=args.seed)
        quality = judge_samples(args, out, judge, sample, test_images, test_labels, lambda x: decode(encode(x)[0]))
    if jax.process_index() == 0:
        print(f"done: latent diffusion {int(result.state.step)} steps in {result.seconds:.1f}s "
              f"({common.speed(result)}), sampling {sample_s:.1f}s; {quality}"
              f"prompts {prompts}; outputs in {out}")


def judge_samples(args, out, judge, sample, test_images, test_labels, reconstruct) -> str:
    """The evaluation classifier's accuracy on samples of every prompt template (training and held-out)
    at each --eval-gammas, beside its accuracy on real test images and on their autoencoder
    reconstructions (the ceiling a latent model can reach). Writes text2img_quality.csv/.md."""
    real, real_y = test_images[: args.eval_images], test_labels[: args.eval_images]
    acc_real = judge.accuracy(real, real_y)
    recon = data.to_uint8(np.concatenate([np.asarray(reconstruct(real[i : i + 1000]))
                                          for i in range(0, len(real), 1000)]))
    acc_recon = judge.accuracy(recon, real_y)
    n_cls = data.NUM_CLASSES[args.dataset]
    asked = np.repeat(np.arange(n_cls), args.eval_per_class)
    rows = []
    for gamma in args.eval_gammas:
        for kind, templates in [("training", captions.TRAIN_TEMPLATES), ("held-out", captions.HELD_OUT_TEMPLATES)]:
            for i, tpl in enumerate(templates[args.dataset]):
                texts = [captions.caption(args.dataset, int(y), tpl) for y in asked]
                imgs = np.concatenate([sample(texts[j : j + 1000], args.seed + 7 * i + j, gamma)
                                       for j in range(0, len(texts), 1000)])
                acc = judge.accuracy(imgs, asked)
                rows.append((gamma, kind, tpl, acc))
                common.note(f"judged: gamma {gamma:g} {kind:>9} template {tpl!r:<34} accuracy {acc:.4f}")
    lines = [f"Evaluation classifier accuracy on {len(real)} real test images {acc_real:.4f}, on their autoencoder "
             f"reconstructions {acc_recon:.4f} (the ceiling); samples: {len(asked)} per template and gamma "
             f"({args.eval_per_class} per class), {args.sampler} {args.sample_steps} steps.", "",
             "| gamma | templates | template | accuracy |", "| --- | --- | --- | --- |"]
    lines += [f"| {g:g} | {k} | `{t}` | {a:.4f} |" for g, k, t, a in rows]
    for g in args.eval_gammas:
        for k in ("training", "held-out"):
            mean_acc = np.mean([a for gg, kk, _, a in rows if gg == g and kk == k])
            lines.append(f"| {g:g} | {k}, mean | | {mean_acc:.4f} |")
    if jax.process_index() == 0:
        (out / "text2img_quality.csv").write_text("gamma,templates,template,accuracy\n"
                                                  + "".join(f'{g},{k},"{t}",{a:.4f}\n' for g, k, t, a in rows))
        (out / "text2img_quality.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    held = [a for g, k, _, a in rows if k == "held-out" and g == args.gamma] or [a for *_, a in rows]
    return (f"class accuracy of held-out-template samples {np.mean(held):.4f} (real {acc_real:.4f}, "
            f"reconstructions {acc_recon:.4f}), ")


if __name__ == "__main__":
    main()
