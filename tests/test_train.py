"""Training step, data parallelism on simulated CPU devices (every loss), EMA, checkpoints: exact
resume and a kill mid-save."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fast_xla import FAST_XLA

from jaxdiff import schedules, train
from jaxdiff.checkpoint import Checkpoints, ConfigMismatch
from jaxdiff.nets.unet import textbook_unet
from jaxdiff.specs import _init_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = textbook_unet(num_classes=10, channels=(8, 16), cond_dim=32)
SCHED = schedules.linear(100)


def setup(seed=0, tx=None):
    x = jnp.zeros((1, 8, 8, 1))
    # one program, at -O0 (as Spec.init): op by op, XLA:CPU compiles each of the init's ~150 operations alone
    params = _init_once(lambda key: MODEL.init(key, x, jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32)),
                        jax.random.key(seed))
    tx = tx or train.make_optimizer(train.OptimConfig(learning_rate=1e-3, warmup_steps=2))
    loss_fn = train.diffusion_loss(MODEL.apply, SCHED, p_uncond=0.1, null_label=10)
    return train.init_state(params, tx, seed), tx, loss_fn


def batches(n_steps, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_steps, batch, 8, 8, 1), dtype=np.uint8),
            rng.integers(0, 10, (n_steps, batch)).astype(np.int32))


def tree_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_loss_falls_and_updates_apply():
    state, tx, loss_fn = setup()
    step = train.host_steps(jax.jit(train.make_train_step(loss_fn, tx, 0.9)))  # XLA:CPU: no scan
    xs, ys = batches(1)
    fixed = (np.repeat(xs, 30, 0), np.repeat(ys, 30, 0))  # one batch over and over: the loss must fall
    new, metrics = step(state, fixed)
    assert int(new.step) == 30 and int(new.skipped) == 0
    # the loss before and after on the same 16 draws of timestep, noise and dropout (each step's own loss
    # moves with its random timesteps more than 30 steps lower it; common draws compare like with like)
    keys = jax.random.split(jax.random.key(1), 16)
    mean_loss = jax.jit(lambda p: jax.vmap(lambda k: loss_fn(p, xs[0], ys[0], k, train.Shard()))(keys).mean())
    assert float(mean_loss(new.params)) < 0.7 * float(mean_loss(state.params))
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
    loss_fn(None, jnp.zeros((4000, 2, 2, 1), jnp.uint8), jnp.zeros((4000,), jnp.int32), jax.random.PRNGKey(0),
            train.Shard())
    frac = float(jnp.mean(seen[0] == 10))
    assert abs(frac - 0.25) < 0.03  # per example, not all-or-nothing


def test_ema_warms_up_so_a_short_run_is_not_stuck_at_the_initialisation():
    """With decay min(0.999, (1 + n) / (10 + n)), the EMA after n steps is a weighted mean of the
    recent parameters, not 0.999^n of the way from the start: on a stream of constant targets it
    equals the closed form of that recursion, and after 300 steps it has moved almost all the way."""
    decays = np.array([float(train.ema_decay_at(n, 0.999)) for n in range(300)])
    np.testing.assert_allclose(decays[:3], [0.1, 2 / 11, 3 / 12], rtol=1e-6)
    assert decays[-1] < 0.999 and float(train.ema_decay_at(10_000, 0.999)) == pytest.approx(0.999)
    # the EMA of params that jump from 0 to 1 at step 0 and stay there: 1 - prod(decays)
    kept = float(np.prod(decays))
    assert kept < 0.04  # a plain 0.999 from step one would keep 0.999**300 = 0.74 of the start
    state, _, loss_fn = setup(tx=optax.sgd(0.0))
    target = jax.tree.map(jnp.ones_like, state.params)
    state = state.replace(params=target, ema_params=jax.tree.map(jnp.zeros_like, target))
    step = train.host_steps(jax.jit(train.make_train_step(loss_fn, optax.sgd(0.0), 0.999)))  # XLA:CPU: no scan
    new, _ = step(state, batches(300))
    np.testing.assert_allclose(jax.tree.leaves(new.ema_params)[0], 1 - kept, rtol=1e-4)


def test_data_parallel_on_4_cpu_devices_equals_single_device():
    """Every loss, on 4 simulated devices, computes what one device computes on the same global batch:
    the diffusion loss (per-example noise from the global index), the autoencoder's loss (per-example
    latent noise) and the contrastive loss (negatives gathered from every device). Plain SGD, so the
    updates are the gradients themselves (Adam would hide a gradient scaled by the device count).
    In a subprocess: the device count must be set before JAX starts."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        jax.config.update("jax_num_cpu_devices", 4)
        import sys; sys.path.insert(0, "tests")
        from test_train import setup, batches, tree_close
        from jaxdiff import specs, train
        assert jax.device_count() == 4, jax.devices()
        mesh = train.make_mesh()

        def check(loss_fn, params, data, name, adam=False):
            for tx in [optax.sgd(1e-4)] + [train.make_optimizer(train.OptimConfig(warmup_steps=1))] * adam:
                state = train.init_state(params, tx, 0)
                single, m1 = jax.jit(train.scan_steps(train.make_train_step(loss_fn, tx, 0.9)))(state, data)
                par, m4 = train.data_parallel(loss_fn, tx, 0.9, mesh)(train.replicate(state, mesh),
                                                                     train.shard_batches(data, mesh))
                np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=2e-5, err_msg=name)
                for a, b, p0 in zip(*(jax.tree.leaves(t) for t in (single.params, par.params, params))):
                    d1, d4 = np.asarray(a) - np.asarray(p0), np.asarray(b) - np.asarray(p0)  # the updates
                    np.testing.assert_allclose(d4, d1, rtol=1e-3, atol=1e-3 * np.abs(d1).max() + 1e-9, err_msg=name)
                tree_close(single.ema_params, par.ema_params, rtol=2e-4, atol=2e-6)
                assert int(par.step) == data[0].shape[0]

        state, tx, loss_fn = setup()
        check(loss_fn, state.params, batches(3, batch=8), "diffusion", adam=True)
        ae = specs.Autoencoder(channels=(8, 8, 8), image_shape=(28, 28, 1))
        rng = np.random.default_rng(0)
        images = (rng.integers(0, 256, (2, 8, 28, 28, 1), dtype=np.uint8), np.zeros((2, 8), np.int32))
        check(train.vae_loss(ae.module()), ae.init(0), images, "autoencoder")
        clip = specs.ContrastiveText(vocab=("a", "b", "c"), max_len=4, width=16)
        text, image = clip.module()
        ids = np.array([[[2, 4, 3, 0]], [[2, 5, 3, 0]], [[2, 6, 3, 0]], [[2, 3, 0, 0]]], np.int32)  # 3 labels + null
        labelled = (images[0], rng.integers(0, 3, (2, 8)).astype(np.int32))
        check(train.contrastive_loss(text, image, ids, ids != 0), clip.init(0), labelled, "contrastive")
        print("OK")
        """
    )
    # the child's 1- and 4-device runs are compared with each other: like with like
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": FAST_XLA})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_contrastive_loss_sees_the_whole_batch_not_only_local_negatives():
    """The gather matters: the loss of 8 examples split in 2 halves, each half alone, differs from the
    loss over all 8 (so a data-parallel run without the gather trains another objective)."""
    rng = np.random.default_rng(1)
    img, txt = jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.normal(size=(8, 5)))
    whole = float(train.clip_loss(img, txt, 1.0))
    halves = 0.5 * (float(train.clip_loss(img[:4], txt[:4], 1.0)) + float(train.clip_loss(img[4:], txt[4:], 1.0)))
    assert abs(whole - halves) > 0.1


CONFIG = {"model": "unet", "channels": [8, 16], "schedule": "linear", "num_timesteps": 100, "dataset": "toy"}


def test_resume_is_exact(tmp_path):
    state0, tx, loss_fn = setup()
    step = jax.jit(train.scan_steps(train.make_train_step(loss_fn, tx, 0.9)))  # one compile: 3 steps a call
    xs, ys = batches(6)
    first, second = (xs[:3], ys[:3]), (xs[3:], ys[3:])
    half = step(state0, first)[0]
    straight = step(half, second)[0]
    ckpt = Checkpoints(str(tmp_path / "ck"), create=True)
    ckpt.save(3, half, CONFIG)
    ckpt.wait()
    ckpt.close()
    # a fresh process would build a fresh template; here a fresh state with another seed stands in
    template, _, _ = setup(seed=1)
    restored = Checkpoints(str(tmp_path / "ck")).restore(template, CONFIG)
    assert int(restored.step) == 3
    resumed = step(restored, second)[0]
    tree_close(straight.params, resumed.params, rtol=0, atol=0)
    tree_close(straight.opt_state, resumed.opt_state, rtol=0, atol=0)
    tree_close(straight.ema_params, resumed.ema_params, rtol=0, atol=0)


def test_mismatched_configuration_names_the_setting(tmp_path):
    state, _, _ = setup()
    ckpt = Checkpoints(str(tmp_path / "ck"), create=True)
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
        ckpt = Checkpoints({str(tmp_path / "ck")!r}, create=True)
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
