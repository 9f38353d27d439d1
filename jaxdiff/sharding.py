"""Sharded training: a (data, fsdp) mesh over every device of every host, and where each array lives on it.

The global batch is split over both axes (each device takes B / devices rows). Every leaf of the train
state (parameters, EMA, optimizer moments) is split over ``fsdp`` along its largest dimension that the
fsdp size divides; leaves under ``min_size`` elements, scalars and leaves with no such dimension are
replicated. The step is ``train.make_train_step``'s pure step on the global batch under ``jax.jit``
with those shardings in and out: XLA inserts the collectives (gathering weights where they are used,
reducing their gradients back to the split), so the step computes what it computes on one device, and a mesh
of data=N, fsdp=1 is plain data parallelism. The names follow the usual FSDP convention: a batch
axis and an axis the weights are split over, the batch dimension sharded over both.

    mesh = sharding.make_mesh("data=2,fsdp=4")        # 8 devices; "fsdp=-1" puts them all on fsdp
    state = sharding.init_state(params, tx, seed, mesh)
    step = sharding.train_step(loss_fn, tx, ema_decay, mesh, state)
    state, metrics = step(state, sharding.shard_batches(batches, mesh))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import train

DATA_AXIS = train.DATA_AXIS
FSDP_AXIS = "fsdp"
AXES = (DATA_AXIS, FSDP_AXIS)
BATCH = AXES  # the batch dimension is split over both axes
# leaves with fewer elements stay whole on every device: biases and norms cost little and splitting
# them only adds collectives (1024 float32 = 4 KiB)
MIN_SIZE = 1024


def parse_mesh(setting: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> {"data": 2, "fsdp": 4}. A count of -1 or ``auto`` (at most one) takes the
    devices left over; an axis left out is 1 beside an auto one, else auto ("fsdp=4": data takes the
    rest). Raises ValueError naming what is wrong."""
    if not isinstance(setting, str) or not setting.strip():
        raise ValueError(f"mesh must be a setting like 'data=2,fsdp=4', got {setting!r}")
    shape: dict[str, int] = {}
    for part in setting.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+|auto)\s*", part)
        if not m:
            raise ValueError(f"mesh: {part.strip()!r} is not axis=count (axes {', '.join(AXES)}; count a positive "
                             f"integer or -1/auto), in {setting!r}")
        name, count = m.group(1), -1 if m.group(2) == "auto" else int(m.group(2))
        if name not in AXES:
            raise ValueError(f"mesh: unknown axis {name!r} in {setting!r}; the axes are {', '.join(AXES)}")
        if name in shape:
            raise ValueError(f"mesh: axis {name!r} given twice in {setting!r}")
        if count == 0 or count < -1:
            raise ValueError(f"mesh: {name}={count} in {setting!r}; a count is a positive integer or -1/auto")
        shape[name] = count
    if list(shape.values()).count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be auto (-1), in {setting!r}")
    rest = 1 if -1 in shape.values() else -1
    shape = {name: shape.get(name, rest) for name in AXES}
    return shape


def mesh_shape(setting: str, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) for ``num_devices`` devices; ValueError if the counts do not multiply to it."""
    shape = parse_mesh(setting)
    fixed = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        if num_devices % fixed:
            raise ValueError(f"mesh {setting!r}: {num_devices} devices cannot be split into groups of {fixed}")
        shape = {k: num_devices // fixed if v == -1 else v for k, v in shape.items()}
    elif fixed != num_devices:
        raise ValueError(f"mesh {setting!r} has {fixed} devices (data x fsdp), but the run has {num_devices}")
    return shape[DATA_AXIS], shape[FSDP_AXIS]


def make_mesh(setting: str | Mesh = "fsdp=-1", devices=None) -> Mesh:
    """The (data, fsdp) mesh over ``devices`` (default: every device of every process), devices ordered
    by process, so that each process's devices hold consecutive rows of the batch (the rows
    ``distributed.local_rows`` gives it) and an fsdp group that fits in one host stays in it."""
    if isinstance(setting, Mesh):
        if tuple(setting.axis_names) != AXES:
            raise ValueError(f"mesh: expected axes {AXES}, got {tuple(setting.axis_names)}")
        return setting
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(setting, len(devices))
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape), AXES)


def is_sharded(mesh: Mesh) -> bool:
    """A mesh of this module (as opposed to ``train.make_mesh``'s one data axis)."""
    return FSDP_AXIS in mesh.axis_names


def leaf_spec(shape, fsdp: int, min_size: int = MIN_SIZE) -> P:
    """Where one array goes: its largest dimension divisible by ``fsdp`` (the last of equals) split over
    the fsdp axis; replicated if it is a scalar, under ``min_size`` elements or has no such dimension."""
    if fsdp == 1 or len(shape) == 0 or math.prod(shape) < min_size:
        return P()
    fits = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not fits:
        return P()
    dim = max(fits, key=lambda i: (shape[i], i))
    return P(*([None] * dim), FSDP_AXIS)


def shardings(tree, mesh: Mesh, min_size: int = MIN_SIZE):
    """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs): the rule of ``leaf_spec``.
    Applied to a whole TrainState, the optimizer's moments follow their parameters (same shapes), and
    the step, key and counters are replicated."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda a: NamedSharding(mesh, leaf_spec(np.shape(a), fsdp, min_size)), tree)


def place(tree, target):
    """Host values (every process passes the same) onto the shardings ``target``; each device receives
    only its own block, so nothing larger than a shard is put on a device."""

    def put(a, s):
        a = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(a.shape, s, lambda index: a[index])

    return jax.tree.map(put, tree, target)


def init_state(params, tx, seed: int, mesh: Mesh, init: Callable | None = None, min_size: int = MIN_SIZE):
    """A fresh TrainState laid out on ``mesh``. ``params``: host or device values, placed block by block;
    or None with ``init() -> params`` (e.g. ``lambda: spec.init(seed)``), which then runs under jit with
    sharded outputs, so parameters too large for one device are created already split."""
    make = lambda p: train.init_state(p, tx, seed)
    if params is None:
        abstract = jax.eval_shape(lambda: make(init()))
        return jax.jit(lambda: make(init()), out_shardings=shardings(abstract, mesh, min_size))()
    params = place(params, shardings(params, mesh, min_size))
    abstract = jax.eval_shape(make, params)
    return jax.jit(make, out_shardings=shardings(abstract, mesh, min_size))(params)


def shard_batches(batches, mesh: Mesh):
    """Global arrays (steps, global_batch, ...) with the batch split over both mesh axes, from this
    process's rows (as ``train.shard_batches``)."""
    return train.shard_batches(batches, mesh, axes=BATCH)


def train_step(loss_fn, tx, ema_decay: float, mesh: Mesh, state, host_loop: bool | None = None, frozen=None):
    """The multi-step ``(state, batches) -> (state, metrics)`` for a state laid out as ``state`` is (from
    ``init_state``), batches from ``shard_batches``; the state is donated. The state returned by every
    step is constrained to that layout, so it stays split inside a scan too; where the gradients live in
    between is XLA's choice (on simulated CPU devices: reduced whole, then each device keeps its slice).
    ``host_loop`` as in ``train.data_parallel`` (default: separate calls of one step on a CPU). ``frozen``:
    parameters the loss reads but does not train (``train.make_train_step``), laid out as they are given
    (``place(frozen, shardings(frozen, mesh))`` splits them like the state); the steps then take them as a
    third argument."""
    layout = jax.tree.map(lambda a: a.sharding, state)
    frozen_layout = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
    replicated = NamedSharding(mesh, P())
    step = train.make_train_step(loss_fn, tx, ema_decay)

    def pinned(state, batch, frozen=None):
        new, metrics = step(state, batch, frozen)
        return jax.lax.with_sharding_constraint(new, layout), metrics

    if host_loop is None:
        host_loop = jax.default_backend() == "cpu"
    if not host_loop:
        return jax.jit(train.scan_steps(pinned),
                       in_shardings=(layout, NamedSharding(mesh, P(None, BATCH)), frozen_layout),
                       out_shardings=(layout, replicated), donate_argnums=0)
    one = jax.jit(pinned, in_shardings=(layout, NamedSharding(mesh, P(BATCH)), frozen_layout),
                  out_shardings=(layout, replicated), donate_argnums=0)
    row = jax.jit(lambda batches, i: jax.tree.map(lambda a: a[i], batches),
                  out_shardings=NamedSharding(mesh, P(BATCH)))

    def steps(state, batches, frozen=None):
        metrics = []
        for i in range(jax.tree.leaves(batches)[0].shape[0]):
            state, m = one(state, row(batches, i), frozen)
            metrics.append(m)
        return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

    return steps


def bytes_per_device(tree) -> dict:
    """{device: bytes of ``tree``'s blocks held on it}, from each array's addressable shards."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
