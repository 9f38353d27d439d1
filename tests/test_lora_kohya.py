"""LoRAs in the kohya / A1111 layout (tests/fixtures/sd_kohya, made by make_kohya_lora_fixtures.py): a LoCon on
attention, feed-forward, 1x1 and 3x3 convolutions, time embeddings and the text encoder, and an attention LoRA.
Loaded into the tiny SD-1 pipeline they give the images diffusers gives with ``load_lora_weights`` (one LoRA; two
at their scales, fused), and each merged kernel is (alpha / r) up @ down in float64; keys that map nowhere are
refused by name."""

from __future__ import annotations

import gzip
import json
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
from jaxdiff.pretrained.keys import module_path, torch_key

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
    with open(os.path.join(KOHYA, "versions.json")) as f:
        versions = json.load(f)
    assert {"torch", "diffusers", "peft", "safetensors"} <= set(versions) and versions["scales"] == {"locon": 0.6,
                                                                                                  "attn": 1.3}
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
        "ldm": ({**good, "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": down,
                 "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": up},
                "keys name no layer of the model: lora_unet_input_blocks_9_1_proj_in.lora_down.weight"),
        "twice": ({**good, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                   "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
                  f"{Q} and lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q adapt the same module"),
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
    # a text encoder LoRA without out_proj (diffusers 0.42.1 cannot tell its format) reads
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": np.ones((2, 32), np.float32),
               f"{te}.lora_up.weight": np.ones((32, 2), np.float32)}, str(tmp_path / "te.safetensors"))
    want = {"text": {"text_model.encoder.layers.0.self_attn.q_proj": 2.0}}  # no alpha: the rank
    assert lora.load(tmp_path / "te.safetensors", sd.params).alphas == want


def test_a_name_two_modules_could_carry_is_refused(tmp_path):
    kernel = {"kernel": np.zeros((4, 4), np.float32)}
    params = {"unet": {"params": {"a_b": {"c": kernel}, "a": {"b_c": kernel}, "d": kernel}}}
    pair = {"lora_down.weight": np.zeros((1, 4), np.float32), "lora_up.weight": np.zeros((4, 1), np.float32)}
    save_file({f"lora_unet_a_b_c.{k}": v for k, v in pair.items()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(lora.LoRAFileError, match="lora_unet_a_b_c could name more than one module"):
        lora.load(tmp_path / "two.safetensors", params)
    save_file({f"lora_unet_d.{k}": v for k, v in pair.items()}, str(tmp_path / "one.safetensors"))
    assert lora.load(tmp_path / "one.safetensors", params).alphas == {"unet": {"d": 1.0}}


# the tiny SD-1 U-Net's modules in the original LDM layout (one resnet per level: input blocks 1 = level 0's
# resnet and attention, 2 its downsampler, 3 level 1's resnet; output blocks 0-1 level 0 (upsampler second, no
# attention), 2-3 level 1), and ResBlock's layer names
TINY_LDM = {
    "down_blocks_0_attentions_0": "input_blocks_1_1", "down_blocks_0_resnets_0": "input_blocks_1_0",
    "down_blocks_0_downsamplers_0_conv": "input_blocks_2_0_op", "down_blocks_1_resnets_0": "input_blocks_3_0",
    "mid_block_resnets_0": "middle_block_0", "mid_block_attentions_0": "middle_block_1",
    "up_blocks_0_upsamplers_0_conv": "output_blocks_1_1_conv", "up_blocks_0_resnets_1": "output_blocks_1_0",
    "up_blocks_1_resnets_0": "output_blocks_2_0", "up_blocks_1_attentions_1": "output_blocks_3_1",
    "time_embedding_linear_1": "time_embed_0",
}
RESNET_LDM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}


def test_a_file_in_ldm_names_reads_as_the_one_in_diffusers_names(sd, tmp_path):
    tensors = read(LOCON)
    renamed = {}
    for key, value in tensors.items():
        name, part = key.split(".", 1)
        for diffusers, ldm in TINY_LDM.items():
            if name.startswith(f"lora_unet_{diffusers}"):
                rest = name.removeprefix(f"lora_unet_{diffusers}")
                rest = "_" + RESNET_LDM.get(rest[1:], rest[1:]) if "resnets" in diffusers else rest
                name = f"lora_unet_{ldm}{rest}"
        renamed[f"{name}.{part}"] = value
    unet = [k for k in renamed if k.startswith("lora_unet_")]  # every U-Net key renamed: 21 blocks' and time_embed
    assert len(unet) == 66 and sum(k.startswith(("lora_unet_input", "lora_unet_middle", "lora_unet_output",
                                                 "lora_unet_time_embed_0.")) for k in unet) == 66
    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    ldm, theirs = lora.load(tmp_path / "ldm.safetensors", sd.params), lora.load(LOCON, sd.params)
    assert ldm.alphas == theirs.alphas
    assert jax.tree.structure(ldm.weights) == jax.tree.structure(theirs.weights)
    for a, b in zip(jax.tree.leaves(ldm.weights), jax.tree.leaves(theirs.weights), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ldm_names_on_sd15_s_real_layout():
    """The rule read off SD-1.5's real U-Net (two resnets per level, no attention in level 3 / up level 0)."""
    real = json.loads(gzip.decompress(open(os.path.join(FIXTURES, "sd_keys", "keys.json.gz"), "rb").read()))
    tree: dict = {}
    for key, _, kind, _ in real["components"]["sd15_unet"]:
        if kind in ("Conv2d", "Linear") and key.endswith(".weight"):
            node = tree
            for p in module_path(key):
                node = node.setdefault(p, {})
            node["kernel"] = np.zeros(())
    index = lora._kohya_names({"params": tree})
    want = {
        "input_blocks_0_0": "conv_in", "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
        "input_blocks_2_1_proj_in": "down_blocks_0_attentions_1_proj_in",
        "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
        "input_blocks_4_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
        "input_blocks_5_1_transformer_blocks_0_attn2_to_k":
            "down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
        "input_blocks_9_0_op": "down_blocks_2_downsamplers_0_conv",
        "input_blocks_11_0_emb_layers_1": "down_blocks_3_resnets_1_time_emb_proj",
        "middle_block_0_out_layers_3": "mid_block_resnets_0_conv2",
        "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "middle_block_2_in_layers_2": "mid_block_resnets_1_conv1",
        "output_blocks_0_0_skip_connection": "up_blocks_0_resnets_0_conv_shortcut",
        "output_blocks_2_1_conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks_3_1_proj_out": "up_blocks_1_attentions_0_proj_out",
        "output_blocks_5_2_conv": "up_blocks_1_upsamplers_0_conv",
        "output_blocks_8_2_conv": "up_blocks_2_upsamplers_0_conv",
        "output_blocks_11_1_transformer_blocks_0_attn1_to_out_0":
            "up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0",
        "time_embed_2": "time_embedding_linear_2", "out_2": "conv_out",
    }
    for ldm, diffusers in want.items():
        assert diffusers in index, diffusers
        assert lora._ldm_name(ldm, index) == diffusers, ldm


def test_a_1x1_convolution_and_a_dense_layer_take_each_other_s_adapters():
    """SD-1 holds proj_in / proj_out as 1x1 convolutions, SD-2 as Dense layers; files of either shape fit both."""
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(3, 5)), rng.normal(size=(7, 3))
    want = (up @ down).T  # (in, out)
    for d, u in ((down, up), (down[:, :, None, None], up[:, :, None, None])):
        a, b = lora._adapter(d, u, (5, 7), "dense")
        np.testing.assert_allclose(a @ b, want, rtol=1e-6)
        a, b = lora._adapter(d, u, (1, 1, 5, 7), "conv")
        assert a.shape == (1, 1, 5, 3)
        np.testing.assert_allclose((a @ b)[0, 0], want, rtol=1e-6)
    with pytest.raises(lora.LoRAFileError, match="dense: down \\(3, 5, 3, 3\\) and up \\(7, 3\\) are not \\(r, in\\)"):
        lora._adapter(rng.normal(size=(3, 5, 3, 3)), up, (5, 7), "dense")
