"""Section 10.3: classifier guidance on MNIST (or Fashion-MNIST).

Trains an unconditional diffusion model (every label dropped) and, apart from it, a noisy
classifier p_phi(y | x_t, t) with cross-entropy on images noised at random t. Samples each
label with eps - gamma sqrt(1 - abar_t) grad_x log p_phi(y | x_t), the gradient from
jax.grad, at several gammas. Writes under --out: samples.png (rows = labels 0-9, columns =
--gammas), unet/ and classifier/ (each with checkpoints/, loss.csv, loss.png).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments import common
from jaxdiff import data
from jaxdiff.pipeline import Pipeline, nfe


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_classifier_guidance")
    p.add_argument("--classifier-steps", type=common.positive_int, default=3000, help="noisy classifier steps")
    p.add_argument("--classifier-channels", default="32,64,128", help="channels per classifier level")
    p.add_argument("--gammas", type=common.finite_floats, default=[0.0, 1.0, 3.0, 5.0, 10.0], help="classifier guidance scales")
    args = p.parse_args(argv)
    images, labels = common.load_data(args)
    num_classes = data.NUM_CLASSES[args.dataset]

    unet_dir, clf_dir = os.path.join(args.out, "unet"), os.path.join(args.out, "classifier")
    os.makedirs(unet_dir, exist_ok=True)
    os.makedirs(clf_dir, exist_ok=True)
    # an unconditional model is the conditional one with every label dropped to the null label
    config, model, state, schedule, unet_s, rate = common.train_model(
        args, images, labels, unet_dir, model="unet", num_classes=num_classes, p_uncond=1.0, label="unet")
    clf_args = common.override(args, steps=args.classifier_steps)
    _, clf, clf_state, _, clf_s, _ = common.train_model(
        clf_args, images, labels, clf_dir, model="classifier", num_classes=num_classes,
        channels=common.parse_channels(args.classifier_channels), label="classifier")

    pipe = Pipeline.for_labels(model, jax.device_get(state.ema_params), schedule, config,
                               classifier=(clf, jax.device_get(clf_state.ema_params)))
    t0 = time.perf_counter()
    rows = np.repeat(np.arange(num_classes), len(args.gammas))
    gam = np.tile(np.asarray(args.gammas, np.float32), num_classes)
    imgs = pipe(rows, gamma=gam, sampler=args.sampler, steps=args.sample_steps, seed=args.seed)
    common.save_grid(os.path.join(args.out, "samples.png"), imgs, num_classes, len(args.gammas))
    print(f"done: U-Net {args.steps} steps in {unet_s:.1f}s ({rate:,.0f} img/s after compile), classifier "
          f"{args.classifier_steps} steps in {clf_s:.1f}s (final loss {common.final_loss(clf_dir):.4f}), sampling "
          f"{time.perf_counter() - t0:.1f}s ({args.sampler}, {nfe(args.sampler, args.sample_steps, schedule)} NFE); "
          f"outputs in {args.out}")


if __name__ == "__main__":
    main()
