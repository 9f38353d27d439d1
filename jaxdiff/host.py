"""Programs that run once (initial parameters, a fresh optimizer state), compiled for the host's CPU with
XLA's backend optimisations off: for them, compiling for an accelerator (autotuning included) or with
full optimisation takes far longer than running them."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

ONCE_OPTIONS = {"xla_backend_optimization_level": 0}
# Beyond this many values made, an accelerator's speed at making them outweighs its compile time: the host's
# -O0 code draws ~12M normal values a second on two cores (an SD U-Net's 860M would take over a minute).
HOST_LIMIT = 20_000_000


def cpu():
    """The host's first CPU device, or None where JAX was started without its CPU platform."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def run_once(fn: Callable, *args, values: Callable[[], int] = lambda: 0):
    """``fn(*args)`` as one program compiled to run once. Where the default backend is not the CPU, it runs on
    the host's CPU (when JAX has it, and ``values()``, about how many values it makes, is at most HOST_LIMIT) and
    its results stay there; under a trace (an outer jit, eval_shape) it is staged into that program as it is."""
    leaves = jax.tree.leaves(args)
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return fn(*args)
    device = cpu()
    # arrays spread over other processes' devices cannot be brought to this host in one piece
    spread = any(isinstance(a, jax.Array) and not a.is_fully_addressable for a in leaves)
    if device is None or (jax.default_backend() != "cpu" and (spread or values() > HOST_LIMIT)):
        return jax.jit(fn)(*args)
    if jax.default_backend() != "cpu":  # on the CPU backend the arguments keep their placement (uncommitted)
        args = jax.device_put(args, device)
    return jax.jit(fn).lower(*args).compile(compiler_options=ONCE_OPTIONS)(*args)


def to_default_device(tree):
    """Arrays of ``tree`` on the default device, uncommitted (as a jit's outputs are), whatever device they
    were made on; PRNG keys stay keys, and under a trace the tree is left as it is."""
    if jax.default_backend() == "cpu":
        return tree

    def move(a):
        if isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.committed):
            return a  # traced, or already where it should be (a program that stayed on the accelerator)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(move(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        return jax.numpy.asarray(np.asarray(a))

    return jax.tree.map(move, tree)
