"""SDXL LoRAs (tests/fixtures/sdxl_kohya, made by make_kohya_lora_fixtures.py for the tiny SDXL base): a kohya file
in SDXL's own names (the SGM U-Net's ``input_blocks_3_1_transformer_blocks_1_...``, ``lora_te1_`` / ``lora_te2_``
for the two text encoders), and diffusers' peft layout of the same adapters (``unet.`` / ``text_encoder.`` /
``text_encoder_2.``). Both merge, weight by weight, to what diffusers fused (fused.npz) and to
W + scale * (alpha / r) up @ down computed in float64 from the file; keys that map nowhere are refused by name."""

from __future__ import annotations

import gzip
import json
import os
import re

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdiff import lora
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion
from jaxdiff.pretrained.keys import module_path

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
XL = os.path.join(FIXTURES, "sdxl_kohya")
LOCON, PEFT = os.path.join(XL, "locon.safetensors"), os.path.join(XL, "peft.safetensors")
BASE = os.path.join(FIXTURES, "sdxl_tiny_base")
COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text", "lora_te2_": "text_2"}

# the tiny SDXL U-Net's modules the file adapts: SGM name -> diffusers name, written out by hand from the layout
# (level 0: 8 channels, no attention; level 1: 16 channels, a depth-2 transformer; one resnet per level); that
# diffusers found each at the same module is checked against fused.npz
SGM = {
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_v": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_out_0":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_v": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
    "input_blocks_3_1_transformer_blocks_1_ff_net_0_proj":
        "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "middle_block_1_transformer_blocks_1_attn1_to_v": "mid_block.attentions.0.transformer_blocks.1.attn1.to_v",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "output_blocks_1_1_transformer_blocks_0_attn2_to_out_0":
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
    "output_blocks_0_1_transformer_blocks_1_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2",
    "output_blocks_0_1_proj_out": "up_blocks.0.attentions.0.proj_out",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
    "output_blocks_2_0_emb_layers_1": "up_blocks.1.resnets.0.time_emb_proj",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
}


def read(path):
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def sd():
    return stable_diffusion.load(BASE)


@pytest.fixture(scope="module")
def fused():
    with open(os.path.join(XL, "versions.json")) as f:
        versions = json.load(f)
    assert {"torch", "diffusers", "peft", "safetensors"} <= set(versions)
    return versions["scale"], versions["modules"], dict(np.load(os.path.join(XL, "fused.npz")))


def expected(tensors, sd, scale):
    """{(component, diffusers module name): merged kernel in torch's layout, float64}, by kohya's rule."""
    out = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        prefix = next(p for p in COMPONENTS if name.startswith(p))
        comp, rest = COMPONENTS[prefix], name.removeprefix(prefix)
        module = SGM[rest] if comp == "unet" else re.sub(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(.+)$",
                                                         r"text_model.encoder.layers.\1.\2.\3", rest)
        down, up = tensors[key].astype(np.float64), tensors[f"{name}.lora_up.weight"].astype(np.float64)
        r = down.shape[0]
        delta = (up.reshape(-1, r) @ down.reshape(r, -1)).reshape(up.shape[:1] + down.shape[1:])
        base = np.asarray(kernel(sd.params, comp, module), np.float64)
        base = base.T if base.ndim == 2 else base.transpose(3, 2, 0, 1)
        out[comp, module] = base + scale * float(tensors[f"{name}.alpha"]) / r * delta
    return out


def kernel(params, comp, module):
    node = params[comp]["params"]
    for p in module_path(module + ".weight"):
        node = node[p]
    return node["kernel"]


def torch_layout(w):
    w = np.asarray(w, np.float64)
    return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)


@pytest.mark.parametrize("path", [LOCON, PEFT], ids=["kohya", "peft"])
def test_sdxl_loras_merge_as_diffusers_fused_them(sd, fused, path):
    scale, modules, reference = fused
    want = expected(read(LOCON), sd, scale)
    # the hand-written SGM table names the modules diffusers moved: the mapping is diffusers', not the loader's
    assert {f"{c}/{m}" for c, m in want} == set(reference) and len(reference) == modules == 32
    assert {c for c, _ in want} == {"unet", "text", "text_2"}
    adapter = lora.load(path, sd.params)
    merged = lora.merge(sd.params, adapter, scale)
    moved = 0
    for comp in ("unet", "text", "text_2", "vae"):
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(merged[comp]["params"])[0]:
            keys = tuple(k.key for k in leaf_path)
            module = ".".join(keys[:-1])  # matched below through the checkpoint key rule
            match = [m for c, m in want if c == comp and module_path(m + ".weight") == keys[:-1]]
            if keys[-1] != "kernel" or not match:
                base = sd.params[comp]["params"]
                for k in keys:
                    base = base[k]
                assert leaf is base, f"{comp} {module} changed but no key names it"
                continue
            got = torch_layout(leaf)
            exact = want[comp, match[0]]
            np.testing.assert_allclose(got, exact, rtol=0, atol=1e-6 * (1 + np.abs(exact).max()),
                                       err_msg=f"{comp} {match[0]}")
            np.testing.assert_allclose(got, reference[f"{comp}/{match[0]}"], rtol=0, atol=2e-6,
                                       err_msg=f"{comp} {match[0]} vs diffusers")
            # the LoRA moves the kernel far beyond the tolerance, so an adapter read as nothing cannot pass
            assert np.abs(exact - torch_layout(kernel(sd.params, comp, match[0]))).max() > 1e-3
            moved += 1
    assert moved == 32


def test_pipeline_load_lora_on_sdxl_fuses_and_unloads(sd, fused):
    scale, _, reference = fused
    pipe = Pipeline.for_stable_diffusion(sd)
    pipe.load_lora(LOCON, scale=scale).fuse_lora()
    for name, w in reference.items():
        comp, module = name.split("/", 1)
        np.testing.assert_allclose(torch_layout(kernel(pipe.params, comp, module)), w, rtol=0, atol=2e-6)
    pipe.unfuse_lora().unload_lora()
    assert all(pipe.params[c] is sd.params[c] for c in ("unet", "text", "text_2"))


def test_sdxl_keys_that_map_nowhere_are_refused_by_name(sd, tmp_path):
    down, up = np.zeros((2, 8), np.float32), np.zeros((8, 2), np.float32)
    good = read(LOCON)
    # level 0 of SDXL's U-Net has no attention, so input_blocks_1_1 is nothing; the tiny text encoders have 3 layers
    for bad in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                "lora_te2_text_model_encoder_layers_5_self_attn_q_proj"):
        save_file({**good, f"{bad}.lora_down.weight": down, f"{bad}.lora_up.weight": up}, str(tmp_path / "x.st"))
        with pytest.raises(lora.LoRAFileError, match=f"2 keys name no layer of the model: {bad}.lora_down.weight"):
            lora.load(tmp_path / "x.st", sd.params)
    # an SDXL file on a model with one text encoder
    sd1 = {k: v for k, v in sd.params.items() if k != "text_2"}
    with pytest.raises(lora.LoRAFileError, match="an SDXL LoRA .* for a model without SDXL's second text encoder"):
        lora.load(LOCON, sd1)
    peft = read(PEFT)
    key = next(k for k in peft if k.startswith("text_encoder_2."))
    save_file({**peft, key.replace("layers.1.", "layers.7."): peft[key]}, str(tmp_path / "p.st"))
    with pytest.raises(lora.LoRAFileError, match="text_encoder_2.text_model.encoder.layers.7|text_encoder_2.encoder"
                                                 ".layers.7"):
        lora.load(tmp_path / "p.st", sd.params)


def test_ldm_names_on_sdxl_base_s_real_layout():
    """The rule read off SDXL base 1.0's U-Net: two resnets per level, no attention in level 0, transformers of
    depth 2 and 10, no downsampler after level 2, the added embedding as label_emb."""
    real = json.loads(gzip.decompress(open(os.path.join(FIXTURES, "sd_keys", "sdxl_keys.json.gz"), "rb").read()))
    tree: dict = {}
    for key, _, kind, _ in real["components"]["sdxl_base_unet"]:
        if kind in ("Conv2d", "Linear") and key.endswith(".weight"):
            node = tree
            for p in module_path(key):
                node = node.setdefault(p, {})
            node["kernel"] = np.zeros(())
    index = lora._kohya_names({"params": tree})
    want = {
        "input_blocks_0_0": "conv_in", "input_blocks_2_0_in_layers_2": "down_blocks_0_resnets_1_conv1",
        "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
        "input_blocks_4_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_k":
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k",
        "input_blocks_5_1_transformer_blocks_1_ff_net_2": "down_blocks_1_attentions_1_transformer_blocks_1_ff_net_2",
        "input_blocks_6_0_op": "down_blocks_1_downsamplers_0_conv",
        "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0":
            "down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0",
        "input_blocks_8_0_emb_layers_1": "down_blocks_2_resnets_1_time_emb_proj",
        "middle_block_1_transformer_blocks_9_attn1_to_q": "mid_block_attentions_0_transformer_blocks_9_attn1_to_q",
        "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
        "output_blocks_0_1_proj_in": "up_blocks_0_attentions_0_proj_in",
        "output_blocks_2_1_transformer_blocks_9_ff_net_0_proj":
            "up_blocks_0_attentions_2_transformer_blocks_9_ff_net_0_proj",
        "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks_5_2_conv": "up_blocks_1_upsamplers_0_conv",
        "output_blocks_3_0_skip_connection": "up_blocks_1_resnets_0_conv_shortcut",
        "output_blocks_8_0_in_layers_2": "up_blocks_2_resnets_2_conv1",
        "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
        "time_embed_0": "time_embedding_linear_1", "out_2": "conv_out",
    }
    for ldm, diffusers in want.items():
        assert diffusers in index, diffusers
        assert lora._ldm_name(ldm, index) == diffusers, ldm
    # no attention in level 0, none in up level 2, no downsampler after the last level: these name nothing
    for ldm in ("input_blocks_1_1_proj_in", "output_blocks_7_1_proj_in", "input_blocks_9_0_op"):
        assert lora._ldm_name(ldm, index) not in index, ldm
