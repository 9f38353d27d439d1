"""Damaged checkpoints: one line naming the step and the file, a fallback to the newest intact step,
an error for a damaged step asked for by number; reading never creates folders."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxdiff import data, specs, train, trainer
from jaxdiff.checkpoint import CheckpointError, Checkpoints
from jaxdiff.pipeline import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=16, image_shape=(8, 8, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, copied fresh for each test to damage."""
    folder = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 16).astype(np.int32)
    loss = train.diffusion_loss(SPEC.eps_model(SPEC.module()), SPEC.build_schedule(), p_uncond=0.1, null_label=2)
    cfg = trainer.TrainConfig(steps=4, batch_size=8, save_every=2, steps_per_dispatch=2, warmup_steps=1)
    result = trainer.fit(SPEC, loss, data.Batches(x, y, 8, 0), cfg, directory=folder / "checkpoints", progress=False)
    return folder, jax.device_get(result.state)


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 1))


def data_files(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
            if os.sep + "d" + os.sep in os.path.join(d, f)]


DAMAGES = {  # what is damaged in the latest step, and which item that breaks
    "state data truncated": (lambda step: [truncate(f) for f in data_files(step / "state")], "state"),
    "ema data truncated": (lambda step: [truncate(f) for f in data_files(step / "ema")], "ema"),
    "ocdbt.process_0 deleted": (lambda step: [shutil.rmtree(p) for p in step.glob("*/ocdbt.process_0")], "ema"),
    "manifest truncated": (lambda step: [truncate(p) for p in step.glob("*/manifest.ocdbt")], "ema"),
    "config item deleted": (lambda step: shutil.rmtree(step / "config"), "config"),
    "ema item deleted": (lambda step: shutil.rmtree(step / "ema"), "ema"),
}


def template_state():
    return jax.device_get(train.init_state(SPEC.init(0), trainer.TrainConfig(4, 8).optimizer(), 0))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_step_falls_back_to_the_intact_one(run, damage, capsys):
    damage_fn, item = DAMAGES[damage]
    damage_fn(run / "checkpoints" / "4")
    with Checkpoints(run / "checkpoints") as ckpt:
        step2_ema = ckpt.restore_ema(SPEC.template(), step=2)
        if item == "state":  # what a resume reads
            assert int(ckpt.restore(template_state()).step) == 2
        else:  # what a pipeline reads
            pipe = Pipeline.from_checkpoint(run)
            for a, b in zip(jax.tree.leaves(pipe.params["unet"]), jax.tree.leaves(step2_ema), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        err = capsys.readouterr().err
        assert "checkpoint step 4" in err and "falling back to step 2" in err, err
        with pytest.raises(CheckpointError, match="step 4"):  # asked for by number: an error
            {"state": lambda: ckpt.restore(template_state(), step=4), "config": lambda: ckpt.config(step=4),
             "ema": lambda: ckpt.restore_ema(SPEC.template(), step=4)}[item]()


def test_the_error_is_one_line_naming_the_step_and_the_file(run):
    for f in data_files(run / "checkpoints" / "4" / "ema"):
        truncate(f)
    with Checkpoints(run / "checkpoints") as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore_ema(SPEC.template(), step=4)
    msg = str(err.value)
    assert ("\n" not in msg and "checkpoint step 4 is damaged or unreadable" in msg and "step=" in msg
            and len(msg) < 400), msg


def test_all_steps_damaged(run):
    for step in ("2", "4"):
        shutil.rmtree(run / "checkpoints" / step / "config")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*steps \[2, 4\] are all damaged"):
        Pipeline.from_checkpoint(run)


def test_reading_never_creates_folders(tmp_path):
    missing = tmp_path / "mistyped"
    with pytest.raises(CheckpointError, match="no such run folder"):
        Pipeline.from_checkpoint(missing)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        Checkpoints(missing)
    assert not missing.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        Checkpoints(tmp_path / "file")


def test_a_damaged_checkpoint_leaves_no_stray_tracebacks(run):
    """In a fresh process: the fallback's warning and nothing else on stderr (every checkpoint
    manager closed, none of orbax's background threads left to complain at exit)."""
    DAMAGES["state data truncated"][0](run / "checkpoints" / "4")
    DAMAGES["ema data truncated"][0](run / "checkpoints" / "4")
    code = textwrap.dedent(f"""
        from jaxdiff.pipeline import Pipeline
        pipe = Pipeline.from_checkpoint({str(run)!r})
        print(pipe([0, 1], steps=2).shape)
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "falling back to step 2" in lines[0], out.stderr[-3000:]
    assert "(2, 8, 8, 1)" in out.stdout
