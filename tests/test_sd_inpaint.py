"""Inpainting through jaxdiff's pipeline equals diffusers' StableDiffusionInpaintPipeline: a tiny random-weight
SD-1-style inpainting pipeline (U-Net in_channels 9; tests/fixtures/sd_tiny_sd1inpaint, made by
make_sd_inpaint_fixtures.py), two prompts with negatives, two images with two masks (a rectangle, random bytes),
guidance 7.5, 20 steps, from the noise diffusers drew.

The fixture holds DDIM and DPM-Solver++ at strength 1.0 and 0.6; all four measured at most 1.5e-6 apart (images
in [0, 1]). The suite runs DPM-Solver++ at 0.6 (the image encoded and noised, the grid's tail, the masked image
encoded, the channels in the doubled batch) against a bound of 1e-5: float32 through ~40 layers of random
weights over 12 steps, where a wrong mask pixel, a grid off by one or a missing channel costs 1e-2 or more. The
strength-1 start (pure noise, as diffusers) and the U-Net's extra channels are checked against diffusers' saved
tensors with a stand-in for the U-Net, which costs no U-Net compile."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipeline import NonFiniteSample, Pipeline

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FOLDER = os.path.join(FIXTURES, "sd_tiny_sd1inpaint")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
NEGATIVE = ["blurry", "low quality, watermark"]


@pytest.fixture(scope="module")
def loaded():
    return Pipeline.from_pretrained(FOLDER), np.load(os.path.join(FOLDER, "reference.npz"))


def test_inpainting_equals_diffusers(loaded):
    pipe, ref = loaded
    assert pipe.inpainting
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="dpm++", steps=20, strength=0.6, latents=ref["noise/0.6"],
                    image=ref["image"], mask=ref["mask"])
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    want = ref["dpm++/0.6/images"]
    assert images.shape == want.shape == (2, 32, 32, 3)
    err = np.abs(images - want).max()
    assert err < 1e-5, f"{err:.2e}"
    np.testing.assert_array_equal(pipe.grid("dpm++", 20)[8:-1], ref["dpm++/0.6/timesteps"] + 1)


def test_the_unet_reads_diffusers_channels_and_strength_1_starts_from_the_noise(loaded):
    """What the U-Net is fed, seen through a stand-in: at strength 1 the noise itself (not the noised image, as
    image-to-image would), then the latent-size mask and the masked image's latents diffusers fed its U-Net,
    in both halves of the guidance batch, at diffusers' timesteps."""
    pipe, ref = loaded
    seen = []
    inner = pipe.eps_model

    def stand_in(params, z, t, context, extra=None):
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), z, t, extra)
        return jnp.zeros_like(z)

    pipe.eps_model = stand_in
    try:
        pipe(PROMPTS, NEGATIVE, sampler="ddim", steps=20, latents=ref["noise/1.0"], image=ref["image"],
             mask=ref["mask"])
        z, _, extra = seen[0]
        assert z.shape == (4, 16, 16, 4) and extra.shape == (4, 16, 16, 5)
        np.testing.assert_array_equal(z[:2], ref["noise/1.0"])
        np.testing.assert_array_equal(z[2:], z[:2])
        np.testing.assert_array_equal(extra[2:], extra[:2])
        np.testing.assert_array_equal(extra[:2, ..., :1], ref["mask_latent"])
        np.testing.assert_allclose(extra[:2, ..., 1:], ref["masked_image_latents"], rtol=0, atol=1e-5)
        assert [int(t[0]) for _, t, _ in seen] == list(ref["ddim/1.0/timesteps"] + 1)
        # one poisoned encoder: at strength 1 the masked image is its first use
        good = pipe.params
        pipe.params = {**good, "vae": jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), good["vae"])}
        with pytest.raises(NonFiniteSample, match="in the encoded masked image"):
            pipe(PROMPTS[:1], sampler="ddim", steps=2, image=ref["image"][0], mask=ref["mask"][0])
    finally:
        pipe.eps_model, pipe.params = inner, good


def test_the_mask_is_binarised_at_half_and_sampled_at_the_factor():
    from jaxdiff.inpainting import check_mask, host_inputs

    mask = np.zeros((4, 4), np.uint8)
    mask[0] = (127, 128, 255, 0)
    mask[2] = (128, 127, 0, 255)
    m = check_mask(mask, 2, 4, 4)
    assert m.shape == (2, 4, 4, 1) and m.dtype == np.float32
    np.testing.assert_array_equal(m[1, 0, :, 0], [0, 1, 1, 0])
    image = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    small, masked = host_inputs(m, image, 2)
    np.testing.assert_array_equal(small[0, ..., 0], [[0, 1], [1, 0]])  # pixels (0, 0), (0, 2), (2, 0), (2, 2)
    np.testing.assert_array_equal(masked, np.where(m > 0, 0, image))


def test_bad_inpainting_calls_are_one_clear_line(loaded):
    pipe, ref = loaded
    image, mask = ref["image"], ref["mask"]
    base = dict(sampler="ddim", steps=4)
    for kwargs, msg in [
        ({"mask": mask[0]}, r"mask= needs image="),
        ({"image": image}, r"inpainting U-Net: pass mask= \(uint8 \(H, W\) or \(N, H, W\), white = repaint\)"),
        ({}, r"inpainting U-Net: pass image= \(the image to repaint\) and mask="),
        ({"image": image, "mask": mask[0, :16, :16]}, r"mask must be uint8 of shape \(32, 32\) or \(2, 32, 32\)"),
        ({"image": image, "mask": mask.astype(np.float32)}, r"mask must be uint8 of shape"),
        ({"image": image, "mask": np.stack([mask[0]] * 3)}, r"mask must be uint8 of shape"),
        ({"image": image, "mask": mask, "strength": 0}, r"strength must be in \(0, 1\]"),
        ({"image": image, "mask": mask, "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"image": image, "mask": mask, "sampler": "heun"}, "image-to-image takes a sampler with a timestep grid"),
    ]:
        with pytest.raises(ValueError, match=msg) as err:
            pipe(PROMPTS, **{**base, **kwargs})
        assert "\n" not in str(err.value)
    text2img = Pipeline.from_pretrained(os.path.join(FIXTURES, "sd_tiny_sd1pipe"))
    with pytest.raises(ValueError, match=r"mask= needs an inpainting pipeline \(a U-Net of 2 C \+ 1 input channels"):
        text2img(PROMPTS[:1], image=image[0], mask=mask[0], **base)
