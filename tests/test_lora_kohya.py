"""LoRAs in the kohya / A1111 layout (tests/fixtures/sd_kohya, made by make_kohya_lora_fixtures.py): a LoCon on
attention, feed-forward, 1x1 and 3x3 convolutions, time embeddings and the text encoder, and an attention LoRA.
Loaded into the tiny SD-1 pipeline they give the images diffusers gives with ``load_lora_weights`` (one LoRA; two
at their scales, fused), and each merged kernel is (alpha / r) up @ down in float64; keys that map nowhere are
refused by name."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdiff import lora
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion
from jaxdiff.pretrained.keys import torch_key

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
KOHYA = os.path.join(FIXTURES, "sd_kohya")
PIPE = os.path.join(FIXTURES, "sd_tiny_sd1pipe")
LOCON, ATTN = os.path.join(KOHYA, "locon.safetensors"), os.path.join(KOHYA, "attn.safetensors")
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def read(path):
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def images(pipe, ref):
    x = pipe.sample(["a photo of a red bicycle, high detail"], ["blurry"], gamma=7.5, sampler="ddim", steps=6,
                    latents=ref["latents"], height=32, width=32)
    return np.clip((np.asarray(x) + 1) / 2, 0, 1)


@pytest.fixture(scope="module")
def sd():
    return stable_diffusion.load(PIPE)


def test_kohya_loras_give_diffusers_images(sd):
    ref = np.load(os.path.join(KOHYA, "reference.npz"))
    # the LoRAs move diffusers' images far beyond the tolerance, so a LoRA read as nothing cannot pass
    assert min(np.abs(ref[k] - ref["base"]).max() for k in ("locon", "both", "both_fused")) > 0.1
    pipe = Pipeline.for_stable_diffusion(sd)
    np.testing.assert_array_equal(np.asarray(pipe.grid("ddim", 6))[:-1], ref["timesteps"] + 1)
    pipe.load_lora(LOCON).fuse_lora()
    err = np.abs(images(pipe, ref) - ref["locon"]).max()
    assert err < 1e-5, f"one LoCon: {err:.2e}"
    pipe.unload_lora().load_lora(LOCON, scale=0.6).load_lora(ATTN, scale=1.3)
    # unfused, the sampler merges the LoRAs inside its compiled program: the same kernels as fusing gives
    traced = jax.jit(pipe._apply_loras)(pipe.params)
    pipe.fuse_lora()
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(pipe.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    got = images(pipe, ref)
    for k in ("both", "both_fused"):  # diffusers' unfused and fused images differ by 1.7e-6
        err = np.abs(got - ref[k]).max()
        assert err < 1e-5, f"two LoRAs at 0.6 and 1.3 ({k}): {err:.2e}"
    pipe.unfuse_lora().unload_lora()
    assert pipe.params["unet"] is sd.params["unet"] and pipe.params["text"] is sd.params["text"]


def expected_kernels(path, params, alphas=None):
    """{(component, flax module path): merged kernel} from the file in float64, by kohya's rule, the modules found
    through diffusers' names (the checkpoint key rule), not through the loader's index."""
    tensors = read(path)
    out = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down = tensors[key].astype(np.float64)
        up = tensors[f"{name}.lora_up.weight"].astype(np.float64)
        r = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if alphas is None else alphas[name]
        delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[:1] + down.shape[1:])
        delta *= alpha / r  # torch layout (out, in[, kh, kw]) -> flax (in, out) / (kh, kw, in, out)
        delta = delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)
        comp, kohya = ("unet", name.removeprefix("lora_unet_")) if name.startswith("lora_unet_") else \
            ("text", name.removeprefix("lora_te_"))
        flax_module = diffusers_names(params[comp])[kohya]
        node = params[comp]["params"]
        for p in flax_module:
            node = node[p]
        out[comp, flax_module] = np.asarray(node["kernel"], np.float64) + delta
    return out


def diffusers_names(component_params):
    """{diffusers module name with dots as underscores: flax module path}, through the checkpoint key rule."""
    out = {}
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(component_params["params"])[0]:
        path = tuple(k.key for k in leaf_path)
        if path[-1] == "kernel":
            out[torch_key(path).removesuffix(".weight").replace(".", "_")] = path[:-1]
    return out


def test_merged_kernels_are_alpha_over_rank_up_down(sd, tmp_path):
    tensors = read(LOCON)
    # alphas that differ per module (kohya's rule is per module; diffusers 0.42.1 applies one alpha to attention
    # modules whatever their own, so the image fixture keeps alpha per kind)
    names = sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")})
    alphas = {n: 0.5 + i for i, n in enumerate(names)}
    tensors.update({f"{n}.alpha": np.asarray(a, np.float16) for n, a in alphas.items()})
    del tensors[f"{Q}.alpha"]  # no alpha: kohya's default, the rank (scale 1)
    alphas[Q] = tensors[f"{Q}.lora_down.weight"].shape[0]
    save_file(tensors, str(tmp_path / "alphas.safetensors"))
    for path, want_alphas in ((LOCON, None), (tmp_path / "alphas.safetensors", alphas)):
        adapter = lora.load(path, sd.params)
        merged = lora.merge(sd.params, adapter)
        want = expected_kernels(path, sd.params, want_alphas)
        assert len(want) == len(names) == sum(len(m) for m in adapter.modules().values())
        for comp in ("unet", "text", "vae"):
            for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(merged[comp]["params"])[0]:
                keys = tuple(k.key for k in leaf_path)
                base = sd.params[comp]["params"]
                for k in keys:
                    base = base[k]
                expect = want.get((comp, keys[:-1])) if keys[-1] == "kernel" else None
                if expect is None:
                    assert leaf is base, f"{comp} {keys} changed but no key names it"
                else:
                    np.testing.assert_allclose(leaf, expect, rtol=0, atol=2e-6, err_msg=f"{comp} {keys}")


def test_a_kohya_lora_saved_in_peft_layout_reads_back_the_same(sd, tmp_path):
    adapter = lora.load(LOCON, sd.params)
    lora.save(tmp_path / "peft.safetensors", adapter)
    conv = read(tmp_path / "peft.safetensors")["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert conv.shape == (2, 16, 3, 3)  # torch's Conv2d layout, as peft's LoCon holds it
    again = lora.load(tmp_path / "peft.safetensors", sd.params)
    assert again.alphas == adapter.alphas
    for a, b in zip(jax.tree.leaves(again.weights), jax.tree.leaves(adapter.weights), strict=True):
        np.testing.assert_array_equal(a, b)


def test_kohya_keys_that_map_nowhere_are_refused_by_name(sd, tmp_path):
    good = read(ATTN)
    down, up = np.zeros((2, 16), np.float32), np.zeros((16, 2), np.float32)
    nowhere = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q"
    cases = {
        "nowhere": ({**good, f"{nowhere}.lora_down.weight": down, f"{nowhere}.lora_up.weight": up},
                    f"keys name no layer of the model: {nowhere}.lora_down.weight"),
        "ldm": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
                 "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up},
                "original LDM modules \\(lora_unet_input_blocks_1_1_proj_in"),
        "sdxl": ({**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down},
                 "an SDXL LoRA \\(lora_te1_text_model_encoder_layers_0_mlp_fc1"),
        "loha": ({**good, f"{Q}.hada_w1_a": down}, f"{Q}.hada_w1_a is part of an adapter other than plain LoRA"),
        "junk": ({**good, "lora_unet_something": down}, "keys are not kohya LoRA weights .*: lora_unet_something"),
        "unpaired": ({k: v for k, v in good.items() if not k.endswith("lora_up.weight")},
                     "has lora_down without lora_up"),
        "window": ({f"{Q.replace('transformer_blocks_0_attn1_to_q', 'proj_in')}.lora_down.weight":
                    np.zeros((2, 16, 3, 3), np.float32),
                    f"{Q.replace('transformer_blocks_0_attn1_to_q', 'proj_in')}.lora_up.weight":
                    np.zeros((16, 2, 1, 1), np.float32)}, "a 3x3 down kernel for the model's 1x1 convolution"),
        "shape": ({f"{Q}.lora_down.weight": np.zeros((2, 7), np.float32), f"{Q}.lora_up.weight": up},
                  "maps 7 -> 16; the model's layer maps 16 -> 16"),
        "alpha": ({**good, f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up,
                   f"{Q}.alpha": np.array([1.0, 2.0], np.float32)},
                  f"{Q}.alpha must be one finite number, got \\[1.0, 2.0\\]"),
    }
    for case, (content, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(content, str(path))
        with pytest.raises(lora.LoRAFileError, match=message):
            lora.load(path, sd.params)
    # strict=False: the unmapped key is skipped and named; the rest loads as the file alone does
    pipe = Pipeline.for_stable_diffusion(sd)
    with pytest.warns(UserWarning, match=f"skipped 2 keys .*{nowhere}.lora_down.weight, {nowhere}.lora_up.weight"):
        pipe.load_lora(tmp_path / "nowhere.safetensors", strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = lora.load(ATTN, sd.params)
    assert pipe._loras[0][0].alphas == alone.alphas
