"""Inpainting through jaxdiff's pipeline equals diffusers' StableDiffusionInpaintPipeline: a tiny random-weight
SD-1-style inpainting pipeline (U-Net in_channels 9; tests/fixtures/sd_tiny_sd1inpaint, made by
make_sd_inpaint_fixtures.py), two prompts with negatives, two images with two masks (a rectangle, random bytes),
guidance 7.5, 20 steps, from the noise diffusers drew.

The fixture holds DDIM and DPM-Solver++ at strength 1.0 and 0.6; all four measured at most 1.5e-6 apart (images
in [0, 1]). The suite runs DPM-Solver++ at 0.6 (the image encoded and noised, the grid's tail, the masked image
encoded, the channels in the doubled batch) against a bound of 1e-5: float32 through ~40 layers of random
weights over 12 steps, where a wrong mask pixel, a grid off by one or a missing channel costs 1e-2 or more; the
U-Net's extra channels are checked against the tensors diffusers fed its U-Net. A text-to-image U-Net with a mask
(the known region put back after each step) and the strength-1 start (pure noise, as diffusers) are checked with a
stand-in for the U-Net against a NumPy replica of diffusers' loop, which costs no U-Net compile."""

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


def _poisoned(params, *names):
    """A copy of params with NaN in every autoencoder leaf whose path holds all of ``names``."""
    def leaf(path, a):
        key = jax.tree_util.keystr(path)
        return jnp.full_like(a, jnp.nan) if all(f"['{n}']" in key for n in names) else a

    return {**params, "vae": jax.tree_util.tree_map_with_path(leaf, params["vae"])}


def test_inpainting_equals_diffusers(loaded):
    """The images, and on the way the U-Net's extra channels against those diffusers fed its U-Net: the
    latent-size mask and the masked image's latents, the same in both halves of the guidance batch. Then the
    same program with a poisoned decoder names the decoded image (the stages line up with the mask's)."""
    pipe, ref = loaded
    assert pipe.inpainting
    seen, inner, good = [], pipe.eps_model, pipe.params

    def spy(params, z, t, context, extra=None):
        jax.debug.callback(lambda e: seen.append(np.asarray(e)) if not seen else None, extra)
        return inner(params, z, t, context, extra)

    pipe.eps_model = spy
    call = dict(gamma=7.5, sampler="dpm++", steps=20, strength=0.6, latents=ref["noise/0.6"], image=ref["image"],
                mask=ref["mask"])
    try:
        x = pipe.sample(PROMPTS, NEGATIVE, **call)
        pipe.params = _poisoned(good, "decoder", "conv_out", "bias")
        with pytest.raises(NonFiniteSample, match="in the decoded image"):
            pipe.sample(PROMPTS, NEGATIVE, **call)
    finally:
        pipe.eps_model, pipe.params = inner, good
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


def _diffusers_ddim_with_known_region(x, eps_of, known, noise, mask, timesteps):
    """float64 NumPy of what diffusers' inpainting loop does with a 4-channel U-Net and DDIMScheduler (SD-1.5's
    betas, set_alpha_to_one False, eta 0): a DDIM step, then the known region put back, noised to the next
    timestep (clean after the last step)."""
    abar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    for i, t in enumerate(timesteps):
        prev = t - 1000 // 20  # diffusers' DDIM steps 1000 / num_inference_steps back
        a_t, a_s = abar[t], abar[prev] if prev >= 0 else abar[0]
        eps = eps_of(x)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
        if i < len(timesteps) - 1:
            a = abar[timesteps[i + 1]]
            reference = np.sqrt(a) * known + np.sqrt(1 - a) * noise
        else:
            reference = known
        x = (1 - mask) * reference + mask * x
    return x


def test_a_text_to_image_unet_gets_the_known_region_back_from_the_noise(loaded):
    """diffusers' inpainting with a 4-channel U-Net, through stand-ins for the U-Net (eps = x / 2 + the row
    above / 4, whatever the prompt) and the decoder (the latents themselves), against a float64 NumPy replica of
    diffusers' loop; shifting the known region's noising by one timestep moves the result by 1.6e-3. At
    strength 1 the first step reads the noise itself, not the noised image as image-to-image would. No U-Net
    compile: the whole-pipeline parity of this path (sd_tiny_sd1pipe's U-Net, blend_reference.npz) was measured
    by hand at 2.2e-6."""
    pipe, ref = loaded
    seen = []
    eps_model, decode = pipe.eps_model, pipe.decode

    def stand_in(params, z, t, context, extra=None):
        assert extra is None  # a 4-channel U-Net reads the latents alone
        jax.debug.callback(lambda z, t: seen.append((np.asarray(z), int(t[0]))), z, t)
        return z / 2 + jnp.roll(z, 1, axis=1) / 4  # neighbours mix, so the known region's noising matters

    pipe.eps_model, pipe.decode, pipe.inpainting = stand_in, lambda params, z: z, False
    noise = ref["noise/1.0"]
    call = dict(sampler="ddim", steps=20, latents=noise, image=ref["image"])
    try:
        known = np.asarray(pipe.sample(PROMPTS, NEGATIVE, mask=np.zeros((32, 32), np.uint8), **call))
        seen.clear()
        x = np.asarray(pipe.sample(PROMPTS, NEGATIVE, mask=ref["mask"], **call))  # the same program
    finally:
        pipe.eps_model, pipe.decode, pipe.inpainting = eps_model, decode, True
    np.testing.assert_array_equal(seen[0][0][:2], noise)
    assert [t for _, t in seen] == list(ref["ddim/1.0/timesteps"] + 1)
    want = _diffusers_ddim_with_known_region(noise.astype(np.float64), lambda z: z / 2 + np.roll(z, 1, axis=1) / 4,
                                             known, noise,
                                             ref["mask_latent"], ref["ddim/1.0/timesteps"])
    assert 0.05 < np.abs(want - known).mean()  # the repainted region moved away from the image
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-5)


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
    # what a real call leaves for the CLI's report line (the stand-in does not sample)
    monkeypatch.setattr(pipe, "last_sampling", {"line": "sampler dpm++, 20 steps", "sampler": "dpm++", "steps": 20},
                        raising=False)
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
