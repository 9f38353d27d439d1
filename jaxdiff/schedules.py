"""Noise schedules and the forward process q(x_t | x_0).

Timestep convention, used everywhere in jaxdiff: an integer t in 1..T, as in the
textbook. ``alpha_bars[t - 1]`` is abar_t, so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
t = 0 means clean data (abar_0 = 1); it is never passed to a network.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule is made, in full: ``build()`` makes it again, ``to_dict``/``from_dict`` carry
    it through a checkpoint's JSON, and comparing two specs tells whether two schedules are one.

    ``kind`` is "linear" (betas evenly spaced), "scaled_linear" (square roots evenly spaced, Stable
    Diffusion's), "cosine" (Nichol & Dhariwal) or "betas" (given explicitly).
    """

    kind: str
    num_timesteps: int
    beta_start: float | None = None
    beta_end: float | None = None
    s: float | None = None
    max_beta: float | None = None
    betas: tuple[float, ...] | None = None

    def build(self) -> Schedule:
        if self.kind in ("linear", "scaled_linear"):
            return _BUILDERS[self.kind](self.num_timesteps, self.beta_start, self.beta_end)
        if self.kind == "cosine":
            return cosine(self.num_timesteps, self.s, self.max_beta)
        if self.kind == "betas":
            return from_betas(self.betas)
        raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleSpec:
        if not isinstance(d, dict) or d.get("kind") not in SCHEDULE_KINDS:
            raise ValueError(f"a schedule is a dict whose 'kind' is one of {SCHEDULE_KINDS}, got {d!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown schedule settings {sorted(unknown)} in {d!r}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine", "betas")


@struct.dataclass
class Schedule:
    """A discrete noise schedule as a frozen pytree, so it enters ``jit`` as data.

    ``spec`` (static) says how it was made; checkpoints store it, so a model trained under one
    schedule is loaded back under the same one.
    """

    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    spec: ScheduleSpec = struct.field(pytree_node=False, default=None)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def alpha_bar(self, t: jax.Array) -> jax.Array:
        """abar_t for integer t in 0..T (abar_0 = 1).

        A gather and a select, no new array: samplers call this inside every scan step."""
        t = jnp.asarray(t)
        return jnp.where(t > 0, self.alpha_bars[jnp.maximum(t - 1, 0)], jnp.ones((), self.alpha_bars.dtype))


def from_betas(betas, spec: ScheduleSpec | None = None) -> Schedule:
    """Build a schedule from betas; the products are taken in float64, then stored as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("every beta must be finite and strictly between 0 and 1")
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    spec = spec or ScheduleSpec("betas", betas.size, betas=tuple(float(b) for b in betas))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(betas=f32(betas), alphas=f32(alphas), alpha_bars=f32(alpha_bars), spec=spec)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The textbook's (and DDPM's) linear betas from beta_start to beta_end."""
    _check_betas(num_timesteps, beta_start, beta_end)
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return from_betas(betas, ScheduleSpec("linear", num_timesteps, float(beta_start), float(beta_end)))


def scaled_linear(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:
    """Stable Diffusion's betas: sqrt(beta) evenly spaced from sqrt(beta_start) to sqrt(beta_end)."""
    _check_betas(num_timesteps, beta_start, beta_end)
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2
    return from_betas(betas, ScheduleSpec("scaled_linear", num_timesteps, float(beta_start), float(beta_end)))


_BUILDERS = {"linear": linear, "scaled_linear": scaled_linear}


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    _check_num_timesteps(num_timesteps)
    if not s >= 0 or not 0 < max_beta < 1:
        raise ValueError(f"need s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}")
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    abar = f / f[0]
    betas = np.clip(1.0 - abar[1:] / abar[:-1], 1e-12, max_beta)
    return from_betas(betas, ScheduleSpec("cosine", num_timesteps, s=float(s), max_beta=float(max_beta)))


def _check_betas(num_timesteps, beta_start, beta_end) -> None:
    _check_num_timesteps(num_timesteps)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")


def _check_num_timesteps(num_timesteps) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")


def expand_to(a: jax.Array, x: jax.Array) -> jax.Array:
    """Append trailing axes so a per-example array of shape (B,) broadcasts against x (B, ...)."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t of shape (B,) or scalar.

    A concrete t must be integers in 1..T (the gather would clamp others silently); a traced t
    (under ``jit``) is not checked."""
    if not isinstance(t, jax.core.Tracer):
        arr = np.asarray(t)
        T = schedule.num_timesteps
        if arr.dtype.kind not in "iu":
            raise ValueError(f"t must be integer timesteps in 1..{T}, got {arr.dtype} values {brief(arr)}")
        bad = arr[(arr < 1) | (arr > T)]
        if bad.size:
            raise ValueError(f"t must be in 1..{T} (the schedule's timesteps), got {brief(bad)}")
    abar = expand_to(schedule.alpha_bar(t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def timesteps(schedule: Schedule, steps: int, spacing: str = "uniform") -> np.ndarray:
    """The grid a few-step sampler walks: ``steps`` strictly decreasing integer timesteps from T to 1
    at which it evaluates the network, then the endpoint 0 (clean data), so ``steps + 1`` values.

    ``spacing="uniform"`` spaces them evenly in t (DDIM's choice); ``"logsnr"`` evenly in
    lambda = log(sqrt(abar) / sqrt(1 - abar)), which DPM-Solver recommends for small images.
    """
    T = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if steps == 1:
        return np.array([T, 0], dtype=np.int32)
    if spacing == "uniform":
        target = np.linspace(T, 1, steps)
    else:
        abar = np.asarray(schedule.alpha_bars, np.float64)
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # increasing as t falls
        t_grid = np.arange(1, T + 1, dtype=np.float64)
        target = np.interp(np.linspace(lam[-1], lam[0], steps), lam[::-1], t_grid[::-1])
    ts = np.round(target).astype(np.int64)
    ts[-1] = 1
    # rounding can repeat a timestep where lambda moves fast: push repeats upward, then cap at T
    for i in range(steps - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    ts = np.minimum(ts, T - np.arange(steps))
    return np.append(ts, 0).astype(np.int32)


SPACINGS = ("uniform", "logsnr")


def check_timesteps(schedule: Schedule, ts) -> np.ndarray:
    """A caller's own grid, checked: integers, strictly decreasing, within 0..T, at least one step."""
    arr = np.asarray(ts)
    T = schedule.num_timesteps
    if arr.ndim != 1 or arr.size < 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"timesteps must be a 1-D integer array of at least 2 values (the last is the endpoint), "
                         f"got {arr.dtype} of shape {arr.shape}")
    if np.any(np.diff(arr) >= 0) or arr[0] > T or arr[-1] < 0:
        raise ValueError(f"timesteps must decrease strictly within {T}..0, got {brief(arr)}")
    return arr.astype(np.int32)


def brief(values, keep: int = 3) -> str:
    """A list of values for a message: all of a short one; the first and last ``keep`` of a long one
    and how many there are (an error must stay one readable line at 1,000 timesteps)."""
    values = np.asarray(values).ravel().tolist()
    if len(values) <= 2 * keep + 1:
        return str(values)
    head, tail = ", ".join(map(str, values[:keep])), ", ".join(map(str, values[-keep:]))
    return f"[{head}, ..., {tail}] ({len(values)} values)"
