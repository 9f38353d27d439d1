"""SDXL single files in SGM's layout (base and refiner): jaxdiff's reading against the tiny folders (whose images
tests/test_sdxl.py holds to diffusers' own), the writer of tests/fixtures/make_single_file_fixtures.py being
validated by diffusers' from_single_file reading every weight back; the tables on SDXL 1.0's real key lists."""

import gzip
import hashlib
import json
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from test_single_file import real_template

from jaxdiff.pretrained import ldm_layout, single_file, weights
from jaxdiff.pretrained.sdxl import StableDiffusionXL

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
FIX = os.path.join(HERE, "sd_single_file")
LAYOUTS = json.load(gzip.open(os.path.join(FIX, "sdxl_layouts.json.gz"), "rt"))
REAL = json.load(gzip.open(os.path.join(FIX, "sdxl_real_keys.json.gz"), "rt"))
REAL_CONFIGS = json.load(open(os.path.join(HERE, "sdxl_real_configs.json")))
KEYS = json.load(gzip.open(os.path.join(HERE, "sd_keys", "sdxl_keys.json.gz"), "rt"))["components"]
TINY = {"sdxlbase": "sdxl_tiny_base", "sdxlrefiner": "sdxl_tiny_refiner"}
PART = {"unet": "unet", "vae": "vae", "text_encoder": "text", "text_encoder_2": "text_2"}
FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def folder_tensors(name):
    out = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        path = os.path.join(HERE, TINY[name], comp, f"{FILES.get(comp, 'model')}.safetensors")
        if os.path.exists(path):
            with safe_open(path, "numpy") as f:
                out[comp] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def build_file(tmp_path, name, edit=None):
    """The float16 SGM file diffusers read back in the fixture script, rebuilt from the tiny folder by the
    recorded layout (checked by its digest)."""
    tensors, out = folder_tensors(name), {}
    for key, comp, dkeys, shape, transposed in LAYOUTS[name]["layout"]:
        a = np.zeros(shape, np.float32) if comp is None else np.concatenate([tensors[comp][k] for k in dkeys], 0)
        out[key] = np.ascontiguousarray((a.T if transposed else a).reshape(shape).astype(np.float16))
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(k.encode())
        h.update(out[k].tobytes())
    assert h.hexdigest() == LAYOUTS[name]["sha256"]
    if edit is not None:
        edit(out)
    path = tmp_path / f"{name}.safetensors"
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("name", ["sdxlbase", "sdxlrefiner"])
def test_an_sdxl_file_gives_the_folders_parameters(tmp_path, name):
    """Every parameter read from the float16 file (label_emb, both text encoders, OpenCLIP's fused in_proj and
    transposed text_projection) is the one from_pretrained reads from the folder (``weights.load_params``, as
    ``StableDiffusionXL.from_folder`` calls it), rounded to float16."""
    folder = os.path.join(HERE, TINY[name])
    sd = single_file.load(build_file(tmp_path, name), config=folder, quiet=True)
    assert isinstance(sd, StableDiffusionXL)
    assert set(sd.params) == ({"unet", "vae", "text", "text_2"} if name == "sdxlbase" else {"unet", "vae", "text_2"})
    assert (sd.force_zeros, sd.aesthetic) == ((True, False) if name == "sdxlbase" else (False, True))
    assert sd.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    for part, sub in (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder"), ("text_2", "text_encoder_2")):
        if part not in sd.params:
            continue
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sd.params[part])
        want = weights._flatten(weights.load_params(template, os.path.join(folder, sub), name=sub))
        got = weights._flatten(sd.params[part])
        assert set(got) == set(want), part
        for fp, leaf in want.items():
            expect = np.asarray(leaf).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(got[fp]), expect, err_msg=f"{part} {fp}")
    # the transposed projection is not square here (8 -> 12): a missing transpose could not pass silently
    assert np.shape(sd.params["text_2"]["params"]["text_projection"]["kernel"]) == (8, 12)


def test_the_writer_holds_the_folders_tensors_under_sgm_names():
    """What diffusers' reader was given: names as SGM's (label_emb, embedders.0/1), every folder tensor once."""
    rows = LAYOUTS["sdxlbase"]["layout"]
    keys = {r[0] for r in rows}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    used = sorted((r[1], k) for r in rows if r[1] for k in r[2])
    assert used == sorted((c, k) for c, t in folder_tensors("sdxlbase").items() for k in t)


@pytest.mark.parametrize("which", ["sdxl_base", "sdxl_refiner"])
def test_the_layout_tables_cover_sdxls_real_key_lists_both_ways(which):
    """SDXL 1.0's single-file keys (the fixture script's writer over the real-size models) map back to the
    diffusers keys they came from; every parameter of the model the inferred configs describe (the key lists
    make_sdxl_key_fixtures.py recorded) gets exactly one tensor of the right shape."""
    rows = REAL[which]
    shapes = {k: tuple(s) for k, _, _, s, _ in rows}
    model_type = ldm_layout.detect(shapes)
    assert model_type == {"sdxl_base": "sdxl", "sdxl_refiner": "sdxl_refiner"}[which]
    configs = single_file.infer_configs({k: (None, s, "F16") for k, s in shapes.items()}, model_type)
    mapping, unknown, used_ema = ldm_layout.plan(shapes, model_type,
                                                 text_layers=configs["text_encoder_2"]["num_hidden_layers"])
    assert unknown == [] and not used_ema
    for key, comp, dkeys, _, transposed in rows:
        part, target = mapping[key]
        if comp is None:
            assert target == ldm_layout.DROPPED, key
            continue
        assert part == PART[comp], key
        assert isinstance(target, ldm_layout.Transposed) is transposed, key
        got = [t.key for t in target] if isinstance(target, tuple) else [getattr(target, "key", target)]
        if comp == "text_encoder":  # transformers 5's CLIPTextModel names its keys without text_model.
            got = [g.removeprefix("text_model.") for g in got]
        assert got == dkeys, key
    prefix = "sdxl_base" if which == "sdxl_base" else "sdxl_refiner"
    components = {"unet": f"{prefix}_unet", "vae": "sdxl_vae", "text_2": "sdxl_text_encoder_2"}
    if which == "sdxl_base":
        components["text"] = "sdxl_text_encoder"
    for part, component in components.items():
        flat = real_template(KEYS[component])
        targets = single_file.match(part, flat, mapping, shapes, which)
        assert len(targets) == len(flat) == len(KEYS[component])
    # OpenCLIP's projection is stored (width, projection): the Linear kernel is the stored tensor as it is
    assert shapes[f"conditioner.embedders.{1 if which == 'sdxl_base' else 0}.model.text_projection"] == (1280, 1280)


@pytest.mark.parametrize("which", ["sdxl_base", "sdxl_refiner"])
def test_configs_inferred_from_sdxls_real_shapes_are_the_real_folders(which):
    shapes = {k: (None, tuple(s), "F16") for k, _, _, s, _ in REAL[which]}
    got = single_file.infer_configs(shapes, "sdxl" if which == "sdxl_base" else "sdxl_refiner")
    real = REAL_CONFIGS[which]
    assert set(got) == {p for p in real if p.startswith(("unet", "vae", "text"))}
    for part in got:
        for key, value in got[part].items():
            if real[part].get(key) is not None:
                assert value == real[part][key], (which, part, key)
    assert got["unet"]["transformer_layers_per_block"] == real["unet"]["transformer_layers_per_block"]
    assert got["unet"]["addition_time_embed_dim"] == 256 and got["vae"]["force_upcast"] is True


def test_an_sdxl_file_loads_without_config_by_sdxls_conventions(tmp_path, capsys):
    """No config=: shapes give the configs, CLIP's shipped tokenizers pad as SDXL's two do, the scheduler is the
    base folder's EulerDiscrete one, 1024 x 1024, a missing negative prompt zeroed; OpenCLIP keeps every block."""
    entry = LAYOUTS["conventional"]
    rng = np.random.default_rng(0)
    tensors = {k: np.asarray(0.1 * rng.standard_normal(shape), np.float16) for k, _, _, shape, _ in entry["layout"]}
    path = tmp_path / "xl.safetensors"
    save_file(tensors, str(path))
    sd = single_file.load(path)
    assert "SDXL base, configs inferred from the shapes" in capsys.readouterr().err
    assert isinstance(sd, StableDiffusionXL) and sd.default_size == (128 * sd.latent_factor,) * 2 and sd.force_zeros
    assert sd.default_gamma == 5.0 and sd.prediction == "epsilon" and sd.latents_mean is None
    folder_sched = json.load(open(os.path.join(HERE, "sdxl_tiny_base", "scheduler", "scheduler_config.json")))
    assert all(folder_sched[k] == v for k, v in sd.scheduler_config.items() if k != "_class_name")
    assert sd.scheduler_config["_class_name"] == folder_sched["_class_name"] == "EulerDiscreteScheduler"
    assert sd.tokenizer.pad_token_id == 49407 and sd.tokenizer_2.pad_token_id == 0
    cfg = entry["configs"]
    assert sd.unet_spec.config_dict()["addition_time_embed_dim"] == cfg["unet"]["addition_time_embed_dim"]
    assert sd.text_2.num_hidden_layers == cfg["text_encoder_2"]["num_hidden_layers"]
    assert sd.unet.num_heads == (1, 2)
    p = tensors["conditioner.embedders.1.model.text_projection"].astype(np.float32)  # (64, 96): x @ P
    np.testing.assert_array_equal(np.asarray(sd.params["text_2"]["params"]["text_projection"]["kernel"]), p)
    fused = tensors["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"].astype(np.float32)
    layer = sd.params["text_2"]["params"]["text_model"]["encoder"]["layers_1"]["self_attn"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(np.asarray(layer[name]["kernel"]), fused[64 * i:64 * (i + 1)].T)


def test_bad_sdxl_files_are_one_clear_error(tmp_path):
    def no_label(t):
        for k in [k for k in t if ".label_emb." in k]:
            del t[k]
    with pytest.raises(ldm_layout.NotStableDiffusion, match=r"no model\.diffusion_model\.label_emb\.0\.0\.\*: not an "
                                                            r"SDXL U-Net"):
        single_file.load(build_file(tmp_path, "sdxlbase", no_label))

    def no_bigg(t):
        for k in [k for k in t if k.startswith("conditioner.embedders.1.")]:
            del t[k]
    with pytest.raises(ldm_layout.NotStableDiffusion, match=r"unknown SDXL text encoder layout "
                                                            r"conditioner\.embedders\.0\.transformer"):
        single_file.load(build_file(tmp_path, "sdxlbase", no_bigg))

    def extra(t):
        t["conditioner.embedders.1.model.transformer.resblocks.0.attn.extra"] = np.zeros(2, np.float16)
    with pytest.raises(single_file.UnknownKeys, match=r"resblocks\.0\.attn\.extra \(2,\)"):
        single_file.load(build_file(tmp_path, "sdxlbase", extra), config=os.path.join(HERE, "sdxl_tiny_base"))
    with pytest.raises(ValueError, match=r"lists no text_encoder, tokenizer; an SDXL base file needs a "
                                         r"config folder of the same kind"):
        single_file.load(build_file(tmp_path, "sdxlbase"), config=os.path.join(HERE, "sdxl_tiny_refiner"))
