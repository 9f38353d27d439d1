"""save_pretrained writes the diffusers folder it was loaded from: every tensor's name, shape, dtype and value
equal to the original files, the same configs, a tokenizer that gives transformers' ids, parameters that load
back identical; and a save killed midway leaves the old folder whole. (That diffusers itself loads the saved
folder to the same images is checked by tests/fixtures/check_sd_save_with_diffusers.py, outside CI.)"""

import copy
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxdiff.pretrained import save, stable_diffusion, weights
from jaxdiff.pretrained.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}
CONFIGS = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
TOKENIZER = json.loads((FIXTURES / "sd_tokenizer" / "expected.json").read_text(encoding="utf-8"))


def tensors(path):
    f = safe_open(str(path), "numpy")
    return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@functools.cache
def load(name):
    return stable_diffusion.load(FIXTURES / f"sd_tiny_{name}")


@pytest.fixture(scope="module", params=["sd1pipe", "sd2pipe"])
def loaded(request):
    return FIXTURES / f"sd_tiny_{request.param}", load(request.param)


@pytest.fixture(scope="module")
def sd1():
    """The SD-1 pipeline and its original tensors, per part; tests copy it before changing anything."""
    source = FIXTURES / "sd_tiny_sd1pipe"
    return load("sd1pipe"), {sub: tensors(source / sub / name) for sub, name in WEIGHTS.items()}


def test_the_saved_folder_equals_the_one_it_was_loaded_from(loaded, tmp_path):
    source, sd = loaded
    out = sd.save_pretrained(tmp_path / "saved")
    for sub, name in WEIGHTS.items():
        want, got = tensors(source / sub / name), tensors(out / sub / name)
        assert sorted(got) == sorted(want), sub
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for c in CONFIGS:
        assert json.loads((out / c).read_text()) == json.loads((source / c).read_text()), c
    index = {k: v for k, v in json.loads((source / "model_index.json").read_text()).items() if k != "image_encoder"}
    assert json.loads((out / "model_index.json").read_text()) == index
    back = stable_diffusion.load(out)
    assert_same_params(back.params, sd.params)
    prompts = TOKENIZER["corpus"]
    np.testing.assert_array_equal(back.tokenizer(prompts)[0], sd.tokenizer(prompts)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary folder left beside it


@pytest.mark.parametrize("layout", ["sd1", "sd2", "sd1_decoder", "sd2_saved"])
def test_a_saved_tokenizer_gives_transformers_ids(layout, tmp_path):
    load_tokenizer(FIXTURES / "sd_tokenizer" / layout).save(tmp_path)
    ids, mask = load_tokenizer(tmp_path)(TOKENIZER["corpus"])
    np.testing.assert_array_equal(ids, np.asarray(TOKENIZER[layout]["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(TOKENIZER[layout]["attention_mask"]))


def test_parts_given_replace_those_of_the_model_and_dtype_casts(sd1, tmp_path):
    sd, original = sd1
    trained = jax.tree.map(lambda a: np.asarray(a) * 2 + 1, sd.params["unet"])
    out = save.save_pretrained(sd, tmp_path / "a", params={"unet": trained})
    unet = tensors(out / "unet" / WEIGHTS["unet"])
    assert sorted(unet) == sorted(original["unet"])
    for k, v in original["unet"].items():
        np.testing.assert_array_equal(unet[k], v * 2 + 1, err_msg=k)
    for sub in ("vae", "text_encoder"):
        for k, v in tensors(out / sub / WEIGHTS[sub]).items():
            np.testing.assert_array_equal(v, original[sub][k], err_msg=k)
    half = save.save_pretrained(sd, tmp_path / "b", dtype=jnp.float16)
    for sub, name in WEIGHTS.items():
        for k, v in tensors(half / sub / name).items():
            assert v.dtype == np.float16, k
            np.testing.assert_array_equal(v, original[sub][k].astype(np.float16), err_msg=k)
    with pytest.raises(ValueError, match="expected the parts"):
        save.save_pretrained(sd, tmp_path / "c", params={"text_encoder": sd.params["text"]})


def test_parts_built_from_configs_take_the_libraries_own_names(sd1, tmp_path):
    """With no record of a source folder, the text encoder's keys are transformers' (text_model....) and the
    U-Net's and autoencoder's diffusers'; jaxdiff reads them back to the same parameters."""
    sd, original = sd1
    sd = copy.copy(sd)
    sd.key_names = None
    out = sd.save_pretrained(tmp_path / "rule")
    text = tensors(out / "text_encoder" / "model.safetensors")
    assert sorted(text) == sorted("text_model." + k for k in original["text_encoder"])
    for sub in ("unet", "vae"):
        assert sorted(tensors(out / sub / WEIGHTS[sub])) == sorted(original[sub])
    back = weights.load_params(sd.text_spec.template(), out / "text_encoder")
    assert_same_params(back, sd.params["text"])


def test_a_target_that_is_not_a_pipeline_folder_is_refused(sd1, tmp_path):
    sd, _ = sd1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(save.SaveError, match=r"notes: a folder that holds other files and no model_index.json"):
        sd.save_pretrained(tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(save.SaveError, match="file: a file, not a folder"):
        sd.save_pretrained(tmp_path / "file")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_replacing_a_saved_folder_without_an_atomic_swap(sd1, tmp_path, monkeypatch):
    """Where renameat2 is missing, the old folder is moved aside and then removed: the result is the same."""
    sd, original = sd1
    target = sd.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(save, "_exchange", lambda a, b: False)
    sd.save_pretrained(target, params={"unet": jax.tree.map(lambda a: -np.asarray(a), sd.params["unet"])})
    for k, v in tensors(target / "unet" / WEIGHTS["unet"]).items():
        np.testing.assert_array_equal(v, -original["unet"][k], err_msg=k)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_the_atomic_swap_works_here(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not save._exchange(tmp_path / "a", tmp_path / "b"):
        assert not sys.platform.startswith("linux"), "renameat2(RENAME_EXCHANGE) failed on Linux"
        pytest.skip("no renameat2 here: the fallback is tested above")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()


def test_a_save_killed_midway_leaves_the_old_folder_whole(sd1, tmp_path):
    """A process killed (SIGKILL) while it writes the new folder, after its first file: the target is still
    the old pipeline, every file as it was; the next save_pretrained clears the partial copy and replaces it.
    (The writer is save_pretrained's own atomic writer, fed a slow copy, so the kill lands midway for sure.)"""
    sd, original = sd1
    target = sd.save_pretrained(tmp_path / "pipe")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    marker = tmp_path / "first-file-written"
    code = textwrap.dedent(f"""
        import pathlib, shutil, time
        from jaxdiff.pretrained import save
        def slow_copy(root):
            shutil.copy({str(FIXTURES / "sd_tiny_sd2pipe" / "model_index.json")!r}, root / "model_index.json")
            pathlib.Path({str(marker)!r}).write_text("x")
            time.sleep(120)
            shutil.copytree({str(FIXTURES / "sd_tiny_sd2pipe")!r}, root, dirs_exist_ok=True)
        save.write_folder_atomically(pathlib.Path({str(target)!r}), slow_copy)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the writer never wrote its first file"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".pipe.saving-")]
    assert len(leftovers) == 1  # the killed save's partial copy, beside the untouched target
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    sd.save_pretrained(target, params={"unet": jax.tree.map(lambda a: np.asarray(a) * 3, sd.params["unet"])})
    for k, v in tensors(target / "unet" / WEIGHTS["unet"]).items():
        np.testing.assert_array_equal(v, original["unet"][k] * 3, err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first-file-written", "pipe"]
