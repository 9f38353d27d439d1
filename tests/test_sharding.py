"""Sharded training (jaxdiff.sharding): the mesh setting, the rule that places each leaf, and, on 8
simulated CPU devices in a child process, runs with the state split 8 ways (1 x 8) and 2 x 4 that equal
a one-device run, hold 1/fsdp of the state per device, and resume exactly."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from fast_xla import FAST_XLA
from jax.sharding import PartitionSpec as P

from jaxdiff import data, sharding, specs, train, trainer
from jaxdiff.checkpoint import Checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("setting, devices, shape", [("data=2,fsdp=4", 8, (2, 4)), ("fsdp=-1", 8, (1, 8)),
                                                     ("data=auto,fsdp=2", 8, (4, 2)), ("fsdp=4", 16, (4, 4)),
                                                     ("data=auto", 8, (8, 1)),
                                                     ("data=3", 3, (3, 1)), (" data = 1 , fsdp = 1 ", 1, (1, 1))])
def test_the_mesh_setting(setting, devices, shape):
    assert sharding.mesh_shape(setting, devices) == shape


@pytest.mark.parametrize("setting, devices, msg", [
    ("data=2,fsdp=3", 8, r"mesh 'data=2,fsdp=3' has 6 devices \(data x fsdp\), but the run has 8"),
    ("fsdp=3", 8, "8 devices cannot be split into groups of 3"),
    ("data=-1,fsdp=auto", 8, "at most one axis may be auto"),
    ("data=2,model=4", 8, "unknown axis 'model'"), ("data=2,data=4", 8, "axis 'data' given twice"),
    ("data=0,fsdp=8", 8, "data=0 .* a count is a positive integer"), ("data:2", 8, "'data:2' is not axis=count"),
    ("", 8, "mesh must be a setting like 'data=2,fsdp=4'")])
def test_a_bad_mesh_setting_is_one_clear_value_error(setting, devices, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.mesh_shape(setting, devices)


def test_each_leaf_is_split_along_its_largest_divisible_dimension_or_kept_whole():
    rule = lambda shape, fsdp=4: sharding.leaf_spec(shape, fsdp, min_size=64)
    assert rule((3, 3, 32, 64)) == P(None, None, None, "fsdp")
    assert rule((64, 32)) == P("fsdp")
    assert rule((3, 3, 64, 6)) == P(None, None, "fsdp")  # 6 is not divisible by 4: the next largest
    assert rule((48, 48)) == P(None, "fsdp")  # equals: the last
    assert rule((9, 9, 3)) == P()  # nothing divisible
    assert rule((32,)) == P() and rule(()) == P()  # under min_size; a scalar
    assert rule((3, 3, 32, 64), fsdp=1) == P()


def test_a_mesh_that_does_not_fit_the_devices_is_refused_by_fit():
    from test_trainer import SPEC, config, loss_fn, squares


    x, y = squares()
    with pytest.raises(ValueError, match=r"mesh 'data=2,fsdp=4' has 8 devices .* but the run has 1"):
        trainer.fit(SPEC, loss_fn(), data.Batches(x, y, 8, 0), config(), progress=False, mesh="data=2,fsdp=4")


CHILD = textwrap.dedent(
    """
    import shutil, sys, tempfile
    from pathlib import Path
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_trainer import squares
    from jaxdiff import data, sharding, specs, train, trainer

    assert jax.device_count() == 8, jax.devices()
    tmp = Path(tempfile.mkdtemp())
    # the two 2 x 4 runs below compile the same step: the second reads it from this cache
    jax.config.update("jax_compilation_cache_dir", str(tmp / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # one level with self-attention, 64 channels: cheap to compile, and the leaves kept whole (under
    # sharding.MIN_SIZE elements) are under 2% of the state
    spec = specs.LabelUNet(num_classes=2, channels=(64,), attention_levels=(0,), cond_dim=64, image_shape=(8, 8, 1))
    loss = train.diffusion_loss(spec.eps_model(spec.module()), spec.build_schedule(), p_uncond=0.1, null_label=2)
    x, y = squares(64)
    cfg = trainer.TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1, save_every=2,
                              steps_per_dispatch=2)
    p0 = jax.jit(lambda: spec.init(0))()  # compiled once, not op by op

    def run(name, mesh, devices=None, resume=False, params=p0):
        out = tmp / name
        return trainer.fit(spec, loss, data.Batches(x, y, 8, 0), cfg, directory=out / "ck", loss_log=out / "loss.csv",
                           progress=False, mesh=mesh, devices=devices, resume=resume, params=params).state

    def losses(name):
        return np.loadtxt(tmp / name / "loss.csv", delimiter=",", skiprows=1)

    def close(a, b, p0, what):
        # the Adam updates (trained - initial) agree to a small fraction of each leaf's largest update.
        # Left out: the key projection's bias. Softmax ignores it (it adds q.b to a whole row of logits),
        # so its gradient is rounding noise (~1e-9) that Adam, with eps 1e-8, turns into steps of either sign.
        for (path, u), v, w in zip(*(jax.tree_util.tree_leaves_with_path(a), *map(jax.tree.leaves, (b, p0)))):
            if "to_k" in jax.tree_util.keystr(path) and u.ndim == 1:
                continue
            du, dv = np.asarray(u) - np.asarray(w), np.asarray(v) - np.asarray(w)
            np.testing.assert_allclose(du, dv, rtol=1e-3, atol=1e-3 * np.abs(du).max(), err_msg=f"{what} {path}")

    one = run("one", None, devices=jax.devices()[:1])  # the default, replicated path on one device
    # the 1 x 8 run creates its parameters itself, already split (sharding.init_state under jit)
    for name, mesh, fsdp, params in [("1x8", "data=1,fsdp=8", 8, None), ("2x4", "data=2,fsdp=4", 4, p0)]:
        state = run(name, mesh, params=params)
        assert state.params["params"]["conv_in"]["kernel"].sharding.mesh.shape == {"data": 8 // fsdp, "fsdp": fsdp}
        np.testing.assert_array_equal(losses(name)[:, 0], [1, 2, 3, 4])
        np.testing.assert_allclose(losses(name), losses("one"), rtol=0, atol=3e-6, err_msg=name)
        close(one.params, state.params, p0, name)
        close(one.ema_params, state.ema_params, p0, name)
        # per device: 1/fsdp of every leaf of at least MIN_SIZE elements, the small ones whole
        for part in ("params", "opt_state", "ema_params"):
            tree = getattr(state, part)
            leaves = [a for a in jax.tree.leaves(tree) if a.ndim]
            total = sum(a.nbytes for a in leaves)
            small = sum(a.nbytes for a in leaves if a.size < sharding.MIN_SIZE)
            assert small < 0.025 * total, (part, small, total)
            held = sharding.bytes_per_device([a for a in jax.tree.leaves(tree)])
            scalars = sum(a.nbytes for a in jax.tree.leaves(tree) if not a.ndim)
            assert len(held) == 8 and set(held.values()) == {(total - small) // fsdp + small + scalars}, (part, held)
        print(name, "params per device", held)
    # a resume of a sharded run equals the uninterrupted one, bit for bit (stopped after step 2) ...
    shutil.copytree(tmp / "2x4", tmp / "resumed")
    shutil.rmtree(tmp / "resumed" / "ck" / "4")
    resumed = run("resumed", "data=2,fsdp=4", resume=True)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):  # state: the 2 x 4 run's
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp / "resumed" / "loss.csv").read_text() == (tmp / "2x4" / "loss.csv").read_text()
    # ... and a checkpoint of the 1 x 8 run resumes on the 2 x 4 mesh, read into that layout
    shutil.copytree(tmp / "1x8", tmp / "moved")
    shutil.rmtree(tmp / "moved" / "ck" / "4")
    moved = run("moved", "data=2,fsdp=4", resume=True)
    np.testing.assert_allclose(losses("moved"), losses("one"), rtol=0, atol=3e-6)
    close(one.params, moved.params, p0, "1x8 resumed on 2x4")
    # frozen parameters (a LoRA's base) enter the sharded step as a third argument, split like the state
    base = {"w0": np.linspace(-1, 1, 4096, dtype=np.float32)}
    over = lambda fr: lambda p, xb, yb, key, shard: ((fr["w0"] + p["d"] - xb.mean() / 255.0) ** 2).mean()
    frun = lambda mesh, devices=None: np.asarray(trainer.fit(
        None, over, data.Batches(x, y, 8, 0), cfg, params={"d": np.zeros(4096, np.float32)}, frozen=base,
        mesh=mesh, devices=devices, progress=False).state.params["d"])
    np.testing.assert_allclose(frun("data=2,fsdp=4"), frun(None, jax.devices()[:1]), rtol=1e-5, atol=1e-7)
    print("OK")
    """
)


def test_sharded_runs_on_8_devices_equal_one_device_hold_a_share_of_the_state_and_resume_exactly():
    """The child runs the trainer 5 times, 4 steps each: one device (the default, replicated path), 1 x 8,
    2 x 4, a 2 x 4 resume from the 2 x 4 run's step 2, and a 2 x 4 resume from the 1 x 8 run's step 2; then
    a loss over frozen parameters on 2 x 4 and on one device. Its XLA compiles with FAST_XLA (a fraction of the
    compile time); every run it compares uses the same flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_XLA}")
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


# the two-process test's model and run; one level, no attention: the cheapest U-Net to compile
TWO_SPEC = specs.LabelUNet(num_classes=2, channels=(64,), cond_dim=64, image_shape=(8, 8, 1))
TWO_CONFIG = trainer.TrainConfig(steps=2, batch_size=8, warmup_steps=1, save_every=2, steps_per_dispatch=2)


def two_run(batches_class, **kw):
    """``trainer.fit`` of the two-process test, its batches from ``batches_class`` (distributed.Batches in
    the processes); parameters from a jitted init (compiled once, not op by op)."""
    from test_trainer import squares

    loss = train.diffusion_loss(TWO_SPEC.eps_model(TWO_SPEC.module()), TWO_SPEC.build_schedule(), p_uncond=0.1,
                                null_label=2)
    x, y = squares(64)
    params = jax.jit(lambda: TWO_SPEC.init(0))()
    return params, trainer.fit(TWO_SPEC, loss, batches_class(x, y, 8, 0), TWO_CONFIG, progress=False,
                               params=params, **kw)


PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import jax
    from jaxdiff import distributed
    out, coordinator, processes, index = sys.argv[1:]
    distributed.initialize(coordinator, int(processes), int(index))
    sys.path.insert(0, "tests")
    from test_sharding import two_run
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    state = two_run(distributed.Batches, directory=Path(out) / "ck", loss_log=Path(out) / "loss.csv",
                    mesh="fsdp=4")[1].state
    kernel = state.opt_state[1][0].mu["params"]["down_blocks_0"]["resnets_0"]["Conv_0"]["kernel"]  # (3, 3, 64, 64)
    assert [s.data.shape for s in kernel.addressable_shards] == [(3, 3, 64, 16)] * 2, kernel.sharding
    print("OK")
    """
)


def test_two_processes_with_the_fsdp_axis_across_them_train_as_one_device(tmp_path):
    """The weights split 4 ways over 2 processes of 2 simulated devices each (the fsdp axis spans both, its
    collectives go through gloo), each process gathering only its rows of the batch and writing its part
    of the checkpoint, against this process on one device (the default path): the same losses and EMA."""
    from test_distributed import _wait, environment, free_port

    port, logs = free_port(), [(tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)]
    procs = []
    for i, (o, e) in enumerate(logs):
        with open(o, "w") as out, open(e, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", PROCESS, str(tmp_path / "two"), f"127.0.0.1:{port}",
                                           "2", str(i)], cwd=ROOT, env=environment(2), stdout=out, stderr=err))
    timed_out = _wait(procs)
    report = "\n".join(f"--- process {i}: exit {p.returncode}\n{e.read_text()[-3000:]}"
                       for i, (p, (_, e)) in enumerate(zip(procs, logs, strict=True)))
    assert not timed_out and [p.returncode for p in procs] == [0, 0], report
    p0, one = two_run(data.Batches, loss_log=tmp_path / "one.csv", devices=jax.devices()[:1])
    rows = lambda path: np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(rows(tmp_path / "two" / "loss.csv")[:, 0], [1, 2])
    np.testing.assert_allclose(rows(tmp_path / "two" / "loss.csv"), rows(tmp_path / "one.csv"), rtol=0, atol=3e-6)
    two = Checkpoints(tmp_path / "two" / "ck").restore_ema(TWO_SPEC.template())
    # the EMA's moves from the initial parameters agree to 1e-3 of each leaf's largest (a float32 difference
    # of O(1) values resolves ~1e-7, ~1e-4 of a move after 2 steps)
    for a, b, w in zip(*map(jax.tree.leaves, (two, one.state.ema_params, p0)), strict=True):
        da, db = np.asarray(a) - np.asarray(w), np.asarray(b) - np.asarray(w)
        np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3 * np.abs(db).max())
