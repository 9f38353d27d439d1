"""Training: the state, the losses, one pure step, several steps per dispatch, data parallelism.

A step is ``step(state, batch) -> (state, metrics)`` with ``batch = (images_uint8, labels)``.
Its randomness (timesteps, noise, label dropout) is drawn per example from
``fold_in(fold_in(state.key, state.step), global_example_index)``, so the data-parallel step
on the same global batch draws exactly what the single-device step draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.data import to_float
from jaxdiff.schedules import Schedule, add_noise

DATA_AXIS = "data"


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data, so checkpoints hold a plain array
    skipped: jax.Array  # updates refused because the loss or a gradient was not finite


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Adam after global-norm clipping, with a linear warmup to a constant rate."""
    lr = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(lr))


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state. It holds copies of ``params``: the data-parallel step donates its state,
    which must not take the caller's arrays with it."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(jnp.copy, params),
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def _per_example_keys(key, n, offset):
    return jax.vmap(jax.random.fold_in, (None, 0))(key, offset + jnp.arange(n))


def _pixels_and_labels(x_uint8, y, keys):
    return to_float(x_uint8), y


def diffusion_loss(apply_fn, schedule: Schedule, *, p_uncond: float, null_label: int, prepare=None):
    """The textbook's eps-MSE, with each label dropped to the null label with probability p_uncond
    (per example, as the CFG paper does). Returns ``loss_fn(params, x_uint8, y, key, offset)``.

    ``prepare(x_uint8, y_after_dropout, keys) -> (x0, cond)`` says what is diffused and what
    conditions it; by default the pixels in [-1, 1] and the labels. Latent diffusion passes
    one that encodes images to latents and labels to caption tokens.
    """
    T = schedule.num_timesteps
    prepare = prepare or _pixels_and_labels

    def loss_fn(params, x_uint8, y, key, offset):
        keys = _per_example_keys(key, x_uint8.shape[0], offset)
        drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), p_uncond))(keys)
        x0, cond = prepare(x_uint8, jnp.where(drop, null_label, y), jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys))

        def draw(k):
            kt, kn = jax.random.split(k)
            return jax.random.randint(kt, (), 1, T + 1), jax.random.normal(kn, x0.shape[1:])

        t, noise = jax.vmap(draw)(keys)
        eps = apply_fn(params, add_noise(schedule, x0, t, noise), t, cond)
        return jnp.mean((eps.astype(jnp.float32) - noise) ** 2)

    return loss_fn


def classifier_loss(apply_fn, schedule: Schedule):
    """Cross-entropy of the noisy classifier on images noised to a uniform random t in 1..T."""
    T = schedule.num_timesteps

    def loss_fn(params, x_uint8, y, key, offset):
        x0 = to_float(x_uint8)

        def draw(k):
            kt, kn = jax.random.split(k)
            return jax.random.randint(kt, (), 1, T + 1), jax.random.normal(kn, x0.shape[1:])

        t, noise = jax.vmap(draw)(_per_example_keys(key, x0.shape[0], offset))
        logits = apply_fn(params, add_noise(schedule, x0, t, noise), t)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))

    return loss_fn


def clean_classifier_loss(apply_fn, augment_shift: int = 2):
    """Cross-entropy on clean images, each shifted by up to ``augment_shift`` pixels at random
    (wrapping), for the evaluation classifier."""

    def loss_fn(params, x_uint8, y, key, offset):
        x0 = to_float(x_uint8)

        def shift(k, img):
            dy, dx = jax.random.randint(k, (2,), -augment_shift, augment_shift + 1)
            return jnp.roll(img, (dy, dx), axis=(0, 1))

        x0 = jax.vmap(shift)(_per_example_keys(key, x0.shape[0], offset), x0)
        logits = apply_fn(params, x0)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))

    return loss_fn


def make_train_step(loss_fn, tx: optax.GradientTransformation, ema_decay: float, axis_name: str | None = None):
    """One pure optimisation step. With ``axis_name``, the per-device step of a data-parallel run:
    gradients and loss are averaged over that axis with ``lax.pmean``."""

    def step(state: TrainState, batch):
        x, y = batch
        offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * x.shape[0]
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y, key, offset)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
        new = state.replace(step=state.step + 1, params=params, ema_params=keep(ema, state.ema_params),
                            opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32))
        return new, {"loss": loss, "finite": finite}

    return step


def scan_steps(step):
    """Several steps per dispatch: ``(state, batches with a leading steps axis) -> (state, metrics)``."""
    return lambda state, batches: jax.lax.scan(step, state, batches)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over the local devices, whose one axis is the data axis."""
    devices = np.array(jax.local_devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,))


def data_parallel(loss_fn, tx, ema_decay: float, mesh: Mesh):
    """The pmap-style data-parallel multi-step, as shard_map over a 1-D mesh, under jit.

    Takes ``(state, batches)`` with batches shaped (steps, global_batch, ...), the global batch
    split over the devices; the state is replicated. Returns ``(state, metrics)``.
    """
    step = make_train_step(loss_fn, tx, ema_decay, axis_name=DATA_AXIS)
    sharded = jax.shard_map(
        scan_steps(step), mesh=mesh, in_specs=(P(), P(None, DATA_AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)


def shard_batches(batches, mesh: Mesh):
    """Put host batches (steps, global_batch, ...) on the devices, split along the batch axis."""
    n = mesh.devices.size
    if batches[0].shape[1] % n:
        raise ValueError(f"global batch {batches[0].shape[1]} is not divisible by the {n} devices")
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batches)


def replicate(state, mesh: Mesh):
    return jax.device_put(state, NamedSharding(mesh, P()))
