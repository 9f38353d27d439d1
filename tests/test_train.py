"""Training step, data parallelism on simulated CPU devices, checkpoints: exact resume and a kill mid-save."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules, train
from jaxdiff.checkpoint import Checkpoints, ConfigMismatch
from jaxdiff.nets.unet import textbook_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = textbook_unet(num_classes=10, channels=(8, 16), cond_dim=32)
SCHED = schedules.linear(100)


def setup(seed=0):
    x = jnp.zeros((1, 8, 8, 1))
    params = MODEL.init(jax.random.key(seed), x, jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    tx = train.make_optimizer(train.OptimConfig(learning_rate=1e-3, warmup_steps=2))
    loss_fn = train.diffusion_loss(MODEL.apply, SCHED, p_uncond=0.1, null_label=10)
    return train.init_state(params, tx, seed), tx, loss_fn


def batches(n_steps, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_steps, batch, 8, 8, 1), dtype=np.uint8),
            rng.integers(0, 10, (n_steps, batch)).astype(np.int32))


def tree_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_loss_falls_and_updates_apply():
    state, tx, loss_fn = setup()
    step = jax.jit(train.scan_steps(train.make_train_step(loss_fn, tx, 0.9)))
    xs, ys = batches(1)
    fixed = (np.repeat(xs, 30, 0), np.repeat(ys, 30, 0))  # one batch over and over: the loss must fall
    new, metrics = step(state, fixed)
    assert int(new.step) == 30 and int(new.skipped) == 0
    assert float(metrics["loss"][-5:].mean()) < 0.7 * float(metrics["loss"][:5].mean())
    assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])


def test_non_finite_loss_skips_the_update():
    state, tx, loss_fn = setup()
    poisoned = lambda p, x, y, k, o: loss_fn(p, x, y, k, o) * jnp.nan
    new, metrics = jax.jit(train.make_train_step(poisoned, tx, 0.9))(state, tuple(a[0] for a in batches(1)))
    assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
    tree_close(new.params, state.params, rtol=0, atol=0)
    tree_close(new.opt_state, state.opt_state, rtol=0, atol=0)


def test_label_dropout_is_per_example_at_the_asked_rate():
    seen = []

    def spy(params, x, t, y):
        seen.append(y)
        return jnp.zeros_like(x)

    loss_fn = train.diffusion_loss(spy, SCHED, p_uncond=0.25, null_label=10)
    loss_fn(None, jnp.zeros((4000, 2, 2, 1), jnp.uint8), jnp.zeros((4000,), jnp.int32), jax.random.PRNGKey(0), 0)
    frac = float(jnp.mean(seen[0] == 10))
    assert abs(frac - 0.25) < 0.03  # per example, not all-or-nothing


def test_data_parallel_on_4_cpu_devices_equals_single_device():
    """Run in a subprocess: the device count must be set before JAX starts."""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 4)
        import sys; sys.path.insert(0, "tests")
        from test_train import setup, batches, tree_close
        from jaxdiff import train
        assert jax.device_count() == 4, jax.devices()
        state, tx, loss_fn = setup()
        xs, ys = batches(3, batch=8)
        single, m1 = jax.jit(train.scan_steps(train.make_train_step(loss_fn, tx, 0.9)))(state, (xs, ys))
        mesh = train.make_mesh()
        multi = train.data_parallel(loss_fn, tx, 0.9, mesh)
        par, m4 = multi(train.replicate(state, mesh), train.shard_batches((xs, ys), mesh))
        np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=2e-5)
        tree_close(single.params, par.params, rtol=2e-4, atol=2e-6)
        tree_close(single.ema_params, par.ema_params, rtol=2e-4, atol=2e-6)
        assert int(par.step) == 3
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


CONFIG = {"model": "unet", "channels": [8, 16], "schedule": "linear", "num_timesteps": 100, "dataset": "toy"}


def run_steps(state, tx, loss_fn, start, count, data):
    step = jax.jit(train.scan_steps(train.make_train_step(loss_fn, tx, 0.9)))
    xs, ys = data
    return step(state, (xs[start : start + count], ys[start : start + count]))[0]


def test_resume_is_exact(tmp_path):
    state0, tx, loss_fn = setup()
    data = batches(6)
    straight = run_steps(state0, tx, loss_fn, 0, 6, data)
    ckpt = Checkpoints(str(tmp_path / "ck"))
    half = run_steps(state0, tx, loss_fn, 0, 3, data)
    ckpt.save(3, half, CONFIG)
    ckpt.wait()
    ckpt.close()
    # a fresh process would build a fresh template; here a fresh state with another seed stands in
    template, _, _ = setup(seed=1)
    restored = Checkpoints(str(tmp_path / "ck")).restore(template, CONFIG)
    assert int(restored.step) == 3
    resumed = run_steps(restored, tx, loss_fn, 3, 3, data)
    tree_close(straight.params, resumed.params, rtol=0, atol=0)
    tree_close(straight.opt_state, resumed.opt_state, rtol=0, atol=0)
    tree_close(straight.ema_params, resumed.ema_params, rtol=0, atol=0)


def test_mismatched_configuration_names_the_setting(tmp_path):
    state, _, _ = setup()
    ckpt = Checkpoints(str(tmp_path / "ck"))
    ckpt.save(1, state, CONFIG)
    ckpt.wait()
    with pytest.raises(ConfigMismatch, match="num_timesteps: checkpoint has 100, this run has 1000"):
        ckpt.restore(state, {**CONFIG, "num_timesteps": 1000})


def test_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """A child saves step 1, then is SIGKILLed inside the save of step 2, just before orbax's commit."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, "tests")
        from test_train import setup, CONFIG
        from jaxdiff.checkpoint import Checkpoints
        from orbax.checkpoint._src.path import async_path
        state, _, _ = setup()
        ckpt = Checkpoints({str(tmp_path / "ck")!r})
        ckpt.save(1, state, CONFIG); ckpt.wait()
        async def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        async_path.rename = die
        ckpt.save(2, state.replace(step=state.step + 1), CONFIG); ckpt.wait()
        print("not killed")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert out.returncode == -9, (out.returncode, out.stdout, out.stderr[-2000:])
    assert any("2" in name for name in os.listdir(tmp_path / "ck")), "the killed save left nothing behind"
    state, _, _ = setup(seed=1)
    ckpt = Checkpoints(str(tmp_path / "ck"))
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(state, CONFIG)
    expected, _, _ = setup(seed=0)
    tree_close(restored.params, expected.params, rtol=0, atol=0)
