"""Section 10.1: a class-conditional diffusion model on MNIST (or Fashion-MNIST).

Trains eps_theta(x_t, t, y) with the label embedding added to the sinusoidal time
embedding, never dropping labels, and samples each label by plain conditional sampling.
Writes samples.png (rows = labels 0-9, columns = samples), loss.csv, loss.png and
checkpoints/ under --out.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments import common
from jaxdiff import data, sampling
from jaxdiff.pipeline import Pipeline


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_cond")
    p.add_argument("--per-label", type=common.positive_int, default=10, help="samples per label")
    args = p.parse_args(argv)
    with common.cli(args) as out:
        common.check_levels(args, len(args.channels))
        images, labels = common.load_data(args)
        num_classes = data.NUM_CLASSES[args.dataset]
        spec, module, loss = common.label_unet(args, images, p_uncond=0.0)
        result = common.fit(args, spec, loss, images, labels, out,
                            meta={"dataset": args.dataset, "split": args.split, "p_uncond": 0.0})
        pipe = Pipeline.for_labels(spec, module, jax.device_get(result.state.ema_params))
        t0 = time.perf_counter()
        rows = np.repeat(np.arange(num_classes), args.per_label)
        # gamma = 1 is eps_c alone: conditional sampling, no guidance
        imgs = pipe(rows, gamma=1.0, sampler=args.sampler, steps=args.sample_steps, seed=args.seed)
        common.save_grid(out / "samples.png", imgs, num_classes, args.per_label)
        if jax.process_index() == 0:
            print(f"done: {int(result.state.step)} steps in {result.seconds:.1f}s ({common.speed(result)}), "
                  f"sampling {time.perf_counter() - t0:.1f}s ({args.sampler}, "
                  f"{sampling.nfe(args.sampler, args.sample_steps, pipe.schedule)} NFE), final loss "
                  f"{common.final_loss(out):.4f}; outputs in {out}")


if __name__ == "__main__":
    main()
