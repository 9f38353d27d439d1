"""The key rule, safetensors -> flax params (every tensor accounted for) and back, and model folders.

No torch: the "checkpoints" are torch-layout NumPy arrays written with safetensors.numpy, and the
expected flax layouts are written out here as closed forms (einsum index strings, explicit shapes).
"""

import gzip
import json
import pathlib
import re
import socket

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdiff import specs
from jaxdiff.pretrained import folder as folder_mod
from jaxdiff.pretrained import weights
from jaxdiff.pretrained.folder import ModelNotFound, PipelineLayoutError, read_pipeline_index, resolve
from jaxdiff.pretrained.keys import flax_path, to_flax, to_torch, torch_key
from jaxdiff.pretrained.weights import (
    CheckpointMismatch,
    CheckpointNotFound,
    UnsupportedCheckpointFormat,
    _flatten,
    load_params,
    save_params,
)

S = jax.ShapeDtypeStruct

# --------------------------------------------------------------------------------------------
# the key rule on real Stable Diffusion keys

REAL_KEYS = [
    # U-Net
    ("conv_in.weight", ("conv_in", "kernel")),
    ("time_embedding.linear_1.weight", ("time_embedding", "linear_1", "kernel")),
    ("time_embedding.linear_2.bias", ("time_embedding", "linear_2", "bias")),
    ("down_blocks.0.resnets.0.norm1.weight", ("down_blocks_0", "resnets_0", "norm1", "scale")),
    ("down_blocks.0.resnets.1.conv2.bias", ("down_blocks_0", "resnets_1", "conv2", "bias")),
    ("down_blocks.0.resnets.0.time_emb_proj.weight", ("down_blocks_0", "resnets_0", "time_emb_proj", "kernel")),
    ("down_blocks.0.downsamplers.0.conv.weight", ("down_blocks_0", "downsamplers_0", "conv", "kernel")),
    (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "kernel"),
    ),
    (
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        ("down_blocks_1", "attentions_1", "transformer_blocks_0", "attn2", "to_k", "kernel"),
    ),
    (
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        ("down_blocks_2", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel"),
    ),
    (
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2.bias",
        ("down_blocks_2", "attentions_0", "transformer_blocks_0", "ff", "net_2", "bias"),
    ),
    (
        "down_blocks.2.attentions.0.transformer_blocks.0.norm3.weight",
        ("down_blocks_2", "attentions_0", "transformer_blocks_0", "norm3", "scale"),
    ),
    ("mid_block.attentions.0.proj_in.weight", ("mid_block", "attentions_0", "proj_in", "kernel")),
    ("mid_block.resnets.1.conv1.weight", ("mid_block", "resnets_1", "conv1", "kernel")),
    ("up_blocks.3.resnets.2.conv_shortcut.weight", ("up_blocks_3", "resnets_2", "conv_shortcut", "kernel")),
    ("up_blocks.0.upsamplers.0.conv.bias", ("up_blocks_0", "upsamplers_0", "conv", "bias")),
    ("up_blocks.10.resnets.12.norm2.bias", ("up_blocks_10", "resnets_12", "norm2", "bias")),
    ("conv_norm_out.weight", ("conv_norm_out", "scale")),
    # autoencoder
    ("encoder.down_blocks.3.resnets.1.norm2.weight", ("encoder", "down_blocks_3", "resnets_1", "norm2", "scale")),
    (
        "encoder.mid_block.attentions.0.group_norm.weight",
        ("encoder", "mid_block", "attentions_0", "group_norm", "scale"),
    ),
    ("encoder.mid_block.attentions.0.to_q.weight", ("encoder", "mid_block", "attentions_0", "to_q", "kernel")),
    ("decoder.mid_block.attentions.0.to_out.0.bias", ("decoder", "mid_block", "attentions_0", "to_out_0", "bias")),
    ("decoder.up_blocks.2.upsamplers.0.conv.weight", ("decoder", "up_blocks_2", "upsamplers_0", "conv", "kernel")),
    ("quant_conv.weight", ("quant_conv", "kernel")),
    ("post_quant_conv.bias", ("post_quant_conv", "bias")),
    # CLIP text encoder
    ("text_model.embeddings.token_embedding.weight", ("text_model", "embeddings", "token_embedding", "embedding")),
    (
        "text_model.embeddings.position_embedding.weight",
        ("text_model", "embeddings", "position_embedding", "embedding"),
    ),
    (
        "text_model.encoder.layers.11.self_attn.q_proj.weight",
        ("text_model", "encoder", "layers_11", "self_attn", "q_proj", "kernel"),
    ),
    ("text_model.encoder.layers.3.mlp.fc1.bias", ("text_model", "encoder", "layers_3", "mlp", "fc1", "bias")),
    ("text_model.encoder.layers.0.layer_norm1.weight", ("text_model", "encoder", "layers_0", "layer_norm1", "scale")),
    ("text_model.final_layer_norm.weight", ("text_model", "final_layer_norm", "scale")),
    ("text_projection.weight", ("text_projection", "kernel")),
]


@pytest.mark.parametrize("key,path", REAL_KEYS, ids=[k for k, _ in REAL_KEYS])
def test_key_rule_both_ways(key, path):
    template = {p for _, p in REAL_KEYS}
    assert flax_path(key, template) == path
    assert torch_key(path) == key


def test_flax_path_reads_the_leaf_off_a_nested_template():
    nested = {"norm": {"scale": 0, "bias": 0}, "emb": {"embedding": 0}, "proj": {"kernel": 0}}
    assert flax_path("norm.weight", nested) == ("norm", "scale")
    assert flax_path("emb.weight", nested) == ("emb", "embedding")
    assert flax_path("proj.weight", nested) == ("proj", "kernel")
    assert flax_path("unknown.weight", nested) == ("unknown", "kernel")
    assert flax_path("text_model.embeddings.position_ids") == ("text_model", "embeddings", "position_ids")


def test_torch_key_takes_the_spelling_a_reference_has():
    # linear_1 is a torch name in TimestepEmbedding; elsewhere name_<n> is a list index
    assert torch_key(("emb", "linear_1", "kernel")) == "emb.linear_1.weight"
    assert torch_key(("blocks_1", "kernel")) == "blocks.1.weight"
    assert torch_key(("blocks_1", "kernel"), reference={"blocks_1.weight"}) == "blocks_1.weight"
    assert torch_key(("linear_1", "bias"), reference={"linear.1.bias"}) == "linear.1.bias"


@pytest.mark.parametrize("bad", ["weight", "a..weight", "0.weight", "a.0", ""])
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValueError):
        flax_path(bad)


def test_leaf_layouts_are_the_closed_forms():
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(5, 3, 3, 2))  # torch (O, I, kh, kw)
    k = to_flax(("c", "kernel"), conv, (3, 2, 3, 5))
    np.testing.assert_array_equal(k, np.einsum("oihw->hwio", conv))
    assert k[2, 1, 0, 4] == conv[4, 0, 2, 1]
    dense = rng.normal(size=(7, 4))  # torch (out, in)
    np.testing.assert_array_equal(to_flax(("d", "kernel"), dense, (4, 7)), np.einsum("oi->io", dense))
    # old autoencoder attention: a 1x1 conv weight read into a Dense kernel
    np.testing.assert_array_equal(to_flax(("to_q", "kernel"), dense[:, :, None, None], (4, 7)), dense.T)
    # and a linear weight read into a 1x1 Conv kernel
    np.testing.assert_array_equal(to_flax(("p", "kernel"), dense, (1, 1, 4, 7)), dense.T[None, None])
    for leaf in ("scale", "bias", "embedding"):
        v = rng.normal(size=(6, 3) if leaf == "embedding" else (6,))
        assert to_flax(("m", leaf), v, v.shape) is not None
        np.testing.assert_array_equal(to_flax(("m", leaf), v, v.shape), v)
        np.testing.assert_array_equal(to_torch(("m", leaf), v), v)
    np.testing.assert_array_equal(to_torch(("c", "kernel"), k), conv)
    np.testing.assert_array_equal(to_torch(("d", "kernel"), dense.T), dense)


# --------------------------------------------------------------------------------------------
# every key of the real SD 1.5 / 2.1 components (names and shapes only, from
# tests/fixtures/make_key_fixtures.py: the models built from their real configs on torch's meta device)

REAL = json.loads(
    gzip.decompress((pathlib.Path(__file__).parent / "fixtures" / "sd_keys" / "keys.json.gz").read_bytes())
)
FLAX_LEAF = {
    "Conv2d": "kernel",
    "Linear": "kernel",
    "GroupNorm": "scale",
    "LayerNorm": "scale",
    "Embedding": "embedding",
}


def real_template(rows):
    """The flax paths and shapes the contract prescribes, written independently of keys.py."""
    template = {}
    for key, shape, owner, _ in rows:
        module, leaf = key.rsplit(".", 1)
        path = tuple(re.sub(r"\.(\d+)", r"_\1", module).split(".")) + (leaf if leaf == "bias" else FLAX_LEAF[owner],)
        if leaf == "weight" and owner == "Conv2d":
            shape = [shape[2], shape[3], shape[1], shape[0]]
        elif leaf == "weight" and owner == "Linear":
            shape = [shape[1], shape[0]]
        template[path] = S(tuple(shape), jnp.float32)
    return template


# SDXL base 1.0's and refiner 1.0's components (tests/fixtures/make_sdxl_key_fixtures.py)
REAL["components"].update(json.loads(
    gzip.decompress((pathlib.Path(__file__).parent / "fixtures" / "sd_keys" / "sdxl_keys.json.gz").read_bytes())
)["components"])


@pytest.mark.parametrize("component", sorted(REAL["components"]))
def test_key_rule_on_every_real_key(component):
    rows = REAL["components"][component]
    template = real_template(rows)
    by_key = {key: path for (key, *_), path in zip(rows, template, strict=True)}
    for key, path in by_key.items():
        assert flax_path(key, template) == path, key
        assert torch_key(path) == key, path


SDXL_CONFIGS = json.loads((pathlib.Path(__file__).parent / "fixtures" / "sdxl_real_configs.json").read_text())
SDXL_PARTS = {"sdxl_base_unet": ("sdxl_base", "unet", specs.StableDiffusionUNet),
              "sdxl_refiner_unet": ("sdxl_refiner", "unet", specs.StableDiffusionUNet),
              "sdxl_vae": ("sdxl_base", "vae", specs.StableDiffusionAutoencoder),
              "sdxl_text_encoder": ("sdxl_base", "text_encoder", specs.CLIPText),
              "sdxl_text_encoder_2": ("sdxl_base", "text_encoder_2", specs.CLIPTextWithProjection)}


@pytest.mark.parametrize("component", sorted(SDXL_PARTS))
def test_sdxl_modules_from_the_real_configs_have_exactly_the_real_parameters(component):
    """jaxdiff's modules built from SDXL base's and refiner's config.json (shapes only, nothing allocated) hold
    the parameters the real checkpoints hold, name for name and shape for shape, by the key rule both ways."""
    model, part, spec = SDXL_PARTS[component]
    template = _flatten(spec.from_config(SDXL_CONFIGS[model][part]).template()["params"])
    want = real_template(REAL["components"][component])
    assert {p: tuple(v.shape) for p, v in template.items()} == {p: tuple(v.shape) for p, v in want.items()}
    assert sum(int(np.prod(v.shape)) for v in template.values()) == SDXL_CONFIGS[model]["parameter_counts"][part]


@pytest.mark.parametrize("component", sorted(REAL["components"]))
def test_real_checkpoints_fit_their_templates(component):
    rows = REAL["components"][component]
    entries = {key: (None, tuple(shape), dtype) for key, shape, _, dtype in rows}
    plan = weights._plan(entries, real_template(rows))
    assert plan.num_problems == 0 and len(plan.assign) == len(rows)


def test_real_old_autoencoder_and_clip_buffers_fit():
    rows = REAL["components"]["vae"]
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    entries = {}
    for key, shape, _, dtype in rows:
        for new, was in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
        entries[key] = (None, tuple(shape) + ((1, 1) if len(shape) == 2 else ()), dtype)
    assert sum(".query." in k for k in entries) == 4  # encoder and decoder, weight and bias
    plan = weights._plan(entries, real_template(rows))
    assert plan.num_problems == 0
    assert plan.assign["decoder.mid_block.attentions.0.proj_attn.weight"] == (
        "decoder",
        "mid_block",
        "attentions_0",
        "to_out_0",
        "kernel",
    )
    rows = REAL["components"]["sd15_text_encoder"]
    entries = {key: (None, tuple(shape), dtype) for key, shape, _, dtype in rows}
    entries["text_model.embeddings.position_ids"] = (None, (1, 77), "I64")  # SD 1.5's file has this buffer
    plan = weights._plan(entries, real_template(rows))
    assert plan.num_problems == 0 and plan.ignored == ["text_model.embeddings.position_ids"]


# --------------------------------------------------------------------------------------------
# a small "U-Net-like" component: templates as ShapeDtypeStruct trees, checkpoints in torch layout


def unet_like():
    """(template, torch state dict) with conv, dense, norm, nested lists, linear_1, to_out.0."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    sd = {
        "conv_in.weight": f(8, 4, 3, 3),
        "conv_in.bias": f(8),
        "time_embedding.linear_1.weight": f(16, 8),
        "time_embedding.linear_1.bias": f(16),
        "down_blocks.0.resnets.0.norm1.weight": f(8),
        "down_blocks.0.resnets.0.norm1.bias": f(8),
        "down_blocks.0.resnets.0.conv1.weight": f(64, 8, 3, 3),
        "down_blocks.0.resnets.0.conv1.bias": f(64),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": f(8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": f(8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias": f(8),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": f(32, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": f(8, 16),
        "up_blocks.1.resnets.2.conv_shortcut.weight": f(8, 16, 1, 1),
    }
    template = {}
    for key, a in sd.items():
        path = _expected_path(key)
        shape = a.shape if path[-1] != "kernel" else (a.shape[::-1] if a.ndim == 2 else a.shape[2:] + a.shape[1::-1])
        node = template
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = S(shape, jnp.float32)
    return template, sd


def _expected_path(key):
    for k, p in REAL_KEYS:
        if k == key:
            return p
    parts = []
    for part in key.split(".")[:-1]:
        if part.isdigit():
            parts[-1] += "_" + part
        else:
            parts.append(part)
    leaf = key.rsplit(".", 1)[1]
    return tuple(parts) + (
        ("scale",) if "norm" in parts[-1] and leaf == "weight" else ("kernel",) if leaf == "weight" else (leaf,)
    )


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def write(folder, sd, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / name), metadata={"format": "pt"})
    return folder


def test_load_puts_every_tensor_in_flax_layout(tmp_path):
    template, sd = unet_like()
    params = load_params(template, write(tmp_path / "unet", sd))
    assert jax.tree.structure(params) == jax.tree.structure(template)
    for key, a in sd.items():
        got = np.asarray(_get(params, _expected_path(key)))
        leaf = _expected_path(key)[-1]
        want = np.einsum("oihw->hwio", a) if a.ndim == 4 else np.einsum("oi->io", a) if leaf == "kernel" else a
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.dtype == np.float32


def test_template_wrapped_in_params_and_dtypes(tmp_path):
    template, sd = unet_like()
    sd16 = {k: v.astype(np.float16) for k, v in sd.items()}
    src = write(tmp_path / "unet", sd16)
    params = load_params({"params": template}, src)
    assert set(params) == {"params"}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float16)}  # as stored
    cast = load_params(template, src, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}


def test_shape_mismatch_message_names_key_and_all_shapes(tmp_path):
    template, sd = unet_like()
    sd["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 4, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatch) as e:
        load_params(template, write(tmp_path / "unet", sd))
    assert (
        "unet: down_blocks.0.resnets.0.conv1.weight: checkpoint (32, 4, 3, 3) -> flax (3, 3, 4, 32), "
        "the model expects (3, 3, 8, 64)"
    ) in str(e.value)
    assert len(e.value.wrong_shape) == 1 and not e.value.missing and not e.value.unused
    assert isinstance(e.value, ValueError)


def test_missing_renamed_and_unused_keys_in_one_error(tmp_path):
    template, sd = unet_like()
    del sd["conv_in.bias"]  # missing
    sd["time_embedding.linear_one.weight"] = sd.pop("time_embedding.linear_1.weight")  # renamed
    sd["extra.weight"] = np.zeros((3,), np.float32)  # unused
    with pytest.raises(CheckpointMismatch) as e:
        load_params(template, write(tmp_path / "unet", sd))
    msg = str(e.value)
    assert "does not fit the model (2 missing, 2 unused)" in msg
    assert "unet: conv_in.bias: missing from the checkpoint (flax conv_in/bias (8,))" in msg
    assert (
        "unet: time_embedding.linear_1.weight: missing from the checkpoint "
        "(flax time_embedding/linear_1/kernel (8, 16))"
        in msg
    )
    assert (
        "unet: time_embedding.linear_one.weight: checkpoint (16, 8) is not used "
        "(no flax parameter time_embedding/linear_one/kernel)"
        in msg
    )
    assert "unet: extra.weight: checkpoint (3,) is not used" in msg
    assert {m[0] for m in e.value.missing} == {"time_embedding.linear_1.weight", "conv_in.bias"}
    assert {u[0] for u in e.value.unused} == {"time_embedding.linear_one.weight", "extra.weight"}


def test_two_flax_paths_for_one_torch_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match="two flax parameters map to the torch key 'blocks.1.weight'"):
        save_params(
            {"blocks_1": {"kernel": np.ones((2, 2))}, "blocks": {"1": {"kernel": np.ones((2, 2))}}},
            tmp_path / "x.safetensors",
        )


def test_long_problem_lists_are_capped(tmp_path):
    template = {f"blocks_{i}": {"kernel": S((2, 2), jnp.float32)} for i in range(60)}
    with pytest.raises(CheckpointMismatch) as e:
        load_params(template, write(tmp_path / "unet", {"other.weight": np.zeros((2, 2), np.float32)}))
    lines = str(e.value).splitlines()
    assert len(lines) == 1 + weights.MAX_PROBLEM_LINES + 1
    assert lines[-1].strip() == f"... and {61 - weights.MAX_PROBLEM_LINES} more"
    assert "no key matched at all" in lines[0]
    assert len(e.value.missing) == 60 and len(e.value.unused) == 1


def test_missing_file_bin_only_and_other_names(tmp_path):
    template, sd = unet_like()
    with pytest.raises(CheckpointNotFound, match="no such folder"):
        load_params(template, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFound, match="diffusion_pytorch_model.safetensors or model.safetensors"):
        load_params(template, empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (pickled / "config.json").write_text("{}")
    with pytest.raises(UnsupportedCheckpointFormat) as e:
        load_params(template, pickled)
    assert "diffusion_pytorch_model.bin" in str(e.value) and "safetensors only" in str(e.value)
    assert "save_pretrained(" in str(e.value) and "safe_serialization=True" in str(e.value)
    odd = write(tmp_path / "odd", sd, name="weights.safetensors")
    with pytest.raises(CheckpointNotFound, match="found weights.safetensors"):
        load_params(template, odd)
    # a file path is read as it is
    assert jax.tree.structure(load_params(template, odd / "weights.safetensors")) == jax.tree.structure(template)


def test_sharded_checkpoint_with_index(tmp_path):
    template, sd = unet_like()
    keys = sorted(sd)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    unet = tmp_path / "unet"
    write(unet, {k: sd[k] for k in first}, "diffusion_pytorch_model-00001-of-00002.safetensors")
    write(unet, {k: sd[k] for k in second}, "diffusion_pytorch_model-00002-of-00002.safetensors")
    weight_map = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "diffusion_pytorch_model-00002-of-00002.safetensors" for k in second})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded = load_params(template, unet)
    whole = load_params(template, write(tmp_path / "whole", sd))
    jax.tree.map(np.testing.assert_array_equal, sharded, whole)
    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFound, match="diffusion_pytorch_model-00002-of-00002.safetensors"):
        load_params(template, unet)


def test_fp16_variant(tmp_path):
    template, sd = unet_like()
    unet = write(tmp_path / "unet", sd)
    write(unet, {k: v.astype(np.float16) for k, v in sd.items()}, "diffusion_pytorch_model.fp16.safetensors")
    full = load_params(template, unet)
    half = load_params(template, unet, variant="fp16")
    assert {x.dtype for x in jax.tree.leaves(full)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.float16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float16), b), full, half)
    with pytest.raises(CheckpointNotFound, match="no 'bf16' variant.*diffusion_pytorch_model.fp16.safetensors"):
        load_params(template, unet, variant="bf16")


def test_fp16_only_folder_names_the_variant_to_pass(tmp_path):
    template, sd = unet_like()
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    unet = write(tmp_path / "unet", half, "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointNotFound) as e:
        load_params(template, unet)
    assert "variant='fp16'" in str(e.value) and "\n" not in str(e.value)
    assert jax.tree.leaves(load_params(template, unet, variant="fp16"))[0].dtype == jnp.float16
    names = ["model.fp16-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.non_ema.json",
             "diffusion_pytorch_model-00001-of-00002.bf16.safetensors", "weights.safetensors"]
    assert weights._variants_present(names) == ["fp16", "non_ema", "bf16"]


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_truncated_or_empty_file_is_named_in_one_line(tmp_path, cut):
    template, sd = unet_like()
    unet = write(tmp_path / "unet", sd)
    f = unet / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"" if cut == "empty" else data[: len(data) - 100])
    with pytest.raises(weights.DamagedCheckpoint) as e:
        load_params(template, unet)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and ("empty" if cut == "empty" else "damaged or truncated") in msg


@pytest.mark.parametrize("dtype", [np.int8, np.bool_, np.int64])
def test_integer_or_bool_weights_are_refused_naming_key_and_dtype(tmp_path, dtype):
    template, sd = unet_like()
    sd["conv_in.weight"] = np.ones(sd["conv_in.weight"].shape, dtype)
    with pytest.raises(weights.DamagedCheckpoint) as e:
        load_params(template, write(tmp_path / "unet", sd), name="unet")
    code = {np.int8: "I8", np.bool_: "BOOL", np.int64: "I64"}[dtype]
    assert str(e.value).startswith(f"unet: conv_in.weight is stored as {code} in ") and "\n" not in str(e.value)
    sd["conv_in.weight"] = sd["conv_in.bias"][:1].astype(np.float64).repeat(8 * 4 * 9).reshape(8, 4, 3, 3)
    load_params(template, write(tmp_path / "ok", sd))  # every float width is read


def test_non_finite_weights_are_named_at_load(tmp_path):
    template, sd = unet_like()
    sd["conv_in.weight"][0, 0, 0, 0] = np.nan
    sd["time_embedding.linear_1.bias"][3] = -np.inf
    with pytest.raises(weights.DamagedCheckpoint) as e:
        load_params(template, write(tmp_path / "unet", sd), name="unet")
    msg = str(e.value)
    assert msg.startswith("unet: conv_in.weight holds 1 non-finite value(s) (NaN or inf) of 288 in ")
    assert "1 more tensors too" in msg and "\n" not in msg
    half = {k: np.nan_to_num(v, neginf=0.0).astype(np.float16) for k, v in sd.items()}
    half["conv_in.bias"][2] = np.inf
    with pytest.raises(weights.DamagedCheckpoint, match=r"conv_in.bias holds 1 non-finite .* in \S+half/"):
        load_params(template, write(tmp_path / "half", half))


def test_bfloat16_tensors_read_exactly(tmp_path, monkeypatch):
    template = {"proj": {"kernel": S((4, 3), jnp.float32), "bias": S((3,), jnp.float32)}}
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 8  # exact in bfloat16
    sd = {"proj.weight": w.astype(jnp.bfloat16), "proj.bias": np.array([1.5, -2.0, 0.25], jnp.bfloat16)}
    src = write(tmp_path / "te", sd)
    p = load_params(template, src)
    assert p["proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p["proj"]["kernel"], np.float32), w.T)
    # a safetensors build whose NumPy path refuses bfloat16: the raw bytes are read instead
    real_init = weights._Checkpoint.__init__

    def init_refusing(self, files):
        real_init(self, files)
        self._handles = {f: _Refusing() for f in self._handles}

    monkeypatch.setattr(weights._Checkpoint, "__init__", init_refusing)
    q = load_params(template, src)
    jax.tree.map(np.testing.assert_array_equal, p, q)
    assert q["proj"]["bias"].dtype == jnp.bfloat16


class _Refusing:
    def get_tensor(self, key):
        raise TypeError("data type 'bfloat16' not understood")


def test_old_autoencoder_attention_names_and_conv_shapes(tmp_path):
    rng = np.random.default_rng(2)
    c = 6
    new = {
        n: {"kernel": S((c, c), jnp.float32), "bias": S((c,), jnp.float32)}
        for n in ("to_q", "to_k", "to_v", "to_out_0")
    }
    template = {"encoder": {"mid_block": {"attentions_0": {"group_norm": {"scale": S((c,), jnp.float32)}, **new}}}}
    old = {"encoder.mid_block.attentions.0.group_norm.weight": rng.normal(size=c).astype(np.float32)}
    for name in ("query", "key", "value", "proj_attn"):
        old[f"encoder.mid_block.attentions.0.{name}.weight"] = rng.normal(size=(c, c, 1, 1)).astype(np.float32)
        old[f"encoder.mid_block.attentions.0.{name}.bias"] = rng.normal(size=c).astype(np.float32)
    p = load_params(template, write(tmp_path / "vae", old))
    attn = p["encoder"]["mid_block"]["attentions_0"]
    for name, flax_name in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out_0")):
        w = old[f"encoder.mid_block.attentions.0.{name}.weight"][:, :, 0, 0]
        np.testing.assert_array_equal(attn[flax_name]["kernel"], w.T)
        np.testing.assert_array_equal(attn[flax_name]["bias"], old[f"encoder.mid_block.attentions.0.{name}.bias"])
    # saved back, it has today's names
    out = load_file(str(save_params(p, tmp_path / "new" / "diffusion_pytorch_model.safetensors")))
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in out and out[
        "encoder.mid_block.attentions.0.to_q.weight"
    ].shape == (c, c)


def clip_like():
    rng = np.random.default_rng(3)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    sd = {
        "text_model.embeddings.token_embedding.weight": f(50, 8),
        "text_model.embeddings.position_embedding.weight": f(7, 8),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": f(8, 8),
        "text_model.encoder.layers.0.layer_norm1.weight": f(8),
        "text_model.encoder.layers.1.mlp.fc1.weight": f(32, 8),
        "text_model.encoder.layers.1.mlp.fc1.bias": f(32),
        "text_model.final_layer_norm.weight": f(8),
    }
    template = {
        "text_model": {
            "embeddings": {
                "token_embedding": {"embedding": S((50, 8), jnp.float32)},
                "position_embedding": {"embedding": S((7, 8), jnp.float32)},
            },
            "encoder": {
                "layers_0": {
                    "self_attn": {"q_proj": {"kernel": S((8, 8), jnp.float32)}},
                    "layer_norm1": {"scale": S((8,), jnp.float32)},
                },
                "layers_1": {"mlp": {"fc1": {"kernel": S((8, 32), jnp.float32), "bias": S((32,), jnp.float32)}}},
            },
            "final_layer_norm": {"scale": S((8,), jnp.float32)},
        }
    }
    return template, sd


def test_clip_position_ids_buffer_is_ignored(tmp_path):
    template, sd = clip_like()
    sd["text_model.embeddings.position_ids"] = np.arange(7, dtype=np.int64)[None]
    p = load_params(template, write(tmp_path / "text_encoder", sd, "model.safetensors"))
    np.testing.assert_array_equal(
        p["text_model"]["embeddings"]["token_embedding"]["embedding"],
        sd["text_model.embeddings.token_embedding.weight"],
    )


@pytest.mark.parametrize("variant", ["no text_model prefix", "extra prefix", "both"])
def test_clip_prefix_alignment(tmp_path, variant):
    template, sd = clip_like()
    if variant == "no text_model prefix":
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    elif variant == "extra prefix":
        sd = {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
    else:
        sd = {"text_encoder." + k.removeprefix("text_model."): v for k, v in sd.items()}
    p = load_params(template, write(tmp_path / "text_encoder", sd, "model.safetensors"))
    ref_template, ref_sd = clip_like()
    ref = load_params(ref_template, write(tmp_path / "ref", ref_sd, "model.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, p, ref)


def test_clip_prefix_alignment_still_reports_problems(tmp_path):
    template, sd = clip_like()
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd["encoder.layers.1.mlp.fc1.bias"] = np.zeros(31, np.float32)
    with pytest.raises(CheckpointMismatch) as e:
        load_params(template, write(tmp_path / "text_encoder", sd, "model.safetensors"))
    msg = str(e.value)
    assert "model prefix 'text_model.' added" in msg
    assert "text_encoder: encoder.layers.1.mlp.fc1.bias: checkpoint (31,) -> flax (31,), the model expects (32,)" in msg
    assert msg.count("\n") == 1  # one problem, not every key


# --------------------------------------------------------------------------------------------
# real flax modules: names from linen, numbers against NumPy closed forms


class Tiny(nn.Module):
    def setup(self):
        self.conv_in = nn.Conv(5, (3, 3), padding=1)
        self.norm = nn.GroupNorm(num_groups=1, epsilon=1e-5)
        self.resnets = [nn.Dense(5), nn.Dense(5)]
        self.to_out = [nn.Dense(2)]
        self.embed = nn.Embed(11, 5)

    def __call__(self, x, ids):
        h = self.conv_in(x)
        h = self.norm(h)
        h = self.resnets[1](self.resnets[0](h))
        return self.to_out[0](h + self.embed(ids)[:, None, None, :])


def test_real_linen_module_loads_and_computes_the_torch_function(tmp_path):
    model = Tiny()
    x = np.random.default_rng(4).normal(size=(2, 4, 4, 3)).astype(np.float32)
    ids = np.array([3, 9])
    template = jax.eval_shape(model.init, jax.random.key(0), x, ids)
    rng = np.random.default_rng(5)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    sd = {
        "conv_in.weight": f(5, 3, 3, 3),
        "conv_in.bias": f(5),
        "norm.weight": f(5),
        "norm.bias": f(5),
        "resnets.0.weight": f(5, 5),
        "resnets.0.bias": f(5),
        "resnets.1.weight": f(5, 5),
        "resnets.1.bias": f(5),
        "to_out.0.weight": f(2, 5),
        "to_out.0.bias": f(2),
        "embed.weight": f(11, 5),
    }
    params = load_params(template, write(tmp_path / "tiny", sd))
    got = np.asarray(model.apply(params, x, ids), np.float64)

    # the same function on the torch-layout tensors, float64 NumPy
    s = {k: v.astype(np.float64) for k, v in sd.items()}
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = np.zeros((2, 4, 4, 5))
    for i in range(3):
        for j in range(3):
            h += np.einsum("bhwc,oc->bhwo", xp[:, i : i + 4, j : j + 4, :], s["conv_in.weight"][:, :, i, j])
    h += s["conv_in.bias"]
    mu, var = h.mean((1, 2, 3), keepdims=True), h.var((1, 2, 3), keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-5) * s["norm.weight"] + s["norm.bias"]
    h = h @ s["resnets.0.weight"].T + s["resnets.0.bias"]
    h = h @ s["resnets.1.weight"].T + s["resnets.1.bias"]
    want = (h + s["embed.weight"][ids][:, None, None, :]) @ s["to_out.0.weight"].T + s["to_out.0.bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# save -> load round trip


def test_round_trip_save_then_load(tmp_path):
    template, sd = unet_like()
    params = load_params(template, write(tmp_path / "unet", sd))
    out = save_params(params, tmp_path / "saved" / "diffusion_pytorch_model.safetensors")
    back = load_file(str(out))
    assert set(back) == set(sd)  # linear_1 keeps its name, list items get their dots back
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    again = load_params({"params": template}, tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, again["params"], params)
    # with a prefix (a CLIPTextModel's text_model. kept outside the flax tree, say)
    ctemplate, csd = clip_like()
    cparams = load_params(ctemplate, write(tmp_path / "te", csd, "model.safetensors"))
    inner = cparams["text_model"]
    save_params(inner, tmp_path / "te2" / "model.safetensors", prefix="text_model.")
    assert set(load_file(str(tmp_path / "te2" / "model.safetensors"))) == set(csd)
    with pytest.raises(ValueError, match="prefix"):
        save_params(inner, tmp_path / "x.safetensors", prefix="text_model")


def test_round_trip_keeps_bfloat16(tmp_path):
    params = {
        "a": {"kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
        "n": {"scale": jnp.ones(3, jnp.bfloat16)},
    }
    save_params(params, tmp_path / "m" / "model.safetensors")
    template = jax.tree.map(lambda x: S(x.shape, x.dtype), params)
    back = load_params(template, tmp_path / "m")
    assert back["a"]["kernel"].dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, back, params)


# --------------------------------------------------------------------------------------------
# model folders and hub ids (never the network)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_resolve_local_folder_and_non_ids(tmp_path):
    assert resolve(tmp_path) == tmp_path.resolve()
    assert resolve(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ModelNotFound, match="no such folder"):
        resolve(str(tmp_path / "missing" / "deeper"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFound, match="a file, not a folder"):
        resolve(tmp_path / "file.txt")


def test_resolve_offline_fails_in_one_line(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ModelNotFound) as e:
        resolve("some-org/some-model", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("some-org/some-model: offline and not in the local Hub cache")
    assert "pass the folder" in msg and "hf download some-org/some-model" in msg


def test_resolve_unreachable_hub_fails_in_one_line(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    def unreachable(*a, **k):
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/api/models/org/name")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFound) as e:
        resolve("org/name", offline=False)
    assert str(e.value) == (
        "org/name: could not fetch it (ConnectionError); download it where the Hub is reachable "
        "(e.g. `hf download org/name --local-dir DIR`) and pass the folder instead of the id"
    )


def test_resolve_offline_uses_the_hub_cache(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--sd-tiny"
    snap = repo / "snapshots" / commit
    (snap / "unet").mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (snap / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve("org/sd-tiny", cache_dir=tmp_path / "cache") == snap


def test_download_patterns_take_only_what_the_pipeline_reads():
    from fnmatch import fnmatch

    repo_files = [
        "model_index.json",
        "v1-5-pruned.safetensors",
        "v1-5-pruned-emaonly.ckpt",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "safety_checker/model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]

    def taken(variant):
        pats = folder_mod._download_patterns(variant)
        return {f for f in repo_files if any(fnmatch(f, p) for p in pats)}

    assert taken(None) == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    }
    fp16 = taken("fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16 and "text_encoder/model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16


SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def sd_folder(root, index=SD15_INDEX):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for c in ("unet", "vae", "text_encoder"):
        (root / c).mkdir(exist_ok=True)
        (root / c / "config.json").write_text("{}")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return root


def test_read_pipeline_index(tmp_path):
    idx = read_pipeline_index(sd_folder(tmp_path / "sd"))
    assert idx.class_name == "StableDiffusionPipeline"
    assert idx.components["unet"] == ("diffusers", "UNet2DConditionModel")
    assert idx["tokenizer"] == tmp_path / "sd" / "tokenizer"
    assert set(idx.paths) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def test_a_damaged_component_config_is_named(tmp_path):
    """Every config file of the folder is read by one checked reader: a truncated unet/config.json is
    a PipelineLayoutError naming it, not a bare JSONDecodeError."""
    import shutil

    from jaxdiff.pretrained.stable_diffusion import StableDiffusion

    root = tmp_path / "sd"
    shutil.copytree(pathlib.Path(__file__).parent / "fixtures" / "sd_tiny_sd1pipe", root)
    config = root / "unet" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(PipelineLayoutError, match=r"unet/config.json: not valid JSON"):
        StableDiffusion.from_folder(root)
    config.write_text("[1, 2]")
    with pytest.raises(PipelineLayoutError, match=r"unet/config.json: expected a JSON object"):
        StableDiffusion.from_folder(root)


def test_read_pipeline_index_errors_name_what_is_missing(tmp_path):
    with pytest.raises(PipelineLayoutError, match="model_index.json: missing"):
        read_pipeline_index(tmp_path)
    no_vae = {k: v for k, v in SD15_INDEX.items() if k != "vae"}
    with pytest.raises(PipelineLayoutError, match="lists no vae"):
        read_pipeline_index(sd_folder(tmp_path / "a", no_vae))
    b = sd_folder(tmp_path / "b")
    (b / "unet" / "config.json").unlink()
    with pytest.raises(PipelineLayoutError, match=r"unet/config.json: missing"):
        read_pipeline_index(b)
    c = sd_folder(tmp_path / "c")
    (c / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(PipelineLayoutError, match="tokenizer: missing vocab.json and merges.txt"):
        read_pipeline_index(c)
    d = sd_folder(tmp_path / "d")
    for f in (d / "scheduler").iterdir():
        f.unlink()
    (d / "scheduler").rmdir()
    with pytest.raises(PipelineLayoutError, match="scheduler: missing folder"):
        read_pipeline_index(d)
    with pytest.raises(PipelineLayoutError, match="unet is a UNet2DModel; jaxdiff reads UNet2DConditionModel"):
        read_pipeline_index(sd_folder(tmp_path / "e", {**SD15_INDEX, "unet": ["diffusers", "UNet2DModel"]}))
