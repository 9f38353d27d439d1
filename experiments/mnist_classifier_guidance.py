"""Section 10.3: classifier guidance on MNIST (or Fashion-MNIST).

Trains an unconditional diffusion model (every label dropped) and, apart from it, a noisy
classifier p_phi(y | x_t, t) with cross-entropy on images noised at random t. Samples each
label with eps - gamma sqrt(1 - abar_t) grad_x log p_phi(y | x_t), the gradient from
jax.grad, at several gammas. Writes under --out: samples.png (rows = labels 0-9, columns =
--gammas), unet/ and classifier/ (each with checkpoints/, loss.csv, loss.png).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments import common
from jaxdiff import data, sampling, specs, train
from jaxdiff.pipeline import Pipeline


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_classifier_guidance")
    p.add_argument("--classifier-steps", type=common.positive_int, default=3000, help="noisy classifier steps")
    p.add_argument("--classifier-channels", type=common.channels, default=(32, 64, 128),
                   help="channels per classifier level")
    p.add_argument("--gammas", type=common.finite_floats, default=[0.0, 1.0, 3.0, 5.0, 10.0],
                   help="classifier guidance scales")
    args = p.parse_args(argv)
    with common.cli(args) as out:
        common.check_levels(args, len(args.channels))
        images, labels = common.load_data(args)
        num_classes = data.NUM_CLASSES[args.dataset]
        dtype = common.compute_dtype(args.dtype)
        meta = {"dataset": args.dataset, "split": args.split}
        # an unconditional model is the conditional one with every label dropped to the null label
        spec, unet, loss = common.label_unet(args, images, p_uncond=1.0)
        result = common.fit(args, spec, loss, images, labels, out / "unet", meta={**meta, "p_uncond": 1.0},
                            label="unet", stage=True)
        cspec = specs.NoisyClassifier(num_classes=num_classes, channels=args.classifier_channels,
                                      image_shape=images.shape[1:], schedule=spec.schedule)
        clf = cspec.module(dtype)
        clf_result = common.fit(args, cspec, train.classifier_loss(clf.apply, cspec.build_schedule()), images, labels,
                                out / "classifier", meta=meta, label="classifier",
                                config=common.train_config(args, steps=args.classifier_steps), stage=True)
        pipe = Pipeline.for_labels(spec, unet, jax.device_get(result.state.ema_params),
                                   classifier=(cspec, clf, jax.device_get(clf_result.state.ema_params)))
        t0 = time.perf_counter()
        rows = np.repeat(np.arange(num_classes), len(args.gammas))
        gam = np.tile(np.asarray(args.gammas, np.float32), num_classes)
        imgs = pipe(rows, gamma=gam, sampler=args.sampler, steps=args.sample_steps, seed=args.seed)
        common.save_grid(out / "samples.png", imgs, num_classes, len(args.gammas))
        if jax.process_index() == 0:
            print(f"done: U-Net {int(result.state.step)} steps in {result.seconds:.1f}s "
                  f"({common.speed(result)}), classifier {int(clf_result.state.step)} "
                  f"steps in {clf_result.seconds:.1f}s (final loss {common.final_loss(out / 'classifier'):.4f}), "
                  f"sampling {time.perf_counter() - t0:.1f}s ({args.sampler}, "
                  f"{sampling.nfe(args.sampler, args.sample_steps, pipe.schedule)} NFE); outputs in {out}")


if __name__ == "__main__":
    main()
