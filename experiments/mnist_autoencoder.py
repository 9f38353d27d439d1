"""Latent diffusion's autoencoder on its own (section 10.5): a KL-regularised autoencoder,
28x28 <-> 4x8x8 latents, trained here. Reports the test reconstruction error, the KL per image
and the scale that brings the latents to unit variance for diffusion; writes
reconstructions.png (pairs of rows: real test images above their reconstructions), loss.csv/png
and checkpoints/ under --out. mnist_text2img trains the same model as its first stage.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments import common
from jaxdiff import data, specs, train
from jaxdiff.nets.autoencoder import gaussian_kl


def add_flags(p, flag: str = "--ae-channels"):
    p.add_argument(flag, dest="ae_channels", type=common.channels, default=(32, 64, 128),
                   help="channels per autoencoder level (default 32,64,128; three levels: 28x28 -> 8x8 latents)")


def train_autoencoder(args, images, labels, test_images, out, steps: int, stage: bool = False, flag="--ae-channels"):
    """Train (or resume) in ``out``; returns (float32 module, EMA params, encode, decode, latent scale)."""
    spec = specs.Autoencoder(channels=args.ae_channels, latent_channels=4, image_shape=images.shape[1:])
    loss = train.vae_loss(spec.module(common.compute_dtype(args.dtype)), kl_weight=args.kl_weight)
    result = common.fit(args, spec, loss, images, labels, out, label="autoencoder", stage=stage,
                        meta={"dataset": args.dataset, "split": args.split, "kl_weight": args.kl_weight},
                        config=common.train_config(args, steps=steps), flags={"spec.channels": flag})
    ae, params = spec.module(), jax.device_get(result.state.ema_params)
    encode = jax.jit(lambda x: ae.apply(params, data.to_float(x), method="encode"))
    decode = jax.jit(lambda z: ae.apply(params, z, method="decode"))
    sub = test_images[:2000]
    mean, logvar = encode(sub)
    mse = float(np.mean((np.asarray(decode(mean)) - data.to_float(sub)) ** 2))
    kl = float(np.mean(gaussian_kl(mean, logvar)))
    scale = float(1.0 / np.asarray(encode(images[:5000])[0]).std())
    common.note(f"autoencoder: test reconstruction MSE {mse:.4f} (images in [-1, 1]), KL {kl:.1f} nats/image, "
                f"latent std {1 / scale:.3f} -> scale {scale:.3f}")
    return ae, params, encode, decode, scale


def main(argv=None):
    p = common.parser(__doc__, steps=3000, batch_size=256, out="runs/mnist_autoencoder")
    p.add_argument("--kl-weight", type=common.finite_float, default=1e-4,
                   help="weight of the KL term against the squared error")
    p.add_argument("--rows", type=common.positive_int, default=4, help="pairs of rows in reconstructions.png")
    add_flags(p)
    args = p.parse_args(argv)
    with common.cli(args) as out:
        images, labels = common.load_data(args)
        test_images, _ = common.load_data(args, "test")
        _, _, encode, decode, scale = train_autoencoder(args, images, labels, test_images, out, args.steps)
        n = min(args.rows * 10, len(test_images))
        real = test_images[:n]
        recon = data.to_uint8(decode(encode(real)[0]))
        rows = -(-n // 10)
        pad = lambda x: np.concatenate([x, np.zeros((rows * 10 - n, *x.shape[1:]), np.uint8)])
        pairs = np.stack([pad(real).reshape(rows, 10, *real.shape[1:]),
                          pad(recon).reshape(rows, 10, *real.shape[1:])], 1)
        common.save_grid(out / "reconstructions.png", pairs.reshape(-1, *real.shape[1:]), 2 * rows, 10)
        if jax.process_index() == 0:
            print(f"done: autoencoder {args.steps} steps, latent scale {scale:.4f}; outputs in {out}")


if __name__ == "__main__":
    main()
