"""Single-file checkpoints in the original LDM layout: jaxdiff's reading against diffusers' (the fixtures of
tests/fixtures/make_single_file_fixtures.py), the layout tables on SD-1.5's and SD-2.1's real key lists, config
inference, the shipped CLIP vocabulary, and the errors."""

import gzip
import hashlib
import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import clip_bpe, ldm_layout, single_file, weights
from jaxdiff.pretrained.keys import to_torch, torch_key

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
FIX = os.path.join(HERE, "sd_single_file")
LAYOUTS = json.load(gzip.open(os.path.join(FIX, "layouts.json.gz"), "rt"))
REAL = json.load(gzip.open(os.path.join(FIX, "real_keys.json.gz"), "rt"))
REAL_CONFIGS = json.load(open(os.path.join(HERE, "sd_real_configs.json")))
KEYS = json.load(gzip.open(os.path.join(HERE, "sd_keys", "keys.json.gz"), "rt"))
FLAX_LEAF = {"Conv2d": "kernel", "Linear": "kernel", "GroupNorm": "scale", "LayerNorm": "scale",
             "Embedding": "embedding"}
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
NEGATIVE = ["blurry", "low quality, watermark"]
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def folder(name):
    return os.path.join(HERE, f"sd_tiny_{name}")


def real_template(rows, prefix=()):
    """flax path -> shape for the diffusers rows of sd_keys/keys.json.gz (name, shape, owner class, dtype)."""
    template = {}
    for key, shape, owner, _ in rows:
        module, leaf = key.rsplit(".", 1)
        path = prefix + tuple(re.sub(r"\.(\d+)", r"_\1", module).split(".")) + (
            leaf if leaf == "bias" else FLAX_LEAF[owner],)
        if leaf == "weight" and owner == "Conv2d":
            shape = [shape[2], shape[3], shape[1], shape[0]]
        elif leaf == "weight" and owner == "Linear":
            shape = [shape[1], shape[0]]
        template[path] = jax.ShapeDtypeStruct(tuple(shape), np.float32)
    return template


def build_file(tmp_path, name, edit=None):
    """The single file diffusers read in the fixture script, rebuilt from the tiny folder's tensors by the
    recorded layout (checked by its digest); ``edit(tensors)`` changes it afterwards."""
    tensors = {}
    for comp, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        with safe_open(os.path.join(folder(name), comp, f"{base}.safetensors"), "numpy") as f:
            tensors[comp] = {k: f.get_tensor(k) for k in f.keys()}
    entry = LAYOUTS[name]
    out = {}
    for key, comp, dkeys, shape in entry["layout"]:
        a = np.zeros(shape, np.float32) if comp is None else np.concatenate([tensors[comp][k] for k in dkeys], 0)
        out[key] = np.ascontiguousarray(a.reshape(shape).astype(DTYPES[entry["dtype"]]))
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(k.encode())
        h.update(out[k].tobytes())
    assert h.hexdigest() == entry["sha256"]
    if edit is not None:
        edit(out)
    path = tmp_path / f"{name}.safetensors"
    save_file(out, str(path))
    return path


def test_a_single_file_gives_diffusers_images(tmp_path):
    """A bfloat16 SD-2 file (OpenCLIP text encoder with fused q/k/v, v-prediction), read into float32 parameters:
    the images diffusers' from_single_file makes from the same file and latents."""
    ref = np.load(os.path.join(FIX, "reference.npz"))
    pipe = Pipeline.from_single_file(build_file(tmp_path, "sd2pipe"), config=folder("sd2pipe"))
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(pipe.params))
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="ddim", steps=20, latents=ref["sd2pipe/latents"],
                    height=32, width=32)
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    np.testing.assert_allclose(images, ref["sd2pipe/images"], atol=5e-5, rtol=0)


def folder_params(name, rounding):
    """Each component's folder tensors by diffusers key (text keys without text_model.), rounded as a file holds
    them."""
    out = {}
    for comp, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        with safe_open(os.path.join(folder(name), comp, f"{base}.safetensors"), "numpy") as f:
            out[comp] = {k.removeprefix("text_model."): f.get_tensor(k).astype(rounding).astype(np.float32)
                         for k in f.keys()}
    return out


def assert_params_are(params, tensors, scale=1.0):
    flat = weights._flatten(params.get("params", params))
    assert len(flat) == len(tensors)
    for fp, leaf in flat.items():
        want = tensors[torch_key(fp).removeprefix("text_model.")]
        want = (want * scale).astype(np.float16).astype(np.float32) if scale != 1.0 else want
        np.testing.assert_array_equal(to_torch(fp, np.asarray(leaf)).reshape(want.shape), want)


def test_a_float16_sd1_file_holds_the_folders_weights(tmp_path):
    """Every parameter of a float16 SD-1 file (CLIP text encoder, 1x1-conv autoencoder attention) is the folder's
    tensor rounded to float16, as diffusers read it back in the fixture script (whose images from a folder are
    test_sd_pipeline's)."""
    params = single_file.load(build_file(tmp_path, "sd1pipe"), config=folder("sd1pipe"), quiet=True).params
    tensors = folder_params("sd1pipe", np.float16)
    for part, comp in (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder")):
        assert_params_are(params[part], tensors[comp])


def test_ema_weights_are_preferred_and_ema_false_reads_the_training_ones(tmp_path):
    """LitEma's names (model_ema. + the key without its first part, dots removed), as diffusers' extract_ema
    reads them (checked in the fixture script): the EMA copy holds the folder's U-Net, the training copy half
    of it."""
    def add_ema(t):
        for key in [k for k in t if k.startswith(ldm_layout.UNET)]:
            t[ldm_layout.ema_name(key)] = t[key]
            t[key] = (t[key].astype(np.float32) * 0.5).astype(np.float16)
        t["model_ema.decay"] = np.asarray(0.9999, np.float32)
        t["model_ema.num_updates"] = np.asarray(1000, np.int32)

    path = build_file(tmp_path, "sd1pipe", add_ema)
    unet = folder_params("sd1pipe", np.float16)["unet"]
    for ema, scale in ((None, 1.0), (False, 0.5)):
        assert_params_are(single_file.load(path, config=folder("sd1pipe"), ema=ema, quiet=True).params["unet"], unet,
                          scale)
    with pytest.raises(ValueError, match="ema=True, but the file holds no complete model_ema"):
        single_file.load(build_file(tmp_path, "sd1pipe"), config=folder("sd1pipe"), ema=True)


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_the_layout_tables_cover_the_real_key_lists_both_ways(which):
    """Every key of SD-1.5's / SD-2.1's single file (written by the fixture script's own diffusers -> LDM
    writer from the real-size models) maps to the diffusers key(s) it came from; every parameter of the
    model the inferred configs describe gets exactly one tensor of the right shape."""
    rows = REAL[which]
    shapes = {k: tuple(s) for k, _, _, s in rows}
    model_type = ldm_layout.detect(shapes)
    assert model_type == {"sd15": "sd1", "sd21": "sd2"}[which]
    entries = {k: (None, s, "F16") for k, s in shapes.items()}
    configs = single_file.infer_configs(entries, model_type)
    layers = configs["text_encoder"]["num_hidden_layers"]
    mapping, unknown, used_ema = ldm_layout.plan(shapes, model_type, text_layers=layers)
    assert unknown == [] and not used_ema
    strip = lambda k: k.removeprefix("text_model.")
    for key, comp, dkeys, _ in rows:
        part, target = mapping[key]
        if comp is None or ".resblocks.23." in key:  # known extras, and the block SD 2.x never runs
            assert target == ldm_layout.DROPPED, key
            continue
        got = [t.key for t in target] if isinstance(target, tuple) else [target]
        assert [strip(g) for g in got] == [strip(d) for d in dkeys], key
        assert part == {"unet": "unet", "vae": "vae", "text_encoder": "text"}[comp]
    # the diffusers side as make_key_fixtures.py recorded it (another script, the real configs): each
    # parameter gets exactly one tensor of the right shape
    components = {"unet": f"{which}_unet", "vae": "vae", "text": f"{which}_text_encoder"}
    for part, component in components.items():
        rows = KEYS["components"][component]
        flat = real_template(rows, ("text_model",) if part == "text" else ())
        targets = single_file.match(part, flat, mapping, shapes, which)
        assert len(targets) == len(flat) == len(rows)


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_configs_inferred_from_the_real_shapes_are_the_real_folders(which):
    shapes = {k: (None, tuple(s), "F16") for k, _, _, s in REAL[which]}
    got = single_file.infer_configs(shapes, "sd1" if which == "sd15" else "sd2", "epsilon" if which == "sd15"
                                    else "v_prediction")
    real = REAL_CONFIGS[which]
    for part in ("unet", "vae", "text_encoder"):
        for key, value in got[part].items():
            if key in real[part]:
                assert value == real[part][key], (part, key)
    assert got["unet"]["use_linear_projection"] is (which == "sd21")
    assert got["text_encoder"]["num_hidden_layers"] == (12 if which == "sd15" else 23)


def test_the_tiny_files_inferred_structure_is_their_folders():
    """Without config=: what shapes say (everything but the head count, a convention) equals the folders'."""
    for name in ("sd1pipe", "sd2pipe"):
        entries = {k: (None, tuple(s), "F16") for k, _, _, s in LAYOUTS[name]["layout"]}
        got = single_file.infer_configs(entries, "sd1" if name == "sd1pipe" else "sd2")
        for part in ("unet", "vae"):
            real = json.load(open(os.path.join(folder(name), part, "config.json")))
            for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                        "cross_attention_dim", "in_channels", "out_channels", "latent_channels"):
                if key in got[part]:
                    assert got[part][key] == real[key], (name, part, key)


def conventional_file(tmp_path, which):
    """A small model by SD's conventions (see the fixture script) with random float16 weights."""
    entry = LAYOUTS["conventional"][which]
    rng = np.random.default_rng(0)
    out = {k: (0.1 * rng.standard_normal(shape)).astype(np.float16) for k, _, _, shape in entry["layout"]}
    if which == "sd2":
        out["cond_stage_model.model.text_projection"] = np.zeros((64, 64), np.float16)
        out["cond_stage_model.model.logit_scale"] = np.zeros((), np.float16)
    path = tmp_path / f"{which}.safetensors"
    save_file(out, str(path))
    return path, entry["configs"], out


def test_a_file_loads_without_config_by_each_versions_conventions(tmp_path, capsys):
    """No config=: configs from the shapes, CLIP's shipped tokenizer, SD-1.5's / SD-2.1's scheduler; 2.x reads
    one text block less than the file holds, its fused in_proj split into q, k, v."""
    path, cfg, tensors = conventional_file(tmp_path, "sd1")
    sd = single_file.load(path)
    assert "SD 1.x, configs inferred from the shapes" in capsys.readouterr().err
    assert sd.unet_spec.config_dict()["block_out_channels"] == cfg["unet"]["block_out_channels"]
    assert sd.prediction == "epsilon" and sd.scheduler_config["_class_name"] == "PNDMScheduler"
    assert sd.default_size == (64 * sd.latent_factor,) * 2 and sd.tokenizer.pad_token_id == 49407
    assert sd.text.num_hidden_layers == 2 and sd.text.num_attention_heads == 1 and sd.unet.num_heads == (8, 8)

    path, cfg, tensors = conventional_file(tmp_path, "sd2")
    sd = single_file.load(path, prediction_type="epsilon", quiet=True)
    assert sd.prediction == "epsilon" and sd.scheduler_config["_class_name"] == "DDIMScheduler"
    assert sd.default_size == (64 * sd.latent_factor,) * 2 and sd.tokenizer.pad_token_id == 0
    assert sd.text.num_hidden_layers == cfg["text_encoder"]["num_hidden_layers"] - 1 and sd.unet.num_heads == (1, 2)
    fused = tensors["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].astype(np.float32)
    layer = sd.params["text"]["params"]["text_model"]["encoder"]["layers_1"]["self_attn"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(np.asarray(layer[name]["kernel"]), fused[64 * i:64 * (i + 1)].T)
    v = single_file.infer_configs({k: (None, t.shape, "F16") for k, t in tensors.items()}, "sd2", "v_prediction")
    assert v["unet"]["sample_size"] == 96  # 768-v by default


# public single-file key names (and their diffusers names) from converters and key dumps found with the
# search tools: an SD-1.5 ControlNet dump (same encoder layout), A1111 / diffusers-style rename tables
PUBLIC = {
    "sd15": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": ((320, 320, 1, 1), "down_blocks.0.attentions.0.proj_in"
                                                                   ".weight"),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": ((640, 320, 1, 1),
                                                                          "down_blocks.1.resnets.0.conv_shortcut.weight"),
        "model.diffusion_model.input_blocks.3.0.op.weight": ((320, 320, 3, 3),
                                                             "down_blocks.0.downsamplers.0.conv.weight"),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (
            (2560, 320), "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (
            (640, 768), "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        "model.diffusion_model.time_embed.0.weight": ((1280, 320), "time_embedding.linear_1.weight"),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (None, "up_blocks.0.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.5.2.conv.bias": (None, "up_blocks.1.upsamplers.0.conv.bias"),
        "model.diffusion_model.output_blocks.5.0.skip_connection.bias": (None, "up_blocks.1.resnets.2.conv_shortcut"
                                                                                ".bias"),
        "first_stage_model.decoder.up.3.upsample.conv.bias": (None, "decoder.up_blocks.0.upsamplers.0.conv.bias"),
        "first_stage_model.decoder.up.0.block.2.norm2.bias": (None, "decoder.up_blocks.3.resnets.2.norm2.bias"),
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight": (None, "encoder.down_blocks.2.resnets.0."
                                                                               "conv_shortcut.weight"),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
            (49408, 768), "text_model.embeddings.token_embedding.weight"),
    },
    "sd21": {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": ((3072, 1024), None)},
}


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_public_key_names_are_in_the_lists_and_map_as_others_map_them(which):
    shapes = {k: tuple(s) for k, _, _, s in REAL[which]}
    mapping, _, _ = ldm_layout.plan(shapes, "sd1" if which == "sd15" else "sd2", text_layers=23)
    for key, (shape, target) in PUBLIC[which].items():
        assert key in shapes, key
        assert shape is None or shapes[key] == shape, key
        assert target is None or mapping[key][1] == target, key


def test_the_shipped_vocabulary_tokenizes_as_transformers_does():
    """CLIP's vocabulary built from the shipped merges: known ids, and transformers' CLIPTokenizer over a
    vocab.json / merges.txt the fixture script built independently from the same merges."""
    ref = json.load(open(os.path.join(FIX, "tokens.json")))
    for which in ("sd1", "sd2"):
        tok = clip_bpe.bundled_tokenizer(which)
        ids, _ = tok(ref["prompts"])
        assert ids.tolist() == ref[which]
    assert ref["sd1"][0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ref["sd2"][0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    with pytest.raises(ValueError, match="pad must be one of"):
        clip_bpe.bundled_tokenizer("sdxl")


def test_bad_files_are_one_clear_error(tmp_path):
    """An unknown tensor is named; a pickle, a folder, a diffusers component file, an SDXL text encoder alone and
    a bad prediction_type are refused before any weight is read."""
    def extra(t):
        t["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((2, 2), np.float16)
    with pytest.raises(single_file.UnknownKeys, match=r"1 tensor\(s\) that no .*\n  model\.diffusion_model\.label_emb"
                                                      r"\.0\.0\.weight \(2, 2\)"):
        single_file.load(build_file(tmp_path, "sd1pipe", extra), config=folder("sd1pipe"))

    def inner(t):  # inside a transformer block names pass through: the model has no such parameter
        t["model.diffusion_model.input_blocks.1.1.lora_up.weight"] = np.zeros((2, 2), np.float16)
    with pytest.raises(weights.CheckpointMismatch, match=r"input_blocks\.1\.1\.lora_up\.weight: maps to flax "
                                                         r"down_blocks_0/attentions_0/lora_up/kernel, which the model"):
        single_file.load(build_file(tmp_path, "sd1pipe", inner), config=folder("sd1pipe"))
    # from_pretrained routes a file here; without config= the tiny model meets the real CLIP vocabulary (49408)
    with pytest.raises(ValueError, match=r"jaxdiff's CLIP tokenizer: bos_token .* has id 49406, outside .*sd1pipe"
                                         r"\.safetensors \(text_encoder config inferred from its shapes\)'s vocab"):
        Pipeline.from_pretrained(build_file(tmp_path, "sd1pipe"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02")
    with pytest.raises(weights.UnsupportedCheckpointFormat, match="model.ckpt: a PyTorch pickle"):
        Pipeline.from_single_file(ckpt)
    with pytest.raises(weights.CheckpointNotFound, match="a folder; from_single_file reads one"):
        Pipeline.from_single_file(tmp_path)
    with pytest.raises(ldm_layout.NotStableDiffusion, match="one component of a diffusers folder"):
        Pipeline.from_single_file(os.path.join(folder("sd1pipe"), "unet", "diffusion_pytorch_model.safetensors"))
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": np.zeros(2, np.float16)},
              str(xl))
    with pytest.raises(ldm_layout.NotStableDiffusion, match=r"an SDXL checkpoint \(conditioner\.embedders\.\*\) "
                                                            r"without model\.diffusion_model\.\* keys"):
        Pipeline.from_single_file(xl)
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction'"):
        Pipeline.from_single_file(xl, prediction_type="v")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(weights.DamagedCheckpoint, match="junk.safetensors"):
        Pipeline.from_single_file(junk)
