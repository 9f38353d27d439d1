"""SDXL through jaxdiff equals diffusers on tiny random-weight pipelines (tests/fixtures/sdxl_tiny_{base,refiner},
made by make_sdxl_fixtures.py): the two text encoders' states and pooled output, one U-Net call with the added
conditions, text-to-image with DPM-Solver++ (negatives, prompt_2, non-default micro-conditioning), the refiner's
image-to-image with DDIM and aesthetic scores, and base-then-refiner; a missing negative zeroed as model_index.json
says. Measured: at most
1.4e-5 apart (the latents of the hand-off, |x| up to 34) and 1e-6 elsewhere (images in [0, 1]); the bound is
1e-4."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipeline import Pipeline

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
BASE, REFINER = os.path.join(FIXTURES, "sdxl_tiny_base"), os.path.join(FIXTURES, "sdxl_tiny_refiner")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
PROMPTS_2 = ["an oil painting", "two cats on a sofa, watercolour"]
NEGATIVE = ["blurry", "low quality, watermark"]
MICRO = dict(original_size=(40, 48), crops_coords_top_left=(4, 8), target_size=(24, 40),
             negative_original_size=(64, 64), negative_crops_coords_top_left=(2, 0), negative_target_size=(32, 32))
REFINER_MICRO = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, original_size=(48, 40),
                     crops_coords_top_left=(0, 4))


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(BASE, "reference.npz"))


@pytest.fixture(scope="module")
def base():
    return Pipeline.from_pretrained(BASE)


@pytest.fixture(scope="module")
def refiner():
    return Pipeline.from_pretrained(REFINER)


def to01(x):
    return np.clip((np.asarray(x) + 1) / 2, 0, 1)


def test_text_states_pooled_output_and_one_unet_call(base, ref):
    sd = base.eps_model.__self__
    assert type(sd).__name__ == "StableDiffusionXL" and sd.default_size == (32, 32) and base.default_gamma == 5.0
    cond, uncond = base.condition.host_pair(PROMPTS, NEGATIVE, (32, 32), prompt_2=PROMPTS_2)
    for c, name in ((cond, ""), (uncond, "negative_")):
        out = base.condition.network(sd.params, c)
        assert out["states"].shape == (2, 77, 16 + 8)  # both encoders' penultimate states, concatenated
        np.testing.assert_allclose(out["states"], ref[f"text/{name}states"], atol=1e-5)
        np.testing.assert_allclose(out["text_embeds"], ref[f"text/{name}pooled"], atol=1e-5)
    # through model_output, the entry the sigma walks (the folder's default Euler) call; it reads diffusers' t + 1
    unet = jax.jit(lambda ids: sd.model_output(sd.params, ref["latents"], jnp.asarray(ref["unet/t"]) + 1, {
        "states": ref["text/states"], "text_embeds": ref["text/pooled"], "time_ids": ids}))
    eps = unet(ref["unet/time_ids"])
    np.testing.assert_allclose(eps, ref["unet/eps"], atol=1e-5)
    # the time ids matter: another original size gives another eps
    other = unet(ref["unet/time_ids"] + 8.0)
    assert np.abs(other - ref["unet/eps"]).max() > 1e-3


def test_a_missing_negative_is_zeroed_where_model_index_says_so(base, refiner):
    """force_zeros_for_empty_prompt (the base's model_index.json): zero states and pooled output, as diffusers;
    the refiner's says false: the empty prompt's."""
    sd = base.eps_model.__self__
    cond, uncond = base.condition.host_pair(PROMPTS, None, (32, 32))
    out = base.condition.network(sd.params, uncond)
    assert not np.any(out["states"]) and not np.any(out["text_embeds"])
    assert np.all(base.condition.network(sd.params, cond)["text_embeds"] != 0)
    np.testing.assert_array_equal(uncond["time_ids"], cond["time_ids"])  # (32, 32, 0, 0, 32, 32) both
    np.testing.assert_array_equal(cond["time_ids"][0], [32, 32, 0, 0, 32, 32])
    rsd = refiner.eps_model.__self__
    cond, uncond = refiner.condition.host_pair(PROMPTS, None, (32, 32))
    assert np.all(refiner.condition.network(rsd.params, uncond)["text_embeds"] != 0)
    np.testing.assert_array_equal(uncond["time_ids"][0], [32, 32, 0, 0, 2.5])  # the default negative score
    np.testing.assert_array_equal(cond["time_ids"][0], [32, 32, 0, 0, 6.0])


def test_text_to_image_equals_diffusers(base, ref):
    x = base.sample(PROMPTS, NEGATIVE, prompt_2=PROMPTS_2, sampler="dpm++", steps=20, latents=ref["latents"], **MICRO)
    assert np.abs(to01(x) - ref["dpm++/images"]).max() < 1e-4


def test_refiner_image_to_image_equals_diffusers(refiner, ref):
    x = refiner.sample(PROMPTS, NEGATIVE, sampler="ddim", steps=20, image=ref["image"], strength=0.5,
                       latents=ref["refiner/noise"], **REFINER_MICRO)
    assert np.abs(to01(x) - ref["refiner/images"]).max() < 1e-4


def test_base_then_refiner_equals_diffusers(base, refiner, ref):
    z = base.sample(PROMPTS, NEGATIVE, sampler="dpm++", steps=20, latents=ref["latents"], denoising_end=0.75)
    assert np.abs(np.asarray(z) - ref["ensemble/latents"]).max() < 1e-4
    x = refiner.sample(PROMPTS, NEGATIVE, sampler="dpm++", steps=20, latents=ref["ensemble/latents"],
                       denoising_start=0.75, **REFINER_MICRO)
    assert np.abs(to01(x) - ref["ensemble/images"]).max() < 1e-4


def test_bad_settings_are_named(base, refiner):
    with pytest.raises(ValueError, match="original_size must be a pair"):
        base.sample(PROMPTS, original_size=(32,), steps=2)
    with pytest.raises(ValueError, match="unknown setting"):
        base.sample(PROMPTS, prompt_3="x", steps=2)
    with pytest.raises(ValueError, match="aesthetic_score is for a refiner"):
        base.sample(PROMPTS, aesthetic_score=6.0, steps=2)
    with pytest.raises(ValueError, match="denoising_start needs latents"):
        refiner.sample(PROMPTS, denoising_start=0.5, sampler="ddim", steps=4)
    with pytest.raises(ValueError, match=r"denoising_end must be a number in \(0, 1\)"):
        base.sample(PROMPTS, denoising_end=1.5, sampler="ddim", steps=4)
    with pytest.raises(ValueError, match=r"take a sampler with a timestep grid \(ddim, dpm\+\+, or a diffusers walk "
                                         r"such as 'auto'\), got 'heun'$"):
        base.sample(PROMPTS, denoising_end=0.5, sampler="heun", steps=4)  # jaxdiff's own Heun: no grid


def test_base_then_refiner_on_the_folders_euler_equals_diffusers(base, refiner, ref):
    """The ensemble under the folders' own EulerDiscreteScheduler ("auto"), 8 steps, denoising_end =
    denoising_start = 0.75 (fixtures/sd_ksched/pipeline.npz, made by make_ksched_fixtures.py): the base walks the
    times >= 250 and hands over its sample at the next sigma, the refiner walks on from it as it is (no
    init_noise_sigma). Measured 7.9e-6 apart (images in [0, 1], stored as uint16: within 7.7e-6)."""
    want = np.load(os.path.join(FIXTURES, "sd_ksched", "pipeline.npz"))
    z = base.sample(PROMPTS, NEGATIVE, steps=8, latents=ref["latents"], denoising_end=0.75)
    np.testing.assert_allclose(base.last_sampling["timesteps"], want["ensemble_euler/base_timesteps"])
    x = refiner.sample(PROMPTS, NEGATIVE, steps=8, latents=z, denoising_start=0.75, **REFINER_MICRO)
    np.testing.assert_allclose(refiner.last_sampling["timesteps"], want["ensemble_euler/refiner_timesteps"])
    assert np.abs(to01(x) - want["ensemble_euler/images_u16"] / 65535).max() < 1e-4


def test_the_ensemble_cuts_heuns_doubled_timesteps_as_diffusers(base, refiner):
    """Heun (every time but the first twice): diffusers' base evaluates the timesteps >= 250, ending on an Euler
    guess; its refiner counts those below, an even number, adds 1 and so takes that last step again. The U-Net
    timesteps diffusers called (fixtures/sd_ksched/pipeline.npz), without running: the images of this cut
    were checked once, 7.8e-6 apart."""
    want = np.load(os.path.join(FIXTURES, "sd_ksched", "pipeline.npz"))
    for pipe, end, start, key in ((base, 0.75, None, "base"), (refiner, None, 0.75, "refiner")):
        walk = pipe.walk("Heun", 8)
        part, _ = pipe._denoising_range(walk.grid, end, start, walk, None, np.zeros(1))
        np.testing.assert_allclose(walk.part_taus(part), want[f"ensemble_heun/{key}_timesteps"], rtol=1e-6)


def test_a_wrong_requires_aesthetics_score_is_named_before_weights_are_read(tmp_path):
    folder = tmp_path / "refiner"
    shutil.copytree(REFINER, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read
    with pytest.raises(ValueError, match="requires_aesthetics_score right"):
        Pipeline.from_pretrained(folder)
