"""SDXL inpainting through jaxdiff equals diffusers' StableDiffusionXLInpaintPipeline: a tiny random-weight SDXL
inpainting U-Net (in_channels 9; tests/fixtures/sdxl_tiny_inpaint, made by make_sdxl_inpaint_fixtures.py) with
sdxl_tiny_base's text encoders, tokenizers and VAE; two prompts with prompt_2 and negatives, two images with two
masks, non-default micro-conditioning with negative sizes, guidance 5, 20 steps, from the noise diffusers drew.

The fixture holds DDIM and DPM-Solver++ at diffusers' default strength 0.9999 and at 1. The suite runs
DPM-Solver++ at the default, the SDXL-specific path (the grid's first step skipped, the image's latents noised,
the masked image encoded, the extra channels in the doubled batch, the negative time ids of diffusers'
image-to-image rule) against a bound of 1e-5 (images in [0, 1]). All four runs measured at most 1e-6 apart by hand;
strength 1 instead of the default moves the images by more than 1e-2, diffusers' text-to-image time-id rule by
3.8e-2."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxdiff.pipeline import Pipeline

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OWN = os.path.join(FIXTURES, "sdxl_tiny_inpaint")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
PROMPTS_2 = ["an oil painting", "two cats on a sofa, watercolour"]
NEGATIVE = ["blurry", "low quality, watermark"]
MICRO = dict(original_size=(40, 48), crops_coords_top_left=(4, 8), target_size=(24, 40),
             negative_original_size=(64, 64), negative_crops_coords_top_left=(2, 6), negative_target_size=(32, 24))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The folder diffusers ran: sdxl_tiny_base with the inpainting U-Net and model_index.json laid over it."""
    folder = tmp_path_factory.mktemp("sdxl") / "inpaint"
    shutil.copytree(os.path.join(FIXTURES, "sdxl_tiny_base"), folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(os.path.join(OWN, "unet"), folder / "unet")
    shutil.copy(os.path.join(OWN, "model_index.json"), folder / "model_index.json")
    return Pipeline.from_pretrained(folder), np.load(os.path.join(OWN, "reference.npz"))


def test_negative_time_ids_follow_diffusers_image_rule(loaded):
    """diffusers' inpainting (and image-to-image) builds the negative time ids from the negative sizes, each
    defaulting to its positive one, and the positive crop; its text-to-image uses them only when both are given,
    with the negative crop."""
    pipe, _ = loaded
    cond, uncond = pipe.condition.host_pair(PROMPTS, NEGATIVE, (32, 32), from_image=True, **MICRO)
    np.testing.assert_array_equal(cond["time_ids"], [[40, 48, 4, 8, 24, 40]] * 2)
    np.testing.assert_array_equal(uncond["time_ids"], [[64, 64, 4, 8, 32, 24]] * 2)
    _, uncond = pipe.condition.host_pair(PROMPTS, NEGATIVE, (32, 32), from_image=True, original_size=(40, 48),
                                         negative_target_size=(16, 16))
    np.testing.assert_array_equal(uncond["time_ids"][0], [40, 48, 0, 0, 16, 16])
    _, uncond = pipe.condition.host_pair(PROMPTS, NEGATIVE, (32, 32), **MICRO)
    np.testing.assert_array_equal(uncond["time_ids"][0], [64, 64, 2, 6, 32, 24])


def test_sdxl_inpainting_equals_diffusers(loaded):
    """The images at the default strength (0.9999: diffusers' SDXL default, so the noise goes onto the image's
    latents at the grid's second timestep), and on the way the U-Net's extra channels against those diffusers
    fed its U-Net, the same in both halves of the guidance batch."""
    pipe, ref = loaded
    assert pipe.inpainting and pipe.inpaint_strength == 0.9999 and pipe.default_gamma == 5.0
    seen, inner = [], pipe.eps_model

    def spy(params, z, t, context, extra=None):
        jax.debug.callback(lambda e: seen.append(np.asarray(e)) if not seen else None, extra)
        return inner(params, z, t, context, extra)

    pipe.eps_model = spy
    try:
        x = pipe.sample(PROMPTS, NEGATIVE, prompt_2=PROMPTS_2, sampler="dpm++", steps=20, image=ref["image"],
                        mask=ref["mask"], latents=ref["noise/default"], **MICRO)
    finally:
        pipe.eps_model = inner
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    want = ref["dpm++/default/images"]
    assert images.shape == want.shape == (2, 32, 32, 3)
    err = np.abs(images - want).max()
    assert err < 1e-5, f"{err:.2e}"
    assert np.abs(ref["dpm++/1.0/images"] - want).max() > 1e-2  # strength 1 would not pass
    assert pipe.last_sampling["timesteps"] == list(ref["dpm++/default/timesteps"])
    extra = seen[0]
    assert extra.shape == (4, 16, 16, 5)
    np.testing.assert_array_equal(extra[2:], extra[:2])
    np.testing.assert_array_equal(extra[:2, ..., :1], ref["mask_latent"])
    np.testing.assert_allclose(extra[:2, ..., 1:], ref["masked_image_latents"], rtol=0, atol=1e-5)
