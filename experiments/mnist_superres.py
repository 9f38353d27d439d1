"""Super-resolution, the chapter's cascaded example: 14x14 -> 28x28 by conditional diffusion.

The U-Net sees x_t concatenated with the low-resolution image (2x2 average-pooled, then
bilinearly upsampled back to 28x28) as a second channel, and predicts eps. Samples the test
split's low-resolution images and reports, against the real 28x28 images, the PSNR of the
diffusion samples and of plain bilinear upsampling, and the consistency PSNR between each
sample brought back down to 14x14 and the input it was given. Writes superres.png (columns:
low-res input, bilinear, diffusion sample, real; one row per test image), loss.csv/png and
checkpoints/ under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxdiff import data, schedules, train
from jaxdiff.nets.unet import UNet
from jaxdiff.pipeline import nfe, run_sampler


def downsample(x):
    """(B, 28, 28, C) -> (B, 14, 14, C) by 2x2 averaging."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x, size=28):
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")


def psnr(a, b):
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(4.0 / np.maximum(mse, 1e-12))


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_superres")
    p.add_argument("--eval-images", type=common.positive_int, default=1000, help="test images to upsample and score")
    p.add_argument("--rows", type=common.positive_int, default=10, help="rows in superres.png")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    images, labels = common.load_data(args)
    test_images, _ = common.load_data(argparse.Namespace(**{**vars(args), "split": "test"}))
    channels = common.parse_channels(args.channels)
    sched = schedules.linear(1000)
    net = UNet(num_classes=0, channels=channels, out_channels=1, dtype=common.compute_dtype(args.dtype))
    params = UNet(num_classes=0, channels=channels, out_channels=1).init(
        jax.random.key(args.seed), jnp.zeros((1, 28, 28, 2)), jnp.ones((1,), jnp.int32))

    def prepare(x_uint8, y, keys):
        x0 = data.to_float(x_uint8)
        return x0, upsample(downsample(x0))

    eps_model = lambda prm, x_t, t, low: net.apply(prm, jnp.concatenate([x_t, low.astype(x_t.dtype)], -1), t)
    loss_fn = train.diffusion_loss(eps_model, sched, p_uncond=0.0, null_label=0, prepare=prepare)
    config = dict(model="superres", channels=list(channels), schedule="linear", num_timesteps=1000,
                  image_shape=list(images.shape[1:]), dataset=args.dataset, split=args.split, low_res=14)
    state, train_s, rate = common.run_training(args, config, params, loss_fn, images, labels, args.out, "superres")
    params = jax.device_get(state.ema_params)

    @jax.jit
    def super_resolve(low_up, key):
        k1, k2 = jax.random.split(key)
        x_T = jax.random.normal(k1, low_up.shape)
        return run_sampler(args.sampler, lambda x, t: eps_model(params, x, t, low_up), sched, x_T, k2, args.sample_steps)

    real = data.to_float(test_images[: args.eval_images])
    low = downsample(real)
    bilinear = upsample(low)
    t0 = time.perf_counter()
    chunk = 500
    samples = np.concatenate([np.asarray(super_resolve(bilinear[i : i + chunk], jax.random.key(args.seed + i)))
                              for i in range(0, len(real), chunk)])
    sample_s = time.perf_counter() - t0
    samples = np.clip(samples, -1, 1)
    p_diff, p_bil = psnr(samples, real).mean(), psnr(bilinear, real).mean()
    p_cons = psnr(downsample(samples), low).mean()
    print(f"on {len(real)} test images: PSNR vs real 28x28: diffusion {p_diff:.2f} dB, bilinear {p_bil:.2f} dB; "
          f"consistency (sample downsampled vs its 14x14 input) {p_cons:.2f} dB", file=sys.stderr)
    r = min(args.rows, len(real))
    nearest = jnp.repeat(jnp.repeat(low[:r], 2, axis=1), 2, axis=2)
    cols = np.stack([data.to_uint8(a) for a in (nearest, bilinear[:r], samples[:r], real[:r])], axis=1)
    common.save_grid(os.path.join(args.out, "superres.png"), cols.reshape(-1, 28, 28, 1), r, 4)
    print(f"done: {args.steps} steps in {train_s:.1f}s ({rate:,.0f} img/s after compile), sampling {sample_s:.1f}s "
          f"({args.sampler}, {nfe(args.sampler, args.sample_steps, sched)} NFE); PSNR diffusion {p_diff:.2f} dB, "
          f"bilinear {p_bil:.2f} dB, consistency {p_cons:.2f} dB; outputs in {args.out}")


if __name__ == "__main__":
    main()
