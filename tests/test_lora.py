"""LoRA files and the pipeline: a LoRA diffusers wrote (tests/fixtures/make_sd_train_fixtures.py) loads into jaxdiff
and gives the U-Net output diffusers gives with it loaded (scale 1 and 0.5, fused and unfused); the file jaxdiff
writes from the same weights holds what diffusers' file holds."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdiff import lora
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def lora_file(name):
    return os.path.join(HERE, "sd_train", name, "lora", "pytorch_lora_weights.safetensors")


def read(path):
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module", params=["sd1pipe", "sd2pipe"])
def loaded(request):
    sd = stable_diffusion.load(os.path.join(HERE, f"sd_tiny_{request.param}"))
    return request.param, sd


def test_the_unet_with_a_diffusers_lora_equals_diffusers_fused_and_unfused(loaded):
    name, sd = loaded
    ref = np.load(os.path.join(HERE, "sd_train", name, "unet_lora.npz"))
    unet = jax.jit(lambda p: sd.unet.apply(p, ref["x"], ref["tau"], None, ref["context"]))
    pipe = Pipeline.for_stable_diffusion(sd)
    np.testing.assert_allclose(unet(pipe.lora_params()["unet"]), ref["base"], rtol=0, atol=2e-5)
    pipe.load_lora(lora_file(name), scale=0.5)
    assert "lora" in pipe.params  # unfused: the LoRA travels as data beside the parameters
    # ... into the compiled sampler, which merges it there (traced), as here
    traced = jax.jit(lambda p: sd.unet.apply(pipe._apply_loras(p)["unet"], ref["x"], ref["tau"], None, ref["context"]))
    np.testing.assert_allclose(traced(pipe.params), ref["scale05"], rtol=0, atol=2e-5)
    pipe.fuse_lora()
    assert "lora" not in pipe.params
    np.testing.assert_allclose(unet(pipe.params["unet"]), ref["scale05"], rtol=0, atol=2e-5)
    pipe.unfuse_lora()
    np.testing.assert_allclose(unet(pipe.params["unet"]), ref["base"], rtol=0, atol=2e-5)
    pipe.load_lora(lora_file(name), scale=0.5)  # two LoRAs add up: 0.5 + 0.5 is scale 1
    np.testing.assert_allclose(unet(pipe.lora_params()["unet"]), ref["scale1"], rtol=0, atol=2e-5)
    pipe.unload_lora()
    assert pipe.params["unet"] is sd.params["unet"]


def test_the_file_jaxdiff_writes_holds_what_diffusers_wrote(loaded, tmp_path):
    name, sd = loaded
    theirs, their_meta = read(lora_file(name))
    adapter = lora.load(lora_file(name), sd.params)
    lora.save(tmp_path / "mine.safetensors", adapter)
    ours, our_meta = read(tmp_path / "mine.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    # what diffusers' load_lora_weights reads from the metadata: rank, alpha and the targets (the fixture
    # script checked that these alone load to the same output in diffusers)
    theirs_m, ours_m = json.loads(their_meta["lora_adapter_metadata"]), json.loads(our_meta["lora_adapter_metadata"])
    for key in ("unet.r", "unet.lora_alpha"):
        assert ours_m[key] == theirs_m[key], key
    assert sorted(ours_m["unet.target_modules"]) == sorted(theirs_m["unet.target_modules"])
    assert our_meta["format"] == "pt"
    again = lora.load(tmp_path / "mine.safetensors", sd.params)
    assert again.alphas == adapter.alphas == {"unet": {k: 8.0 for k in adapter.alphas["unet"]}}


def test_other_layouts_read_the_same(tmp_path):
    """No prefix (peft's save_lora_adapter), and diffusers' older lora.down / lora.up with .alpha tensors."""
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    tensors, meta = read(lora_file("sd1pipe"))
    want = lora.merge(sd.params, lora.load(lora_file("sd1pipe"), sd.params))["unet"]
    bare = {k.removeprefix("unet."): v for k, v in tensors.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"), metadata={
        "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})})
    old = {}
    for k, v in tensors.items():
        module = k.rsplit(".", 2)[0]
        old[k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")] = v
        old[f"{module}.alpha"] = np.array(8.0, np.float32)
    save_file(old, str(tmp_path / "old.safetensors"))
    for path in ("bare", "old"):
        got = lora.merge(sd.params, lora.load(tmp_path / f"{path}.safetensors", sd.params))["unet"]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    # rsLoRA: alpha / sqrt(r) is alpha * sqrt(r) / r
    save_file(tensors, str(tmp_path / "rs.safetensors"), metadata={
        "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_rslora": True})})
    assert set(lora.load(tmp_path / "rs.safetensors", sd.params).alphas["unet"].values()) == {8.0}


def test_bad_files_are_one_line(tmp_path):
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    tensors, _ = read(lora_file("sd1pipe"))
    cases = {
        "missing": None,
        "kohya": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 16), np.float32)},
        "te_nowhere": {**tensors, "text_encoder.nowhere.lora_A.weight": np.zeros((4, 16), np.float32),
                       "text_encoder.nowhere.lora_B.weight": np.zeros((16, 4), np.float32)},
        "unpaired": {k: v for k, v in tensors.items() if "lora_B" not in k},
        "elsewhere": {"unet.nowhere.to_q.lora_A.weight": np.zeros((4, 16), np.float32),
                      "unet.nowhere.to_q.lora_B.weight": np.zeros((16, 4), np.float32)},
        "conv": {"unet.conv_in.lora_A.weight": np.zeros((4, 4), np.float32),
                 "unet.conv_in.lora_B.weight": np.zeros((16, 4), np.float32)},
        "shape": {f"unet.{Q}.lora_A.weight": np.zeros((4, 7), np.float32),
                  f"unet.{Q}.lora_B.weight": np.zeros((16, 4), np.float32)},
        "junk": {"unet.something.else": np.zeros(3, np.float32)},
    }
    messages = {"missing": "no such LoRA file", "kohya": "has lora_down without lora_up",
                "te_nowhere": "text_encoder.nowhere, which this model has no Dense or Conv layer for",
                "unpaired": "lora_A without its pair",
                "elsewhere": "no Dense or Conv layer",
                "conv": r"unet.conv_in: down \(4, 4\) and up \(16, 4\) are not \(r, in, kh, kw\) and \(out, r\) "
                        r"for a 3x3",
                "shape": r"maps 7 -> 16; the model's layer maps 16 -> 16",
                "junk": "not LoRA weights"}
    for case, content in cases.items():
        path = tmp_path / f"{case}.safetensors"
        if content is not None:
            save_file(content, str(path))
        with pytest.raises(lora.LoRAFileError, match=messages[case]):
            lora.load(path, sd.params)
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(lora.LoRAFileError, match="not a readable"):
        lora.load(tmp_path / "text.safetensors", sd.params)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        Pipeline.for_stable_diffusion(sd).load_lora(lora_file("sd1pipe"), scale=float("inf"))


def test_init_is_peft_s():
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    adapter = lora.init(sd.params, rank=3, key=jax.random.key(0))
    mods = adapter.modules()["unet"]
    assert len(mods) == 32 and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in mods)
    for name, (a, b) in mods.items():
        bound = 1 / np.sqrt(a.shape[0])  # torch Linear's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert a.shape[1] == 3 and np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound, name
        assert not np.any(b), name
    assert set(adapter.alphas["unet"].values()) == {3.0}
    merged = lora.merge(sd.params, adapter)["unet"]
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(sd.params["unet"]), strict=True):
        np.testing.assert_array_equal(x, y)  # B = 0: a fresh LoRA changes nothing
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.init(sd.params, rank=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no Dense layer of 'unet' matches"):
        lora.init(sd.params, rank=2, key=jax.random.key(0), targets=("q_proj",))


def test_a_text_encoder_lora_round_trips_and_changes_the_states(tmp_path):
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    adapter = lora.init(sd.params, rank=2, alpha=3, key=jax.random.key(0), targets=lora.TEXT_TARGETS,
                        component="text")
    names = sorted(adapter.alphas["text"])
    assert len(names) == 8 and names[0] == "text_model.encoder.layers.0.self_attn.k_proj"
    adapter = adapter.replace(jax.tree.map(lambda a: a + 0.1, adapter.weights))  # nonzero B
    lora.save(tmp_path / "te.safetensors", adapter)
    tensors, meta = read(tmp_path / "te.safetensors")
    assert f"text_encoder.{names[0]}.lora_A.weight" in tensors
    assert json.loads(meta["lora_adapter_metadata"])["text_encoder.lora_alpha"] == 3
    again = lora.load(tmp_path / "te.safetensors", sd.params)
    assert again.alphas == adapter.alphas
    for a, b in zip(jax.tree.leaves(again.weights), jax.tree.leaves(adapter.weights), strict=True):
        np.testing.assert_array_equal(a, b)
    pipe = Pipeline.for_stable_diffusion(sd).load_lora(tmp_path / "te.safetensors")
    ids = pipe.condition.host(["a red bicycle"])
    plain = pipe.condition.network(sd.params, ids)
    adapted = pipe.condition.network(pipe.lora_params(), ids)
    assert np.abs(np.asarray(adapted) - np.asarray(plain)).max() > 1e-3


def test_the_fixtures_record_their_versions():
    for name in ("sd1pipe", "sd2pipe"):
        with open(os.path.join(HERE, "sd_train", name, "versions.json")) as f:
            versions = json.load(f)
        assert {"torch", "diffusers", "peft", "safetensors", "rank", "alpha"} <= set(versions)


def test_modules_of_other_ranks_and_alphas_are_written_as_patterns(tmp_path):
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    adapter = lora.load(lora_file("sd1pipe"), sd.params)
    alphas = {"unet": dict(adapter.alphas["unet"])}
    alphas["unet"][Q] = 2.0
    lora.save(tmp_path / "p.safetensors", lora.LoRA(adapter.weights, alphas))
    meta = json.loads(read(tmp_path / "p.safetensors")[1]["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and list(meta["unet.alpha_pattern"].values()) == [2.0]
    again = lora.load(tmp_path / "p.safetensors", sd.params)
    assert again.alphas == alphas
