"""Section 10.1: a class-conditional diffusion model on MNIST (or Fashion-MNIST).

Trains eps_theta(x_t, t, y) with the label embedding added to the sinusoidal time
embedding, never dropping labels, and samples each label by plain conditional sampling.
Writes samples.png (rows = labels 0-9, columns = samples), loss.csv, loss.png and
checkpoints/ under --out.
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
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_cond")
    p.add_argument("--per-label", type=common.positive_int, default=10, help="samples per label")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    images, labels = common.load_data(args)
    num_classes = data.NUM_CLASSES[args.dataset]
    config, model, state, schedule, train_s, rate = common.train_model(
        args, images, labels, args.out, model="unet", num_classes=num_classes, p_uncond=0.0)
    pipe = Pipeline.for_labels(model, jax.device_get(state.ema_params), schedule, config)
    t0 = time.perf_counter()
    rows = np.repeat(np.arange(num_classes), args.per_label)
    # gamma = 1 is eps_c alone: conditional sampling, no guidance
    imgs = pipe(rows, gamma=1.0, sampler=args.sampler, steps=args.sample_steps, seed=args.seed)
    common.save_grid(os.path.join(args.out, "samples.png"), imgs, num_classes, args.per_label)
    print(f"done: {args.steps} steps in {train_s:.1f}s ({rate:,.0f} img/s after compile), sampling "
          f"{time.perf_counter() - t0:.1f}s ({args.sampler}, {nfe(args.sampler, args.sample_steps, schedule)} NFE), "
          f"final loss {common.final_loss(args.out):.4f}; outputs in {args.out}")


if __name__ == "__main__":
    main()
