"""Each experiment end to end in a tiny configuration, the pipeline, and the CLI's bad-input exits."""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_data import write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "4", "--batch-size", "8", "--steps-per-dispatch", "2", "--save-every", "2",
        "--channels", "8,16,32", "--sample-steps", "2", "--warmup", "1"]


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_split(folder, "train", 64)
    write_split(folder, "test", 32)
    return str(folder)


@pytest.fixture(scope="module")
def cfg_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cfg"))
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", out, "--per-label", "2", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_mnist_cfg_end_to_end(cfg_run):
    out, res = cfg_run
    for name in ["samples.png", "samples_gamma3.png", "negative.png", "loss.png", "loss.csv"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert "done: 4 steps" in res.stdout
    rows = open(os.path.join(out, "loss.csv")).read().split()
    assert rows[0] == "step,loss" and len(rows) == 5


def test_resume_continues_and_refuses_a_changed_schedule_of_work(cfg_run, tiny_data):
    out, _ = cfg_run
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", out, "--per-label", "1", *TINY[:-2])
    assert res.returncode == 2 and "--resume" in res.stderr
    more = [a if a != "4" else "6" for a in TINY]
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", out, "--per-label", "1", "--resume", *more)
    assert res.returncode == 0 and "resumed from step 4" in res.stderr, res.stderr[-2000:]
    assert len(open(os.path.join(out, "loss.csv")).read().split()) == 7
    other = [a if a != "8,16,32" else "8,16" for a in more]
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", out, "--resume", *other)
    assert res.returncode == 2 and "channels: checkpoint has [8, 16, 32], this run has [8, 16]" in res.stderr


def test_pipeline_from_checkpoint(cfg_run):
    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(cfg_run[0])  # the run's folder, or its checkpoints/
    assert Pipeline.from_checkpoint(os.path.join(cfg_run[0], "checkpoints")).config == pipe.config
    a = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=3)
    b = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=3)
    c = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=4)
    assert a.shape == (3, 28, 28, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(pipe._compiled) == 1  # a new seed reused the compiled sampler
    pipe([3], negative=[4], gamma=[1.5], sampler="dpm++", steps=2)
    for kwargs, msg in [({"condition": [10]}, "labels must be in 0..9"), ({"condition": [1], "gamma": float("nan")}, "gamma"),
                        ({"condition": [1], "sampler": "euler"}, "unknown sampler"), ({"condition": []}, "empty"),
                        ({"condition": [1], "negative": [-1]}, "negative must be in 0..9")]:
        with pytest.raises(ValueError, match=msg):
            pipe(**kwargs)


def test_missing_data_exits_2_with_where_to_put_it(tmp_path):
    res = run("experiments.mnist_cfg", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *TINY)
    assert res.returncode == 2
    assert "train-images-idx3-ubyte.gz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("bad", [["--gammas", "1,nan"], ["--steps", "0"], ["--channels", "8,x"], ["--p-uncond", "1.5"],
                                 ["--attention-levels", "3"]])
def test_bad_flags_exit_2(bad, tiny_data, tmp_path):
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", str(tmp_path), *bad)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]


@pytest.mark.parametrize("module", ["experiments.mnist_cond", "experiments.mnist_classifier_guidance"])
def test_other_experiments_end_to_end(module, tiny_data, tmp_path):
    extra = (["--classifier-steps", "2", "--classifier-channels", "8,8,8"] if "classifier" in module
             else ["--per-label", "2", "--attention-levels", "2", "--blocks-per-level", "2"])
    res = run(module, "--data-dir", tiny_data, "--out", str(tmp_path), "--dataset", "fashion_mnist", *TINY, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getsize(tmp_path / "samples.png") > 0 and "done:" in res.stdout


def test_evaluate_end_to_end(cfg_run, tiny_data, tmp_path):
    out = tmp_path / "eval"
    res = run("experiments.evaluate", "--checkpoint", os.path.join(cfg_run[0], "checkpoints"), "--data-dir", tiny_data,
              "--eval-classifier", str(tmp_path / "judge"), "--out", str(out), "--num-samples", "20", "--gammas", "0,3",
              "--samplers", "ddim:2,dpm++:2", "--steps", "2", "--batch-size", "8", "--steps-per-dispatch", "2",
              "--warmup", "1", "--sample-batch", "10")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = open(out / "quality.csv").read().splitlines()
    assert rows[0] == "guidance,sampler,nfe,gamma,fid,accuracy,seconds" and len(rows) == 5
    for row in rows[1:]:
        fid, acc = float(row.split(",")[4]), float(row.split(",")[5])
        assert fid >= 0 and 0 <= acc <= 1
    assert "| guidance | sampler | NFE | gamma | FID | accuracy | seconds |" in res.stdout
    assert os.path.getsize(out / "quality.png") > 0
    # the same judge reports the class accuracy of the main job's samples
    res = run("experiments.mnist_cfg", "--data-dir", tiny_data, "--out", cfg_run[0], "--resume", "--per-label", "1",
              "--eval-classifier", str(tmp_path / "judge"), "--eval-samples", "10", *[a if a != "4" else "6" for a in TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "class accuracy" in res.stdout


def test_text_to_image_end_to_end(tiny_data, tmp_path):
    res = run("experiments.mnist_text2img", "--data-dir", tiny_data, "--out", str(tmp_path), "--steps", "2",
              "--ae-steps", "2", "--clip-steps", "2", "--batch-size", "8", "--steps-per-dispatch", "2",
              "--save-every", "2", "--sample-steps", "2", "--per-prompt", "2", "--channels", "8,16", "--warmup", "1",
              "--prompt", "a handwritten 3", "--prompt", "zebra", "--negative-prompt", "the digit 8",
              "--eval-classifier", str(tmp_path / "judge"), "--judge-steps", "2", "--eval-gammas", "1,3",
              "--eval-per-class", "2", "--eval-images", "8", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "zero-shot accuracy" in res.stderr and "reconstruction MSE" in res.stderr and "done:" in res.stdout
    for name in ["prompts.png", "classes.png", "autoencoder/loss.csv", "clip/loss.csv", "ldm/loss.csv"]:
        assert os.path.getsize(tmp_path / name) > 0, name
    # one row per (gamma, template): 6 training and 2 held-out MNIST templates at 2 gammas
    rows = open(tmp_path / "text2img_quality.csv").read().splitlines()
    assert rows[0] == "gamma,templates,template,accuracy" and len(rows) == 1 + 2 * 8
    assert all(0 <= float(r.rsplit(",", 1)[1]) <= 1 for r in rows[1:])
    assert "| 3 | held-out, mean |" in open(tmp_path / "text2img_quality.md").read()

    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(str(tmp_path))
    a = pipe(["a handwritten 3", "zebra"], negative="the digit 8", steps=2, seed=1)
    assert a.shape == (2, 28, 28, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, pipe(["a handwritten 3", "zebra"], negative="the digit 8", steps=2, seed=1))
    assert pipe("seven", steps=2).shape == (1, 28, 28, 1)
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe([3])
    with pytest.raises(ValueError, match="pass the run's folder"):
        Pipeline.from_checkpoint(str(tmp_path / "ldm"))


def test_autoencoder_end_to_end(tiny_data, tmp_path):
    res = run("experiments.mnist_autoencoder", "--data-dir", tiny_data, "--out", str(tmp_path), "--steps", "2",
              "--batch-size", "8", "--steps-per-dispatch", "2", "--warmup", "1", "--rows", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reconstruction MSE" in res.stderr and "done: autoencoder 2 steps" in res.stdout
    from experiments.png import grid

    head = open(tmp_path / "reconstructions.png", "rb").read(24)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    expect = grid(np.zeros((4, 10, 28, 28, 1), np.uint8)).shape  # 2 pairs of rows of 10, shown at 2x
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and (height, width) == (2 * expect[0], 2 * expect[1])


def test_superres_end_to_end(tiny_data, tmp_path):
    res = run("experiments.mnist_superres", "--data-dir", tiny_data, "--out", str(tmp_path), *TINY, "--eval-images", "6",
              "--rows", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PSNR vs real 28x28" in res.stderr and "done:" in res.stdout
    assert os.path.getsize(tmp_path / "superres.png") > 0

    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(str(tmp_path))
    low = np.random.default_rng(0).integers(0, 256, (3, 14, 14, 1), dtype=np.uint8)
    out = pipe(low, steps=2, seed=0)
    assert out.shape == (3, 28, 28, 1) and out.dtype == np.uint8
    assert pipe(low, negative=low[:1], gamma=2.0, steps=2).shape == (3, 28, 28, 1)
    with pytest.raises(ValueError, match=r"shape \(N, 14, 14, 1\)"):
        pipe(np.zeros((1, 28, 28, 1), np.uint8))


def test_psnr_against_the_formula():
    from experiments.mnist_superres import psnr

    x = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1))
    np.testing.assert_allclose(psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-9)
