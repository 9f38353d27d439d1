"""Latent diffusion's autoencoder on its own (section 10.5): a KL-regularised autoencoder,
28x28 <-> 4x8x8 latents, trained here. Reports the test reconstruction error, the KL per image
and the scale that brings the latents to unit variance for diffusion; writes
reconstructions.png (pairs of rows: real test images above their reconstructions), loss.csv/png
and checkpoints/ under --out. mnist_text2img trains the same model as its first stage.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from experiments import common
from jaxdiff import data
from jaxdiff.nets.autoencoder import Autoencoder, gaussian_kl, vae_loss
from jaxdiff.pipeline import init_params, model_from_config


def train_autoencoder(args, images, labels, test_images, out: str, steps: int):
    """Train (or resume) in ``out``; returns (float32 module, EMA params, encode, decode, latent scale)."""
    cfg = dict(model="autoencoder", channels=[32, 64, 128], latent_channels=4, kl_weight=args.kl_weight,
               dataset=args.dataset, split=args.split, image_shape=list(images.shape[1:]), schedule="linear",
               num_timesteps=1000)
    ae, ae_f32 = model_from_config(cfg, common.compute_dtype(args.dtype)), model_from_config(cfg)
    os.makedirs(out, exist_ok=True)
    state, _, _ = common.run_training(common.override(args, steps=steps), cfg, init_params(ae_f32, cfg, args.seed),
                                      vae_loss(ae.apply, kl_weight=args.kl_weight), images, labels, out, "autoencoder")
    params = jax.device_get(state.ema_params)
    encode = jax.jit(lambda x: ae_f32.apply(params, data.to_float(x), method=Autoencoder.encode))
    decode = jax.jit(lambda z: ae_f32.apply(params, z, method=Autoencoder.decode))
    sub = test_images[:2000]
    mean, logvar = encode(sub)
    mse = float(np.mean((np.asarray(decode(mean)) - data.to_float(sub)) ** 2))
    kl = float(np.mean(gaussian_kl(mean, logvar)))
    scale = float(1.0 / np.asarray(encode(images[:5000])[0]).std())
    print(f"autoencoder: test reconstruction MSE {mse:.4f} (images in [-1, 1]), KL {kl:.1f} nats/image, "
          f"latent std {1 / scale:.3f} -> scale {scale:.3f}", file=sys.stderr)
    return ae_f32, params, encode, decode, scale


def main(argv=None):
    p = common.parser(__doc__, steps=3000, batch_size=256, out="runs/mnist_autoencoder")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term against the squared error")
    p.add_argument("--rows", type=common.positive_int, default=4, help="pairs of rows in reconstructions.png")
    args = p.parse_args(argv)
    images, labels = common.load_data(args)
    test_images, _ = common.load_data(common.override(args, split="test"))
    _, _, encode, decode, scale = train_autoencoder(args, images, labels, test_images, args.out, args.steps)
    n = min(args.rows * 10, len(test_images))
    real = test_images[:n]
    recon = data.to_uint8(decode(encode(real)[0]))
    rows = -(-n // 10)
    pad = lambda x: np.concatenate([x, np.zeros((rows * 10 - n, *x.shape[1:]), np.uint8)])
    pairs = np.stack([pad(real).reshape(rows, 10, *real.shape[1:]), pad(recon).reshape(rows, 10, *real.shape[1:])], 1)
    common.save_grid(os.path.join(args.out, "reconstructions.png"), pairs.reshape(-1, *real.shape[1:]), 2 * rows, 10)
    print(f"done: autoencoder {args.steps} steps, latent scale {scale:.4f}; outputs in {args.out}")


if __name__ == "__main__":
    main()
