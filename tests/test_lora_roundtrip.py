"""A LoRA jaxdiff wrote, read by diffusers (tests/fixtures/sd_lora_roundtrip, made by
make_lora_roundtrip_fixtures.py): ``lora.save``'s file on the tiny SD-1 pipeline's U-Net and text encoder attention
(rank 4, alpha 8, B nonzero), loaded by diffusers' ``load_lora_weights`` (the script checked that diffusers fused
every module it names by scale * (alpha / r) B @ A), gives the DDIM images jaxdiff gives with ``Pipeline.load_lora``
from the same latents, at scales 1 and 0.5. Measured: max |difference| 1.1e-6 at both scales,
images in [0, 1]; the LoRA moves the images by 0.33 and 0.22, its text encoder half alone by 0.43."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HERE = os.path.join(FIXTURES, "sd_lora_roundtrip")
LORA = os.path.join(HERE, "lora.safetensors")
TOLERANCE = 1e-5


def images(pipe, ref, versions):
    # test_lora_kohya.py's prompt, sampler, steps, size and latents: the same compiled sampler
    x = pipe.sample([versions["prompt"]], [versions["negative"]], gamma=versions["guidance_scale"], sampler="ddim",
                    steps=versions["steps"], latents=ref["latents"], height=32, width=32)
    return np.clip((np.asarray(x) + 1) / 2, 0, 1)


def test_a_lora_jaxdiff_wrote_gives_in_diffusers_the_images_it_gives_in_jaxdiff():
    ref = np.load(os.path.join(HERE, "reference.npz"))
    with open(os.path.join(HERE, "versions.json")) as f:
        versions = json.load(f)
    assert {"torch", "diffusers", "peft", "safetensors"} <= set(versions)
    assert versions["scales"] == {"scale1": 1.0, "scale05": 0.5}
    # the LoRA, and its text encoder half alone, move the images far beyond the tolerance: a reader that dropped
    # either half, or applied the wrong scale, cannot pass
    assert min(np.abs(ref[k] - ref["base"]).max() for k in versions["scales"]) > 0.1
    assert versions["max_image_change_from_text_encoder_lora"] > 0.1
    assert np.abs(ref["scale1"] - ref["scale05"]).max() > 0.1
    sd = stable_diffusion.load(os.path.join(FIXTURES, "sd_tiny_sd1pipe"))
    pipe = Pipeline.for_stable_diffusion(sd)
    np.testing.assert_array_equal(np.asarray(pipe.grid("ddim", versions["steps"]))[:-1], ref["timesteps"] + 1)
    for name, scale in versions["scales"].items():
        pipe.unload_lora().load_lora(LORA, scale=scale)
        assert set(pipe._loras[0][0].weights) == {"unet", "text"}
        # unfused, the sampler merges the LoRA inside its compiled program: the kernels fusing gives
        traced = jax.jit(pipe._apply_loras)(pipe.params)
        pipe.fuse_lora()
        for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(pipe.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        err = np.abs(images(pipe, ref, versions) - ref[name]).max()
        assert err < TOLERANCE, f"scale {scale}: jaxdiff vs diffusers {err:.2e}"
    pipe.unload_lora()
    assert pipe.params["unet"] is sd.params["unet"] and pipe.params["text"] is sd.params["text"]
