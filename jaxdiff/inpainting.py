"""The inpainting conditioning of a U-Net with 2 C + 1 input channels (C latent channels), as diffusers'
inpainting pipelines build it: the noisy latents, then the mask at the latent size, then the latents of the
image with the region to repaint blanked out. Nothing here knows which U-Net reads it (SD 1.x/2.x or SDXL).

The mask (uint8, white = repaint) is binarised at 0.5 (byte values 128..255 repaint) at the image's size,
then taken to the latent size by nearest neighbour as torch's ``interpolate`` does it (latent pixel (i, j) is
image pixel (f i, f j) for the autoencoder's factor f). The masked image is the image in [-1, 1] times
(mask < 0.5): the repainted region becomes 0, mid-grey.

A U-Net of C input channels gets diffusers' other way instead (``keep_known``): after every step the region
outside the mask is replaced by the image's latents noised to the next timestep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import add_noise


def check_mask(mask, n: int, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) or (N, H, W) -> float32 (n, H, W, 1) in {0, 1}, 1 where to repaint."""
    arr = np.asarray(mask)
    arr = arr[None] if arr.ndim == 2 else arr
    want = (n, height, width)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape not in (want, (1, *want[1:])):
        raise ValueError(f"mask must be uint8 of shape {want[1:]} or {want} (white = repaint, the image's height "
                         f"and width), got {np.asarray(mask).dtype} {np.asarray(mask).shape}")
    # diffusers scales to [0, 1] and binarises at 0.5: 127 / 255 keeps, 128 / 255 repaints
    return np.broadcast_to(arr >= 128, want)[..., None].astype(np.float32)


def host_inputs(mask: np.ndarray, image: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask at the latent size (n, H/f, W/f, 1), masked image (n, H, W, 3)) from ``check_mask``'s mask and the
    image in [-1, 1]."""
    return np.ascontiguousarray(mask[:, ::factor, ::factor]), image * (mask < 0.5)


def channels(encode, latent_mask, masked_image) -> jax.Array:
    """The extra input channels (n, h, w, 1 + C): the latent-size mask and ``encode(masked_image)`` (the
    autoencoder's scaled latents)."""
    latents = encode(masked_image)
    return jnp.concatenate([latent_mask.astype(latents.dtype), latents], axis=-1)


def unet_input(z, extra):
    """The U-Net's input: the noisy latents z (B, h, w, C), then the extra channels; ``extra`` of B / k
    rows is repeated k times (the doubled batch of classifier-free guidance)."""
    reps = z.shape[0] // extra.shape[0]
    return jnp.concatenate([z, jnp.tile(extra, (reps, 1, 1, 1)).astype(z.dtype)], axis=-1)


def keep_known(schedule, known, noise, latent_mask, grid):
    """For a U-Net that reads the latents alone (diffusers' inpainting pipeline given a text-to-image U-Net):
    a sampler's ``after_step(x, i)`` that puts the known region (outside the mask) back after step i, as the
    known latents noised to ``grid[i + 1]`` with the starting ``noise``, and clean after the last step."""
    following = jnp.asarray(np.asarray(grid[1:], np.int32))
    last = len(grid) - 2

    def after_step(x, i):
        t = jnp.full((x.shape[0],), jnp.maximum(following[i], 1))  # the endpoint (0 or 1) takes the clean latents
        reference = jnp.where(i == last, known, add_noise(schedule, known, t, noise))
        return (1 - latent_mask) * reference + latent_mask * x

    return after_step
