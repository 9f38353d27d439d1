"""Stable Diffusion through jaxdiff's pipeline equals diffusers' StableDiffusionPipeline: two tiny random-weight
pipelines (tests/fixtures/sd_tiny_sd{1,2}pipe, made by make_sd_pipeline_fixtures.py), epsilon and v-prediction,
DDIM and DPM-Solver++ at 20 steps with guidance 7.5 and negative prompts, from the same initial latents.
Measured: at most 1.7e-6 apart (images in [0, 1]); the bound is 1e-3."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipeline import Pipeline

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
NEGATIVE = ["blurry", "low quality, watermark"]


def folder(name):
    return os.path.join(FIXTURES, f"sd_tiny_{name}")


@pytest.fixture(scope="module", params=["sd1pipe", "sd2pipe"])
def loaded(request):
    return request.param, Pipeline.from_pretrained(folder(request.param)), np.load(
        os.path.join(folder(request.param), "reference.npz"))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_the_whole_pipeline_equals_diffusers(loaded, sampler):
    name, pipe, ref = loaded
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler=sampler, steps=20, latents=ref["latents"], height=32,
                    width=32)
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    assert images.shape == ref[f"{sampler}/images"].shape == (2, 32, 32, 3)
    err = np.abs(images - ref[f"{sampler}/images"]).max()
    assert err < 1e-3, f"{name} {sampler}: {err:.2e}"
    # the grid: diffusers' timesteps, one later in jaxdiff's 1-indexed t, then the endpoint
    grid = np.asarray(pipe.grid(sampler, 20))
    np.testing.assert_array_equal(grid[:-1], ref[f"{sampler}/timesteps"] + 1)
    assert grid[-1] == (1 if sampler == "ddim" else 0)  # SD's DDIM stops at alphas_cumprod[0]


def test_v_prediction_is_read_from_the_scheduler_config():
    assert Pipeline.from_pretrained(folder("sd2pipe")).eps_model.__self__.prediction == "v_prediction"
    assert Pipeline.from_pretrained(folder("sd1pipe")).eps_model.__self__.prediction == "epsilon"


def test_uint8_rgb_of_any_multiple_of_the_latent_factor_and_seeds(loaded):
    _, pipe, _ = loaded
    a = pipe(["a cat"], steps=3, height=16, width=24, seed=1)
    assert a.shape == (1, 16, 24, 3) and a.dtype == np.uint8
    both = pipe(["a cat", "a dog"], steps=3, height=16, width=24, seed=1)
    np.testing.assert_array_equal(both[:1], a)  # image i depends on (seed, i) alone
    for kwargs, msg in [({"height": 17}, "height must be a positive multiple of 2"), ({"width": 0}, "width"),
                        ({"latents": np.zeros((1, 4, 4, 4))}, r"latents must have shape \(1, 16, 16, 4\)")]:
        with pytest.raises(ValueError, match=msg):
            pipe(["a cat"], steps=3, **kwargs)


def test_image_to_image_walks_the_end_of_the_grid_from_the_noised_image(monkeypatch):
    """With strength s the sampler evaluates the network at grid[steps - int(steps s):-1] only."""
    pipe = Pipeline.from_pretrained(folder("sd1pipe"))
    seen = []
    inner = pipe.eps_model

    def spy(params, z, t, c):
        jax.debug.callback(lambda t: seen.append(int(t[0])), t)
        return inner(params, z, t, c)

    pipe.eps_model = spy
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = pipe(["a cat"], image=image, strength=0.5, sampler="ddim", steps=10)
    assert out.shape == (1, 32, 32, 3)
    grid = pipe.grid("ddim", 10)
    assert seen == list(grid[5:-1])
    for kwargs, msg in [({"strength": 0.0}, r"strength must be in \(0, 1\]"), ({"strength": 0.05}, "leaves no step"),
                        ({"sampler": "heun"}, "image-to-image takes a sampler with a timestep grid"),
                        ({"image": np.zeros((16, 16, 3), np.uint8)}, "image must be uint8 of shape")]:
        with pytest.raises(ValueError, match=msg):
            pipe(["a cat"], **{"image": image, "sampler": "ddim", "steps": 10, **kwargs})


def test_a_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    from jaxdiff.pretrained.folder import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound) as err:
        Pipeline.from_pretrained("someone/stable-diffusion-nowhere")
    assert "\n" not in str(err.value) and "pass the folder" in str(err.value)


def test_bf16_compute_stays_close_to_float32():
    ref = np.load(os.path.join(folder("sd1pipe"), "reference.npz"))
    pipe = Pipeline.from_pretrained(folder("sd1pipe"), dtype=jnp.bfloat16)
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="dpm++", steps=20, latents=ref["latents"], height=32,
                    width=32)
    err = np.abs(np.clip((np.asarray(x) + 1) / 2, 0, 1) - ref["dpm++/images"]).mean()
    assert err < 0.02, err  # bf16 activations: about 2-3 significant digits per layer


def test_sd_text2img_command(tmp_path, capsys):
    from experiments.sd_text2img import main

    main(["--model", folder("sd2pipe"), "--prompt", "a red bicycle", "--prompt", "a cat", "--per-prompt", "2",
          "--negative", "blurry", "--steps", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "done: 4 images 32x32" in out and "per image" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.png", "001.png", "002.png", "003.png", "grid.png"]
