"""Training: the state, the losses, one pure step, several steps per dispatch, data parallelism.

A step is ``step(state, batch) -> (state, metrics)`` with ``batch = (images_uint8, labels)``.
A loss is ``loss_fn(params, x_uint8, y, key, shard) -> scalar``: ``shard`` says where this
device's rows sit in the global batch. Randomness (timesteps, noise, label dropout) is drawn
per example from ``fold_in(fold_in(state.key, state.step), global_example_index)``
(``shard.keys``), and a loss over the whole batch (contrastive) sees every device's rows
(``shard.gather``), so the data-parallel step on a global batch computes what the
single-device step computes on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    weight_decay: float = 0.0
    grad_accum: int = 1


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Adam after global-norm clipping, with a linear warmup to a constant rate; AdamW (decoupled weight decay,
    as diffusers' training scripts use) when ``weight_decay`` > 0. With ``grad_accum`` = k > 1 the gradients of
    k consecutive steps are averaged and applied once (optax.MultiSteps): the parameters change every k-th
    step, clipping applies to the average, and the warmup counts applied updates."""
    lr = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    adam = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(lr)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


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


class Shard:
    """This device's place in the global batch: rows ``offset .. offset + n`` of it, and the mesh
    axis the batch is split over (None on one device)."""

    def __init__(self, offset=0, axis_name: str | None = None):
        self.offset, self.axis_name = offset, axis_name

    def keys(self, key, n: int):
        """One key per local example, folded from its global index."""
        return jax.vmap(jax.random.fold_in, (None, 0))(key, self.offset + jnp.arange(n))

    def gather(self, x):
        """The rows of every device, in global order (x itself on one device)."""
        return x if self.axis_name is None else jax.lax.all_gather(x, self.axis_name, tiled=True)



def _pixels_and_labels(x_uint8, y, keys):
    return to_float(x_uint8), y


def diffusion_loss(apply_fn, schedule: Schedule, *, p_uncond: float, null_label: int, prepare=None):
    """The textbook's eps-MSE, with each label dropped to the null label with probability p_uncond
    (per example, as the CFG paper does). Returns ``loss_fn(params, x_uint8, y, key, shard)``.

    ``prepare(x_uint8, y_after_dropout, keys) -> (x0, cond)`` says what is diffused and what
    conditions it; by default the pixels in [-1, 1] and the labels. Latent diffusion passes
    one that encodes images to latents and labels to caption tokens.
    """
    T = schedule.num_timesteps
    prepare = prepare or _pixels_and_labels

    def loss_fn(params, x_uint8, y, key, shard):
        keys = shard.keys(key, x_uint8.shape[0])
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

    def loss_fn(params, x_uint8, y, key, shard):
        x0 = to_float(x_uint8)

        def draw(k):
            kt, kn = jax.random.split(k)
            return jax.random.randint(kt, (), 1, T + 1), jax.random.normal(kn, x0.shape[1:])

        t, noise = jax.vmap(draw)(shard.keys(key, x0.shape[0]))
        logits = apply_fn(params, add_noise(schedule, x0, t, noise), t)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))

    return loss_fn


def clean_classifier_loss(apply_fn, augment_shift: int = 2):
    """Cross-entropy on clean images, each shifted by up to ``augment_shift`` pixels at random
    (wrapping), for the evaluation classifier."""

    def loss_fn(params, x_uint8, y, key, shard):
        x0 = to_float(x_uint8)

        def shift(k, img):
            dy, dx = jax.random.randint(k, (2,), -augment_shift, augment_shift + 1)
            return jnp.roll(img, (dy, dx), axis=(0, 1))

        x0 = jax.vmap(shift)(shard.keys(key, x0.shape[0]), x0)
        logits = apply_fn(params, x0)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))

    return loss_fn


def vae_loss(autoencoder, *, kl_weight: float = 1e-4):
    """The KL autoencoder's loss: pixel MSE summed per image + kl_weight * KL(q(z | x) || N(0, I)),
    averaged over the batch, the latent drawn with noise per example. ``autoencoder`` is the
    module (its encode and decode are used); labels are unused."""
    from jaxdiff.nets.autoencoder import gaussian_kl

    def loss_fn(params, x_uint8, y, key, shard):
        x = to_float(x_uint8)
        mean, logvar = autoencoder.apply(params, x, method="encode")
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(shard.keys(key, x.shape[0]))
        recon = autoencoder.apply(params, mean + jnp.exp(0.5 * logvar) * noise, method="decode")
        mse = jnp.sum((recon.astype(jnp.float32) - x) ** 2, axis=(1, 2, 3))
        return jnp.mean(mse + kl_weight * gaussian_kl(mean, logvar))

    return loss_fn


def clip_loss(image_emb, text_emb, logit_scale, groups=None):
    """Symmetric InfoNCE: cross-entropy of image->text and text->image over cosine similarities
    times exp(logit_scale); matching pairs share a row index.

    With ``groups`` (B,), every pair in the same group is a positive, with the target mass
    split evenly among them: captions made from labels repeat within a batch, and calling
    a same-class caption a negative would teach the encoders to separate identical meanings.
    """
    img = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    txt = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * img @ txt.T
    n = logits.shape[0]
    same = jnp.eye(n) if groups is None else (groups[:, None] == groups[None, :]).astype(logits.dtype)
    targets = same / jnp.sum(same, axis=-1, keepdims=True)
    ce = lambda lg: -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(lg, axis=-1), axis=-1))
    return 0.5 * (ce(logits) + ce(logits.T))


def pick_captions(ids_table, mask_table, y, keys):
    """One caption per example: a random template's row of the caption tables
    (num_labels, templates, L) at each example's label."""
    idx = jax.vmap(lambda k: jax.random.randint(k, (), 0, ids_table.shape[1]))(keys)
    return jnp.asarray(ids_table)[y, idx], jnp.asarray(mask_table)[y, idx]


def contrastive_loss(text_encoder, image_encoder, caption_ids, caption_mask):
    """CLIP-style training of a (text, image) pair on labelled images: each image is paired with a
    caption of its label (a random template from the tables, see ``pick_captions``), and the
    symmetric InfoNCE runs over the WHOLE global batch, every device's embeddings gathered, as on
    one device. Parameters are {"text", "image", "logit_scale"}."""

    def loss_fn(params, x_uint8, y, key, shard):
        ids, mask = pick_captions(caption_ids, caption_mask, y, shard.keys(key, y.shape[0]))
        img = image_encoder.apply(params["image"], to_float(x_uint8))
        txt = text_encoder.apply(params["text"], ids, mask)[1]
        return clip_loss(shard.gather(img), shard.gather(txt), params["logit_scale"], groups=shard.gather(y))

    return loss_fn


def ema_decay_at(step, ema_decay: float):
    """The EMA decay used at ``step`` (0-based): min(decay, (1 + step) / (10 + step)). Early on the
    average follows the parameters closely, so a short run's EMA is not stuck near the
    initialisation (0.999 from step one moves it only 1 - 0.999^n of the way)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn, tx: optax.GradientTransformation, ema_decay: float, axis_name: str | None = None):
    """One pure optimisation step. With ``axis_name``, the per-device step of a data-parallel run:
    gradients and loss are averaged over that axis with ``lax.pmean``. ``step(state, batch, frozen)``:
    with frozen parameters (a LoRA's base network), ``loss_fn(frozen)`` is the loss, so they enter the
    step as data rather than as constants of its program, and get neither gradients nor optimizer state."""

    def step(state: TrainState, batch, frozen=None):
        loss_of = loss_fn if frozen is None else loss_fn(frozen)
        x, y = batch
        shard = Shard() if axis_name is None else Shard(jax.lax.axis_index(axis_name) * x.shape[0], axis_name)
        key = jax.random.fold_in(state.key, state.step)
        # the loss of the global batch is the mean of the devices' losses; differentiated whole, the
        # replicated parameters' gradient is the global one (shard_map sums their cotangents)
        global_loss = lambda p: _mean_over(loss_of(p, x, y, key, shard), axis_name)
        loss, grads = jax.value_and_grad(global_loss)(state.params)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        decay = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema_params, params)
        new = state.replace(step=state.step + 1, params=params, ema_params=keep(ema, state.ema_params),
                            opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32))
        return new, {"loss": loss, "finite": finite}

    return step


def _mean_over(value, axis_name):
    return value if axis_name is None else jax.lax.pmean(value, axis_name)


def scan_steps(step):
    """Several steps per dispatch: ``(state, batches with a leading steps axis[, frozen]) -> (state, metrics)``."""
    return lambda state, batches, frozen=None: jax.lax.scan(lambda s, b: step(s, b, frozen), state, batches)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh whose one axis is the data axis, over ``devices`` (default: every device of every
    process), ordered by process so that each process's devices hold consecutive rows."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,))


def data_parallel(loss_fn, tx, ema_decay: float, mesh: Mesh, host_loop: bool | None = None):
    """The pmap-style data-parallel multi-step, as shard_map over a 1-D mesh, under jit.

    Takes ``(state, batches[, frozen])`` with batches shaped (steps, global_batch, ...), the global batch
    split over the devices; the state (and frozen parameters) replicated. Returns ``(state, metrics)``.

    On accelerators the steps are one ``lax.scan``. With ``host_loop`` (default: on a CPU) they are
    separate calls of one compiled step: XLA:CPU ran a training step ~20x slower inside a loop
    (jax 0.10.2, the textbook U-Net 16/32/64 at batch 32: 2.7 s a step in a scan, 0.12 s alone).
    """
    step = make_train_step(loss_fn, tx, ema_decay, axis_name=DATA_AXIS)
    if host_loop is None:
        host_loop = jax.default_backend() == "cpu"
    if not host_loop:
        sharded = jax.shard_map(scan_steps(step), mesh=mesh, in_specs=(P(), P(None, DATA_AXIS), P()),
                                out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=0)
    one = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P())),
                  donate_argnums=0)
    return host_steps(one)


def host_steps(one):
    """``(state, batches with a leading steps axis[, frozen]) -> (state, stacked metrics)`` as separate calls
    of ``one`` (a jitted step): what ``scan_steps`` computes, for XLA:CPU, which runs a step far slower
    inside a loop."""

    def steps(state, batches, frozen=None):
        metrics = []
        for i in range(jax.tree.leaves(batches)[0].shape[0]):
            state, m = one(state, jax.tree.map(lambda a, i=i: a[i], batches), frozen)
            metrics.append(m)
        return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

    return steps


def shard_batches(batches, mesh: Mesh, axes=DATA_AXIS):
    """Global arrays (steps, global_batch, ...) split over the data axis (or the mesh ``axes``), from this
    process's rows (all of them with one process; ``jaxdiff.distributed.Batches`` gives each its own)."""
    n = mesh.devices.size
    sharding = NamedSharding(mesh, P(None, axes))

    def put(a):
        a = np.asarray(a)
        global_shape = (a.shape[0], a.shape[1] * jax.process_count(), *a.shape[2:])
        if global_shape[1] % n:
            raise ValueError(f"global batch {global_shape[1]} is not divisible by the {n} devices")
        return jax.make_array_from_process_local_data(sharding, a, global_shape)

    return jax.tree.map(put, batches)


def replicate(tree, mesh: Mesh):
    """The same values on every device of the mesh (every process passes the same values)."""
    sharding = NamedSharding(mesh, P())

    def put(a):
        a = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)
