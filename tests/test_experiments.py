"""Each experiment end to end in a tiny configuration, run in this process through its main(); the
CLI's refusals (one line, exit 2, nothing damaged); reports checked against a recomputation."""

import re
import shutil

import numpy as np
import pytest
from test_data import write_split

from jaxdiff import data

TINY = ["--steps", "4", "--batch-size", "8", "--steps-per-dispatch", "2", "--save-every", "2",
        "--channels", "8,16", "--sample-steps", "2", "--warmup", "1"]


def flag(args, name, value):
    """``args`` with flag ``name`` set to ``value``."""
    i = args.index(name)
    return args[:i + 1] + [value] + args[i + 2:]


def run(capsys, module, *args):
    """main(args) of experiments.<module>: (exit status, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_split(folder, "train", 64)
    write_split(folder, "test", 32)
    return folder


@pytest.fixture(scope="module")
def cfg_run(tiny_data, tmp_path_factory):
    """One tiny trained main job, shared by the tests that read it (module scope: no capsys)."""
    import contextlib
    import io

    from experiments.mnist_cfg import main

    out, stdout, stderr = tmp_path_factory.mktemp("cfg"), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        main([*TINY, "--data-dir", str(tiny_data), "--out", str(out), "--per-label", "2"])
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.mark.xdist_group("cfg_run")  # one worker trains the shared run once
def test_mnist_cfg_end_to_end(cfg_run):
    out, stdout, stderr = cfg_run
    for name in ["samples.png", "samples_gamma3.png", "negative.png", "loss.png", "loss.csv"]:
        assert (out / name).stat().st_size > 0, name
    assert "done: 4 steps" in stdout and "compiling the training step" in stderr
    rows = (out / "loss.csv").read_text().split()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


@pytest.mark.xdist_group("cfg_run")  # one worker trains the shared run once
def test_resume_refuses_changed_meaning_and_has_nothing_to_do_at_its_steps(cfg_run, tiny_data, tmp_path, capsys):
    src, _, _ = cfg_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    base = [*TINY, "--data-dir", tiny_data, "--out", out, "--per-label", "1"]
    code, _, err = run(capsys, "mnist_cfg", *base)
    assert code == 2 and "pass --resume" in err
    for name, value, shown in [("--seed", "1", "--seed: checkpoint has 0, this run has 1"),
                               ("--lr", "0.002", "--lr: checkpoint has 0.001, this run has 0.002"),
                               ("--batch-size", "16", "--batch-size: checkpoint has 8, this run has 16"),
                               ("--p-uncond", "0.2", "--p-uncond: checkpoint has 0.1, this run has 0.2"),
                               ("--dataset", "fashion_mnist", "--dataset: checkpoint has 'mnist', this run has "
                                                              "'fashion_mnist'"),
                               ("--channels", "8,8", "--channels: checkpoint has [8, 16], this run has [8, 8]")]:
        args = flag(base, name, value) if name in base else [*base, name, value]
        code, _, err = run(capsys, "mnist_cfg", *args, "--resume")
        assert code == 2 and shown in err and len(err.strip().splitlines()[-1]) < 500, (name, err[-800:])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(capsys, "mnist_cfg", *flag(base, "--steps", "3"), "--resume")
    assert code == 0 and "already at step 4 >= --steps 3; nothing to do" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # outputs left alone


FAILING_SAVE = """
import resource, signal, sys, threading
from experiments import common
from jaxdiff import checkpoint
common.EXIT_GRACE_S = 1.0
save = checkpoint.Checkpoints.save

def full_disk_at_6(self, step, state, config):
    if step == 6:
        self.wait()  # the earlier saves are complete: only this one fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
        # as orbax's threads left waiting in the distributed key-value store, which kept the CLI from exiting
        threading.Thread(target=threading.Event().wait, name="stuck").start()
    return save(self, step, state, config)

checkpoint.Checkpoints.save = full_disk_at_6
from experiments.mnist_cfg import main
main(sys.argv[1:])
"""


@pytest.mark.xdist_group("cfg_run")  # one worker trains the shared run once
def test_a_failed_save_exits_promptly_in_one_line_and_a_resume_continues(cfg_run, tiny_data, tmp_path, capsys):
    """Issue 17: a disk that fills during a save. Writes past 1 KB fail (RLIMIT_FSIZE: no root needed), as
    on a full disk, in orbax's background threads; a stuck non-daemon thread stands for the ones that
    kept the interpreter from exiting. Then, with the disk back, --resume continues from step 4."""
    import os
    import subprocess
    import sys
    import time

    from jaxdiff.checkpoint import Checkpoints

    out = tmp_path / "run"
    shutil.copytree(cfg_run[0], out)
    base = [*TINY, "--data-dir", tiny_data, "--out", out, "--per-label", "1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", FAILING_SAVE, *map(str, flag(base, "--steps", "8")), "--resume"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and len(lines) <= 6, proc.stderr[-3000:]
    # the run stops there: by the next save at the latest (step 8), whose message still names step 6
    assert "checkpoint step 6 could not be saved" in errors[0] and "File too large" in errors[0], errors
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert time.monotonic() - t0 < 200
    with Checkpoints(out / "checkpoints") as ckpt:
        assert ckpt.steps() == [2, 4]
    assert not (out / "jaxdiff.lock").exists()  # released
    code, out_text, err = run(capsys, "mnist_cfg", *flag(base, "--steps", "6"), "--resume")
    assert code == 0 and "resumed from step 4" in err and "done: 6 steps" in out_text, err[-2000:]
    assert "orbax-checkpoint-tmp" not in err  # the failed save's leftovers removed without a warning
    assert len((out / "loss.csv").read_text().split()) == 7


@pytest.mark.xdist_group("cfg_run")  # one worker trains the shared run once
def test_pipeline_from_checkpoint(cfg_run):
    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(cfg_run[0])  # the run's folder, or its checkpoints/
    assert Pipeline.from_checkpoint(cfg_run[0] / "checkpoints").spec == pipe.spec
    a = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=3)
    b = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=3)
    c = pipe([0, 1, 2], gamma=2.0, sampler="ddim", steps=2, seed=4)
    assert a.shape == (3, 28, 28, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(pipe._compiled) == 1  # a new seed reused the compiled sampler
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        pipe([10])


def test_missing_data_exits_2_and_removes_the_out_folder_it_made(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tmp_path, "--out", out)
    assert code == 2 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert not out.exists()


def test_a_damaged_dataset_file_is_named_in_one_line(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    images = bad / data.FILES["train"][0]
    blob = images.read_bytes()
    images.write_bytes(blob[: len(blob) // 2])  # a truncated download
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", bad, "--out", tmp_path / "o1")
    assert code == 2 and str(images) in err and "truncated" in err and len(err.strip().splitlines()) == 1, err
    mid = len(blob) // 2
    images.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0x10]) + blob[mid + 1 :])  # one flipped bit in the stream
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", bad, "--out", tmp_path / "o2")
    assert code == 2 and str(images) in err and "Traceback" not in err, err


def test_out_that_is_a_file_or_unwritable(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tiny_data, "--out", tmp_path / "file")
    assert code == 2 and "is a file" in err and "Traceback" not in err
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tiny_data, "--out", "/proc/jaxdiff-out")
    assert code == 2 and "/proc/jaxdiff-out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [["--gammas", "1,nan"], ["--steps", "0"], ["--channels", "8,x"], ["--p-uncond", "1.5"],
                                 ["--attention-levels", "3"], ["--seed", "-1"], ["--gamma", "inf"],
                                 ["--sampler", "plms"]])
def test_bad_flags_exit_2(bad, tiny_data, tmp_path, capsys):
    code, _, err = run(capsys, "mnist_cfg", "--data-dir", tiny_data, "--out", tmp_path / "o", *bad)
    assert code == 2 and "Traceback" not in err, err[-1500:]
    assert not (tmp_path / "o").exists()


def test_cond_and_classifier_guidance_end_to_end(tiny_data, tmp_path, capsys):
    code, out, err = run(capsys, "mnist_cond", *TINY, "--data-dir", tiny_data, "--out", tmp_path / "cond",
                         "--dataset", "fashion_mnist", "--per-label", "2", "--attention-levels", "1",
                         "--blocks-per-level", "2")
    assert code == 0 and "done:" in out and (tmp_path / "cond" / "samples.png").stat().st_size > 0, err[-2000:]
    code, out, err = run(capsys, "mnist_classifier_guidance", *TINY, "--data-dir", tiny_data, "--out", tmp_path / "cg",
                         "--classifier-steps", "2", "--classifier-channels", "8,8,8", "--sampler", "heun")
    assert code == 0 and "done:" in out, err[-2000:]
    assert ((tmp_path / "cg" / "samples.png").stat().st_size > 0
            and (tmp_path / "cg" / "classifier" / "loss.csv").exists())


@pytest.mark.xdist_group("cfg_run")  # one worker trains the shared run once
def test_evaluate_reports_what_a_recomputation_gives(cfg_run, tiny_data, tmp_path, capsys):
    """The table's accuracy and FID against the same samples judged again here, independently."""
    from jaxdiff import metrics
    from jaxdiff.judge import Judge
    from jaxdiff.pipeline import Pipeline

    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", cfg_run[0], "--data-dir", tiny_data,
                            "--eval-classifier", tmp_path / "judge", "--out", out, "--num-samples", "20",
                            "--gammas", "0,3", "--samplers", "ddim:2,dpm++:2", "--steps", "2", "--batch-size", "8",
                            "--steps-per-dispatch", "2", "--warmup", "1", "--sample-batch", "10")
    assert code == 0, err[-3000:]
    rows = (out / "quality.csv").read_text().splitlines()
    assert rows[0] == "guidance,sampler,nfe,gamma,fid,accuracy,seconds" and len(rows) == 5
    assert "| guidance | sampler | NFE | gamma | FID | accuracy | seconds |" in stdout
    assert (out / "quality.png").stat().st_size > 0
    judge, pipe = Judge.load(tmp_path / "judge"), Pipeline.from_checkpoint(cfg_run[0])
    x_test, _ = data.load("mnist", "test", str(tiny_data))
    labels = np.arange(20) % 10
    imgs = np.concatenate([pipe(labels[i : i + 10], gamma=3.0, sampler="dpm++", steps=2, seed=i) for i in (0, 10)])
    _, sampler, nfe, gamma, fid, acc, _ = rows[-1].split(",")
    assert (sampler, nfe, gamma) == ("dpm++", "2", "3.0")
    feats = judge.features
    expected_fid = metrics.fid_from_features(feats(imgs), feats(x_test))
    assert float(fid) == pytest.approx(expected_fid, rel=1e-3, abs=1e-3)
    assert float(acc) == pytest.approx(np.mean(judge.logits(imgs).argmax(-1) == labels), abs=1e-4)
    floor = re.search(r"FID floor \(real train 20 vs test 32\) ([\d.]+)", err)
    x_train, _ = data.load("mnist", "train", str(tiny_data))
    picked = x_train[np.random.default_rng(0).choice(len(x_train), 20, replace=False)]
    assert floor and float(floor.group(1)) == pytest.approx(metrics.fid_from_features(feats(picked), feats(x_test)),
                                                             abs=1e-3), err[-1000:]
    # the main job reports the same judge's class accuracy of its samples
    code, stdout, err = run(capsys, "mnist_cfg", *flag(TINY, "--steps", "4"), "--data-dir", tiny_data, "--out",
                            tmp_path / "cfg2", "--per-label", "1", "--eval-classifier", tmp_path / "judge",
                            "--eval-samples", "10")
    assert code == 0 and re.search(r"class accuracy [01]\.\d{4} \(10 samples, gamma 3\)", stdout), stdout


def test_text_to_image_end_to_end(tiny_data, tmp_path, capsys):
    code, out, err = run(capsys, "mnist_text2img", "--data-dir", tiny_data, "--out", tmp_path, "--steps", "2",
                         "--ae-steps", "2", "--ae-channels", "8,8,8", "--clip-steps", "2", "--batch-size", "8",
                         "--steps-per-dispatch", "2",
                         "--save-every", "2", "--sample-steps", "2", "--per-prompt", "2", "--channels", "8,16",
                         "--warmup", "1", "--prompt", "a handwritten 3", "--prompt", "zebra", "--negative-prompt",
                         "the digit 8", "--eval-classifier", tmp_path / "judge", "--judge-steps", "2",
                         "--eval-gammas", "1,3", "--eval-per-class", "2", "--eval-images", "8")
    assert code == 0, err[-3000:]
    assert "zero-shot accuracy" in err and "reconstruction MSE" in err and "done:" in out
    for name in ["prompts.png", "classes.png", "autoencoder/loss.csv", "clip/loss.csv", "ldm/loss.csv"]:
        assert (tmp_path / name).stat().st_size > 0, name
    # one row per (gamma, template): 6 training and 2 held-out MNIST templates at 2 gammas
    rows = (tmp_path / "text2img_quality.csv").read_text().splitlines()
    assert rows[0] == "gamma,templates,template,accuracy" and len(rows) == 1 + 2 * 8
    assert "| 3 | held-out, mean |" in (tmp_path / "text2img_quality.md").read_text()

    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(tmp_path)
    a = pipe(["a handwritten 3", "zebra"], negative="the digit 8", steps=2, seed=1)
    assert a.shape == (2, 28, 28, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, pipe(["a handwritten 3", "zebra"], negative="the digit 8", steps=2, seed=1))
    assert pipe("seven", steps=2).shape == (1, 28, 28, 1)
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe([3])
    with pytest.raises(ValueError, match="pass the run's folder"):
        Pipeline.from_checkpoint(tmp_path / "ldm")


def test_autoencoder_end_to_end(tiny_data, tmp_path, capsys):
    flags = ["--data-dir", tiny_data, "--out", tmp_path, "--batch-size", "8", "--steps-per-dispatch", "2",
             "--warmup", "1", "--rows", "2"]
    code, out, err = run(capsys, "mnist_autoencoder", *flags, "--steps", "2", "--ae-channels", "8,8,8")
    assert code == 0, err[-3000:]
    assert "reconstruction MSE" in err and "done: autoencoder 2 steps" in out
    code, out, err = run(capsys, "mnist_autoencoder", *flags, "--steps", "4", "--ae-channels", "8,16,8", "--resume")
    assert code == 2 and "--ae-channels: checkpoint has [8, 8, 8], this run has [8, 16, 8]" in err, err[-3000:]
    from experiments.png import grid

    head = (tmp_path / "reconstructions.png").read_bytes()[:24]
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    expect = grid(np.zeros((4, 10, 28, 28, 1), np.uint8)).shape  # 2 pairs of rows of 10, shown at 2x
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and (height, width) == (2 * expect[0], 2 * expect[1])


def test_superres_end_to_end(tiny_data, tmp_path, capsys):
    code, out, err = run(capsys, "mnist_superres", "--data-dir", tiny_data, "--out", tmp_path, *TINY,
                         "--eval-images", "6", "--rows", "3")
    assert code == 0, err[-3000:]
    assert "PSNR vs real 28x28" in err and "done:" in out
    from jaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(tmp_path)
    low = np.random.default_rng(0).integers(0, 256, (3, 14, 14, 1), dtype=np.uint8)
    sample = pipe(low, steps=2, seed=0)
    assert sample.shape == (3, 28, 28, 1) and sample.dtype == np.uint8
    assert pipe(low, negative=low[:1], gamma=2.0, steps=2).shape == (3, 28, 28, 1)
    with pytest.raises(ValueError, match=r"shape \(N, 14, 14, 1\)"):
        pipe(np.zeros((1, 28, 28, 1), np.uint8))


def test_psnr_against_the_formula():
    from experiments.mnist_superres import psnr

    x = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1))
    np.testing.assert_allclose(psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-9)


def test_mixture_demo_prints_every_sampler_with_its_cost(tmp_path, capsys):
    code, out, err = run(capsys, "mixture_demo", "--out", tmp_path, "--samples", "400")
    assert code == 0, err[-2000:]
    for line in ["ddpm 1000", "ddim 50", "dpm++ 20", "heun 10", "euler_a 50"]:
        assert line in out, out
    assert re.search(r"heun 10\s+20\s", out)  # two evaluations per Heun step
    assert (tmp_path / "samplers.png").stat().st_size > 0 and (tmp_path / "cfg_gammas.png").stat().st_size > 0


def test_a_run_folder_has_one_owner(tmp_path):
    """A live owner's lock is refused, a dead one's (same host) taken over with a notice, released at exit."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from jaxdiff.runlock import NAME, RunLock, RunLocked

    notices = []
    with RunLock(tmp_path, notice=notices.append) as held:
        refused = rf"in use by another run \(pid {os.getpid()} on .*delete {tmp_path / NAME}"
        with pytest.raises(RunLocked, match=refused):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid() and held.held
    assert not (tmp_path / NAME).exists() and not notices
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    with RunLock(tmp_path, notice=notices.append):
        assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {dead.pid}" in notices[0] and "no longer running" in notices[0]
    (tmp_path / NAME).write_text(json.dumps({"pid": dead.pid, "host": "another-host", "since": "then"}))
    with pytest.raises(RunLocked, match="pid .* on another-host"):  # cannot be checked from here
        RunLock(tmp_path).acquire()
    (tmp_path / NAME).write_text("")
    with pytest.raises(RunLocked, match="lock file is unreadable"):
        RunLock(tmp_path).acquire()


def test_a_second_run_in_a_busy_folder_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    from jaxdiff.runlock import RunLock

    out = tmp_path / "o"
    out.mkdir()
    with RunLock(out):  # the first run, still going
        code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tiny_data, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{out} is in use by another run" in err, err


def test_flags_used_only_after_training_are_checked_before_it(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for bad, msg in [(["--sample-steps", "5000"], "--sample-steps 5000 is more than the schedule's 1000 timesteps"),
                     (["--eval-classifier", tmp_path / "file"], f"--eval-classifier {tmp_path / 'file'} is a file"),
                     (["--devices", "-1"], "--devices: must be 0 (all devices) or a positive count, got -1")]:
        code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tiny_data, "--out", tmp_path / "o", *bad)
        assert code == 2 and msg in err and "Traceback" not in err and "compiling" not in err, err[-2000:]
        assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_and_exit_130(tiny_data, tmp_path, capsys, monkeypatch):
    from experiments import common
    from jaxdiff import trainer

    def interrupted(*args, **kwargs):
        raise trainer.Interrupted("train", 37, 30, tmp_path / "o" / "checkpoints")

    monkeypatch.setattr(common.trainer, "fit", interrupted)
    code, _, err = run(capsys, "mnist_cfg", *TINY, "--data-dir", tiny_data, "--out", tmp_path / "o")
    assert code == 130 and len(err.strip().splitlines()) == 2, err  # the run's description, then this line
    assert err.strip().splitlines()[-1] == (f"train: interrupted after step 37; its newest checkpoint is step 30 in "
                                            f"{tmp_path / 'o' / 'checkpoints'}; run the same command with --resume "
                                            f"to continue")
    assert not (tmp_path / "o" / "jaxdiff.lock").exists()
