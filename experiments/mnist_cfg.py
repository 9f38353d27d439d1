"""Section 10.4: classifier-free guidance on MNIST (or Fashion-MNIST), the main job.

Trains one class-conditional U-Net whose labels are dropped to the null label with
probability 0.1 per example, then samples every label at several guidance scales
gamma: eps = eps_u + gamma (eps_c - eps_u). Writes, under --out:
  samples.png          rows = labels 0-9, columns = gamma values (--gammas)
  samples_gamma<G>.png rows = labels 0-9, columns = --per-label samples at --gamma
  negative.png         rows = labels 0-9 sampled with the negative label (y + 1) mod 10
  loss.csv, loss.png   the training loss; checkpoints/ (orbax), resumable with --resume
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from experiments import common
from jaxdiff import data
from jaxdiff.pipeline import Pipeline, nfe


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_cfg")
    p.add_argument("--p-uncond", type=float, default=0.1, help="per-example probability of the null label")
    p.add_argument("--gammas", type=common.finite_floats, default=[0.0, 1.0, 2.0, 3.0, 5.0], help="guidance scales for samples.png")
    p.add_argument("--gamma", type=float, default=3.0, help="guidance scale for the per-label grid")
    p.add_argument("--per-label", type=common.positive_int, default=10, help="samples per label in the per-label grid")
    p.add_argument("--eval-classifier", default=None,
                   help="folder of an evaluation classifier (made there first if absent, as experiments.evaluate "
                        "makes it): report the class accuracy of --eval-samples samples at --gamma")
    p.add_argument("--eval-samples", type=common.positive_int, default=1000)
    p.add_argument("--judge-steps", type=common.positive_int, default=3000, help="steps to train an absent evaluation classifier")
    args = p.parse_args(argv)
    if not math.isfinite(args.gamma):
        common.fail(f"--gamma must be finite, got {args.gamma}")
    if not 0 <= args.p_uncond < 1:
        common.fail(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    os.makedirs(args.out, exist_ok=True)

    images, labels = common.load_data(args)
    num_classes = data.NUM_CLASSES[args.dataset]
    config, model, state, schedule, train_s, rate = common.train_model(
        args, images, labels, args.out, model="unet", num_classes=num_classes, p_uncond=args.p_uncond)

    pipe = Pipeline.for_labels(model, jax.device_get(state.ema_params), schedule, config)
    t0 = time.perf_counter()
    rows = np.repeat(np.arange(num_classes), len(args.gammas))
    gam = np.tile(np.asarray(args.gammas, np.float32), num_classes)
    imgs = pipe(rows, gamma=gam, sampler=args.sampler, steps=args.sample_steps, seed=args.seed)
    common.save_grid(os.path.join(args.out, "samples.png"), imgs, num_classes, len(args.gammas))
    rows = np.repeat(np.arange(num_classes), args.per_label)
    imgs = pipe(rows, gamma=args.gamma, sampler=args.sampler, steps=args.sample_steps, seed=args.seed + 1)
    common.save_grid(os.path.join(args.out, f"samples_gamma{args.gamma:g}.png"), imgs, num_classes, args.per_label)
    neg = pipe(rows, negative=(rows + 1) % num_classes, gamma=args.gamma, sampler=args.sampler,
               steps=args.sample_steps, seed=args.seed + 1)
    common.save_grid(os.path.join(args.out, "negative.png"), neg, num_classes, args.per_label)
    sample_s = time.perf_counter() - t0
    accuracy = ""
    if args.eval_classifier:
        logits, _ = common.judge(args, args.eval_classifier, args.judge_steps)
        asked = np.arange(args.eval_samples) % num_classes
        imgs = pipe(asked, gamma=args.gamma, sampler=args.sampler, steps=args.sample_steps, seed=args.seed + 2)
        said = common.batched(logits, imgs).argmax(-1)
        accuracy = f"class accuracy {np.mean(said == asked):.4f} ({args.eval_samples} samples, gamma {args.gamma:g}), "
    print(f"done: {args.steps} steps in {train_s:.1f}s ({rate:,.0f} img/s after compile), sampling "
          f"{sample_s:.1f}s ({args.sampler}, {nfe(args.sampler, args.sample_steps, schedule)} NFE), "
          f"{accuracy}final loss {common.final_loss(args.out):.4f}, "
          f"skipped {int(state.skipped)}; outputs in {args.out}")


if __name__ == "__main__":
    main()
