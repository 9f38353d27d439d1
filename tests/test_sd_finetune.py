"""experiments.sd_finetune on the tiny SD-1 pipeline and a folder of captioned squares: a LoRA run with
validation samples whose file jaxdiff's pipeline loads (the exact resume is trainer.fit's, tested there);
a full fine-tune whose saved diffusers folder loads back with the trained U-Net; flags refused in one
line."""

import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from test_experiments import run

from jaxdiff import lora
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "sd_tiny_sd1pipe")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Eight 40x40 images with .txt captions: red or green, a square of another colour in a corner."""
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i in range(8):
        img = np.zeros((40, 40, 3), np.uint8)
        img[..., i % 2] = 200
        img[5:20, 5:20] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red square", "a green square"][i % 2])
    return folder


def common_flags(squares, out, steps):
    return ["--model", MODEL, "--data", squares, "--out", out, "--steps", steps, "--batch-size", 2,
            "--steps-per-dispatch", 2, "--save-every", 2, "--lr", 1e-3]


def test_a_lora_run_samples_and_saves_a_file_the_pipeline_loads(squares, tmp_path, capsys):
    out = tmp_path / "lora"
    flags = common_flags(squares, out, 2) + ["--lora-rank", 2, "--validation-prompt", "a red square",
                                             "--per-prompt", 2, "--sample-every", 2, "--sample-steps", 2]
    code, _, err = run(capsys, "sd_finetune", *flags)
    assert code == 0, err
    assert "LoRA rank 2" in err and (out / "samples" / "step_000002.png").exists()
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("unet.") and ".lora_" in k for k in saved)
    assert any(np.any(v) for k, v in saved.items() if "lora_B" in k)  # B starts at zero: training moved it
    # jaxdiff reads the file back as the adapters it trained, and its pipeline runs with them
    sd = stable_diffusion.load(MODEL)
    adapter = lora.load(out / "pytorch_lora_weights.safetensors", sd.params)
    pipe = Pipeline.from_pretrained(MODEL).load_lora(out / "pytorch_lora_weights.safetensors")
    merged = lora.merge(sd.params, adapter)["unet"]
    for a, b in zip(jax.tree.leaves(pipe.lora_params()["unet"]), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_full_fine_tune_saves_a_diffusers_folder_holding_the_trained_unet(squares, tmp_path, capsys):
    out = tmp_path / "full"
    code, _, err = run(capsys, "sd_finetune", *common_flags(squares, out, 2), "--no-flip")
    assert code == 0, err
    assert "the U-Net (" in err and (out / "model" / "model_index.json").exists()
    before, after = stable_diffusion.load(MODEL), stable_diffusion.load(out / "model")
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before.params["unet"]), jax.tree.leaves(after.params["unet"]), strict=True)]
    assert any(changed)
    for part in ("vae", "text"):  # frozen: written back as they were
        for a, b in zip(jax.tree.leaves(before.params[part]), jax.tree.leaves(after.params[part]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("flags, msg", [
    (["--lora-alpha", 4], "--lora-alpha needs --lora-rank"),
    (["--resolution", 33], "--resolution 33 must be a multiple of the autoencoder's 2"),
    (["--lora-rank", 2, "--init-unet", "random"], "--lora-rank adapts a pretrained U-Net"),
    (["--mesh", "data=3"], "mesh"),
])
def test_bad_flags_are_one_line_and_leave_no_output(squares, tmp_path, capsys, flags, msg):
    out = tmp_path / "bad"
    code, _, err = run(capsys, "sd_finetune", *common_flags(squares, out, 2), *flags)
    assert code == 2 and msg in err and err.strip().count("\n") <= 2, err
    assert not out.exists()
