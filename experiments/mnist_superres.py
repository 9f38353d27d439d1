"""Super-resolution, the chapter's cascaded example: 14x14 -> 28x28 by conditional diffusion.

The U-Net sees x_t concatenated with the low-resolution image (2x2 average-pooled, then
bilinearly upsampled back to 28x28) as a second channel, and predicts eps. The low-resolution
image is dropped to a blank one with probability --p-uncond, so guidance (gamma) and negative
images work as for labels; sampling uses gamma 1 (no guidance) unless told. Samples the test
split's low-resolution images and reports, against the real 28x28 images, the PSNR of the
diffusion samples and of plain bilinear upsampling, and the consistency PSNR between each
sample brought back down to 14x14 and the input it was given. Writes superres.png (columns:
low-res input, bilinear, diffusion sample, real; one row per test image), loss.csv/png and
checkpoints/ under --out.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxdiff import data, sampling, specs, train
from jaxdiff.conditions import downsample, upsample
from jaxdiff.pipeline import Pipeline

NULL = -1  # the label that marks a dropped condition (class labels are otherwise unused here)


def psnr(a, b):
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(4.0 / np.maximum(mse, 1e-12))


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_superres")
    p.add_argument("--eval-images", type=common.positive_int, default=1000, help="test images to upsample and score")
    p.add_argument("--rows", type=common.positive_int, default=10, help="rows in superres.png")
    p.add_argument("--p-uncond", type=common.probability, default=0.1,
                   help="per-example probability of a blank low-res image")
    p.add_argument("--gamma", type=common.finite_float, default=1.0, help="guidance scale when sampling (1: none)")
    args = p.parse_args(argv)
    with common.cli(args) as out:
        run(args, out)


def run(args, out):
    images, labels = common.load_data(args)
    test_images, _ = common.load_data(args, "test")
    spec = specs.SuperRes(channels=args.channels, image_shape=images.shape[1:], low_res=images.shape[1] // 2)
    net = spec.module(common.compute_dtype(args.dtype))

    def prepare(x_uint8, y, keys):
        x0 = data.to_float(x_uint8)
        low = upsample(downsample(x0), x0.shape[1])
        return x0, jnp.where((y == NULL)[:, None, None, None], 0.0, low)  # dropped: a blank image

    loss_fn = train.diffusion_loss(spec.eps_model(net), spec.build_schedule(), p_uncond=args.p_uncond, null_label=NULL,
                                   prepare=prepare)
    result = common.fit(args, spec, loss_fn, images, labels, out,
                        meta={"dataset": args.dataset, "split": args.split, "p_uncond": args.p_uncond})
    pipe = Pipeline.for_low_res(spec, net, jax.device_get(result.state.ema_params))

    real_uint8 = test_images[: args.eval_images]
    real = data.to_float(real_uint8)
    low_uint8 = data.to_uint8(downsample(real))  # what a user holds: a small uint8 image
    low = data.to_float(low_uint8)
    bilinear = upsample(low, real.shape[1])
    t0 = time.perf_counter()
    chunk = 500
    samples = np.concatenate([pipe(low_uint8[i : i + chunk], gamma=args.gamma, sampler=args.sampler,
                                   steps=args.sample_steps, seed=args.seed + i) for i in range(0, len(real), chunk)])
    sample_s = time.perf_counter() - t0
    samples = data.to_float(samples)
    p_diff, p_bil = psnr(samples, real).mean(), psnr(bilinear, real).mean()
    p_cons = psnr(downsample(samples), low).mean()
    common.note(f"on {len(real)} test images: PSNR vs real 28x28: diffusion {p_diff:.2f} dB, bilinear {p_bil:.2f} dB; "
                f"consistency (sample downsampled vs its 14x14 input) {p_cons:.2f} dB")
    r = min(args.rows, len(real))
    nearest = jnp.repeat(jnp.repeat(low[:r], 2, axis=1), 2, axis=2)
    cols = np.stack([data.to_uint8(a) for a in (nearest, bilinear[:r], samples[:r], real[:r])], axis=1)
    common.save_grid(out / "superres.png", cols.reshape(-1, *real.shape[1:]), r, 4)
    if jax.process_index() == 0:
        print(f"done: {int(result.state.step)} steps in {result.seconds:.1f}s ({common.speed(result)}), "
              f"sampling {sample_s:.1f}s ({args.sampler}, "
              f"{sampling.nfe(args.sampler, args.sample_steps, pipe.schedule)} NFE); PSNR diffusion {p_diff:.2f} dB, "
              f"bilinear {p_bil:.2f} dB, consistency {p_cons:.2f} dB; outputs in {out}")


if __name__ == "__main__":
    main()
