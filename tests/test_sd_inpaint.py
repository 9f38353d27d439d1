"""Inpainting through jaxdiff's pipeline equals diffusers' StableDiffusionInpaintPipeline: a tiny random-weight
SD-1-style inpainting pipeline (U-Net in_channels 9; tests/fixtures/sd_tiny_sd1inpaint, made by
make_sd_inpaint_fixtures.py), two prompts with negatives, two images with two masks (a rectangle, random bytes),
guidance 7.5, 20 steps, from the noise diffusers drew.

The fixture holds DDIM and DPM-Solver++ at strength 1.0 and 0.6; all four measured at most 1.5e-6 apart (images
in [0, 1]). The suite runs DPM-Solver++ at 0.6 (the image encoded and noised, the grid's tail, the masked image
encoded, the channels in the doubled batch) against a bound of 1e-5: float32 through ~40 layers of random
weights over 12 steps, where a wrong mask pixel, a grid off by one or a missing channel costs 1e-2 or more; the
U-Net's extra channels are checked against the tensors diffusers fed its U-Net. The strength-1 start (pure noise,
as diffusers) is checked with a stand-in for the U-Net, which costs no U-Net compile."""

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
    """The images, and on the way the U-Net's extra channels against those diffusers fed its U-Net: the
    latent-size mask and the masked image's latents, the same in both halves of the guidance batch."""
    pipe, ref = loaded
    assert pipe.inpainting
    seen, inner = [], pipe.eps_model

    def spy(params, z, t, context, extra=None):
        jax.debug.callback(lambda e: seen.append(np.asarray(e)) if not seen else None, extra)
        return inner(params, z, t, context, extra)

    pipe.eps_model = spy
    try:
        x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="dpm++", steps=20, strength=0.6,
                        latents=ref["noise/0.6"], image=ref["image"], mask=ref["mask"])
    finally:
        pipe.eps_model = inner
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    want = ref["dpm++/0.6/images"]
    assert images.shape == want.shape == (2, 32, 32, 3)
    err = np.abs(images - want).max()
    assert err < 1e-5, f"{err:.2e}"
    np.testing.assert_array_equal(pipe.grid("dpm++", 20)[8:-1], ref["dpm++/0.6/timesteps"] + 1)
    extra = seen[0]
    assert extra.shape == (4, 16, 16, 5)
    np.testing.assert_array_equal(extra[2:], extra[:2])
    np.testing.assert_array_equal(extra[:2, ..., :1], ref["mask_latent"])
    np.testing.assert_allclose(extra[:2, ..., 1:], ref["masked_image_latents"], rtol=0, atol=1e-5)


def test_strength_1_starts_from_the_noise_itself(loaded):
    """diffusers' inpainting at strength 1 starts from the noise, not from the noised image as image-to-image
    does; seen through stand-ins for the U-Net and the decoder (no U-Net compile). The same program then
    meets a poisoned encoder: at strength 1 the masked image is the encoder's only input."""
    pipe, ref = loaded
    seen = []
    eps_model, decode, good = pipe.eps_model, pipe.decode, pipe.params

    def stand_in(params, z, t, context, extra=None):
        jax.debug.callback(lambda z, t: seen.append((np.asarray(z), int(t[0]))), z, t)
        return jnp.zeros_like(z)

    pipe.eps_model, pipe.decode = stand_in, lambda params, z: z[..., :3]
    call = dict(sampler="ddim", steps=20, latents=ref["noise/1.0"], image=ref["image"], mask=ref["mask"])
    try:
        pipe.sample(PROMPTS, NEGATIVE, **call)
        np.testing.assert_array_equal(seen[0][0][:2], ref["noise/1.0"])
        assert [t for _, t in seen] == list(ref["ddim/1.0/timesteps"] + 1)
        pipe.params = {**good, "vae": jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), good["vae"])}
        with pytest.raises(NonFiniteSample, match="in the encoded masked image"):
            pipe.sample(PROMPTS, NEGATIVE, **call)
    finally:
        pipe.eps_model, pipe.decode, pipe.params = eps_model, decode, good


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
    pipe.inpainting = False  # as a text-to-image folder loads (test_sd_pipeline.py loads one; not again here)
    try:
        with pytest.raises(ValueError, match=r"mask= needs an inpainting pipeline \(a U-Net of 2 C \+ 1 input "):
            pipe(PROMPTS[:1], image=image[0], mask=mask[0], **base)
    finally:
        pipe.inpainting = True


def test_sd_text2img_inpaints_and_a_bad_mask_is_one_line_exit_2(loaded, tmp_path, capsys, monkeypatch):
    """--image and --mask PNGs (the mask read as grey, as diffusers reads it) reach the pipeline; its errors are
    one stderr line and exit 2. The loaded pipeline stands in for the folder's (no second load), and the
    pipeline's sample is a stand-in that records what it was given."""
    from PIL import Image

    import experiments.sd_text2img as cli

    pipe, ref = loaded
    Image.fromarray(ref["image"][0]).save(tmp_path / "image.png")
    Image.fromarray(ref["mask"][0]).convert("RGB").save(tmp_path / "mask.png")
    Image.fromarray(ref["mask"][0, :16, :16]).save(tmp_path / "small.png")
    monkeypatch.setattr(cli.Pipeline, "from_pretrained", lambda *a, **k: pipe)
    seen = {}
    monkeypatch.setattr(pipe, "sample", lambda prompts, negative, **kw: seen.update(kw) or jnp.zeros((1, 32, 32, 3)))
    args = ["--model", FOLDER, "--prompt", "a cat", "--sampler", "dpm++", "--steps", "20", "--strength", "0.6",
            "--repeats", "0", "--image", str(tmp_path / "image.png")]
    cli.main([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out")])
    np.testing.assert_array_equal(seen["image"], ref["image"][0])
    np.testing.assert_array_equal(seen["mask"], ref["mask"][0])
    monkeypatch.undo()
    monkeypatch.setattr(cli.Pipeline, "from_pretrained", lambda *a, **k: pipe)
    with pytest.raises(SystemExit) as code:
        cli.main([*args, "--mask", str(tmp_path / "small.png"), "--out", str(tmp_path / "bad")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert code.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: mask must be uint8 of shape")
    assert not (tmp_path / "bad").exists()


def test_a_saved_inpainting_model_says_so(loaded, tmp_path):
    """diffusers picks the pipeline class from model_index.json: an inpainting U-Net saved under
    StableDiffusionPipeline would load and then fail at its first call."""
    import json

    pipe, _ = loaded
    pipe.eps_model.__self__.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((tmp_path / "saved" / "unet" / "config.json").read_text())["in_channels"] == 9
