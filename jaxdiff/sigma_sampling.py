"""diffusers' sigma-space schedulers, walked as diffusers walks them: Euler, Euler ancestral, Heun, LMS
(``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``,
``LMSDiscreteScheduler``) and DPM-Solver++(2M), SDE and not (``DPMSolverMultistepScheduler`` with
``algorithm_type="sde-dpmsolver++"`` or "dpmsolver++", Karras sigmas included), each one
``sampling.sample_loop`` over coefficients computed beforehand in float64 NumPy. jaxdiff's research
samplers (``sampling.euler`` and friends, on jaxdiff's integer grids) are a separate family.

The walk (``SigmaWalk``): the noise levels sigma = sqrt((1 - abar) / abar) a run steps through (its
last is the endpoint, 0 or sigma_min), the network time at each evaluation, and the factor diffusers'
pipelines multiply the starting noise by (``init_noise_sigma``). Times may be fractional: with
``timestep_spacing="linspace"`` (sigma interpolated linearly between training steps) and with Karras
sigmas (time interpolated in log sigma); they reach the network as float32 in jaxdiff's convention,
t = diffusers' timestep + 1. ``euler_walk`` and ``dpm_walk`` build walks from a schedule's alpha_bars;
``jaxdiff.pretrained.scheduler.sigma_setup`` builds them from a diffusers scheduler config, and
``jaxdiff.pretrained.walks`` runs them by name (its ``RUNNERS``), like the other diffusers walks.

Samplers take ``model_fn(x_in, t)``, the network's raw output: eps, or v with
``prediction="v_prediction"``. The sampler converts it at its own sigma, as diffusers does; the
network's time alone cannot say which sigma that is (Karras sigmas and fractional linspace times
interpolate differently, and DPM-Solver rounds Karras times to integers). The Euler family carries
diffusers' sample, x_t / sqrt(abar) = x0 + sigma eps, and feeds the network x / sqrt(sigma^2 + 1);
DPM-Solver carries x_t itself. The result is diffusers' last sample (at sigma_min, not rescaled, when
the walk ends there); ``return_trajectory`` gives every sample from the scaled start on.

Noise (Euler ancestral, 2M SDE) is drawn from ``key`` as jaxdiff's samplers draw it (one key, or one
per example, folded with the step); ``noise`` (steps, *x_T.shape) replaces it, e.g. by the noise
diffusers drew, to reproduce a run exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import sampling
from jaxdiff.schedules import Schedule

PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
KARRAS_RHO = 7.0


class SigmaWalk(NamedTuple):
    """``t``: the network time of each evaluation (jaxdiff's, diffusers' timestep + 1; may be fractional);
    ``sigmas``: the noise level at each of them and the endpoint (len(t) + 1); ``init_sigma``: diffusers'
    ``init_noise_sigma``, the factor on the starting noise. Tuples of floats, so a walk is hashable."""

    t: tuple
    sigmas: tuple
    init_sigma: float

    @property
    def steps(self) -> int:
        return len(self.t)


# ----------------------------------------------------------------------------- walks (NumPy, float64)


def sigma_table(alpha_bars) -> np.ndarray:
    """sqrt((1 - abar) / abar) per training step, rounded to float32 as diffusers keeps it."""
    abar = np.asarray(alpha_bars, np.float64)
    return np.sqrt((1.0 - abar) / abar).astype(np.float32)


def spaced_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> np.ndarray:
    """The Euler family's timesteps (0-indexed, float32, decreasing): "linspace" from T - 1 to 0
    (fractional), "leading" multiples of T // steps plus ``offset``, "trailing" T - 1 down by T / steps."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (T // steps)).round()[::-1].astype(np.float32) + np.float32(offset)
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps).round().astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al.'s levels: evenly spaced in sigma^(1 / rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def time_of_sigma(sigmas, table) -> np.ndarray:
    """The (fractional, 0-indexed) training time of each sigma: linear in log sigma between training
    steps, clamped to 0..T - 1 (diffusers' ``_sigma_to_t``; its log table is float32)."""
    log_table = np.log(np.asarray(table, np.float32)).astype(np.float64)
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    return np.interp(log_sigma, log_table, np.arange(len(log_table), dtype=np.float64))


def _walk(taus, sigmas, final: float, init: float) -> SigmaWalk:
    sig = np.append(np.asarray(sigmas, np.float64), final).astype(np.float32)
    t = np.asarray(taus, np.float32).astype(np.float64) + 1.0
    return SigmaWalk(tuple(t.tolist()), tuple(sig.astype(np.float64).tolist()), float(init))


def _check_walk_args(T, steps, spacing, final_sigma):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    if final_sigma not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigma!r}")


def euler_walk(alpha_bars, steps: int, *, spacing: str = "linspace", offset: int = 0, karras: bool = False,
               final_sigma: str = "zero", sigma_min: float | None = None,
               sigma_max: float | None = None) -> SigmaWalk:
    """The walk of diffusers' Euler, Euler ancestral, Heun and LMS schedulers (``set_timesteps``):
    the spaced timesteps, sigma interpolated linearly at them; with ``karras``, ``steps`` Karras levels
    between the first and last of those sigmas (or ``sigma_min`` / ``sigma_max``) and the times of
    those levels; then the endpoint (0, or the sigma of training step 0 for "sigma_min").
    ``init_sigma`` is the largest sigma, or sqrt(sigma^2 + 1) of it with "leading" spacing."""
    table = sigma_table(alpha_bars)
    T = len(table)
    _check_walk_args(T, steps, spacing, final_sigma)
    taus = spaced_timesteps(T, int(steps), spacing, offset)
    if taus.min() < 0 or taus.max() > T - 1:
        raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={offset} at {steps} steps gives "
                         f"timesteps outside 0..{T - 1}")
    sigmas = np.interp(taus.astype(np.float64), np.arange(T), table.astype(np.float64))
    if karras:
        lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
        hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
        sigmas = karras_sigmas(lo, hi, int(steps))
        taus = time_of_sigma(sigmas, table)
    final = float(table[0]) if final_sigma == "sigma_min" else 0.0
    walk = _walk(taus, sigmas, final, 0.0)
    top = max(walk.sigmas)
    init = top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    return walk._replace(init_sigma=float(np.float32(init)))


def dpm_walk(alpha_bars, steps: int, *, taus=None, karras: bool = False, final_sigma: str = "zero",
             round_times: bool = True) -> SigmaWalk:
    """The walk of diffusers' ``DPMSolverMultistepScheduler``: at the integer timesteps ``taus``
    (0-indexed; default "linspace" spacing: round(linspace(0, T - 1, steps + 1)) without its 0) the
    training sigmas; with ``karras``, ``steps`` Karras levels over the whole training range, their
    times rounded to integers (``round_times``; diffusers keeps them fractional for the cosine
    schedule); then the endpoint. The state is x_t itself: ``init_sigma`` 1."""
    table = sigma_table(alpha_bars)
    T = len(table)
    _check_walk_args(T, steps, "linspace", final_sigma)
    if karras:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), int(steps))
        times = time_of_sigma(sigmas, table)
        taus = np.round(times) if round_times else times
    else:
        if taus is None:
            taus = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        taus = np.asarray(taus, np.int64)
        if taus.min() < 0 or taus.max() > T - 1:
            raise ValueError(f"timesteps must lie in 0..{T - 1}, got {taus.min()}..{taus.max()}")
        sigmas = table[taus].astype(np.float64)
    final = float(table[0]) if final_sigma == "sigma_min" else 0.0
    return _walk(taus, sigmas, final, 1.0)


def part(walk: SigmaWalk, first: int = 0, stop: int | None = None, *, from_sample: bool = False) -> SigmaWalk:
    """Steps ``first`` .. ``stop - 1`` of ``walk`` (diffusers' ``set_begin_index(first)`` of image-to-image and an
    ensemble's refiner; an ensemble's base stops early, its result the sample at ``sigmas[stop]``).
    ``from_sample``: the start is already a sample at ``sigmas[first]`` (a noised image, a base's latents), which
    diffusers does not multiply by ``init_noise_sigma``: ``init_sigma`` 1."""
    n = walk.steps
    stop = n if stop is None else stop
    if not 0 <= first < stop <= n:
        raise ValueError(f"a part of a {n}-step walk needs 0 <= first < stop <= {n}, got {first}, {stop}")
    return SigmaWalk(walk.t[first:stop], walk.sigmas[first:stop + 1], 1.0 if from_sample else walk.init_sigma)


def noised(x0, noise, sigma: float, *, carries_x_t: bool = False):
    """diffusers' ``add_noise`` of the sigma schedulers at level ``sigma``: the Euler family's sample
    x0 + sigma noise, or (DPM-Solver, ``carries_x_t``) x_t = (x0 + sigma noise) / sqrt(sigma^2 + 1)."""
    x = x0 + noise * jnp.asarray(sigma, x0.dtype)
    return x * jnp.asarray(1 / math.sqrt(sigma**2 + 1), x0.dtype) if carries_x_t else x


# ----------------------------------------------------------------------------- samplers


def _setup(name, schedule, x_T, walk, steps, timesteps, prediction, clip_x0, build, karras=False):
    """The checked walk (``build(alpha_bars, steps, karras=karras)`` when none is given) and clip_x0."""
    clip_x0 = sampling._check_common(x_T, clip_x0)
    if timesteps is not None:
        raise ValueError(f"{name} walks sigmas, not an integer grid: pass walk= (a SigmaWalk), not timesteps=")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if walk is None:
        if schedule is None:
            raise ValueError(f"{name} needs a schedule to build its walk from, or walk=")
        walk = build(np.asarray(schedule.alpha_bars), sampling.check_steps(steps), karras=bool(karras))
    elif not isinstance(walk, SigmaWalk):
        raise ValueError(f"walk must be a SigmaWalk, got {type(walk).__name__}")
    sig = np.asarray(walk.sigmas, np.float64)
    if len(walk.t) < 1 or sig.shape != (len(walk.t) + 1,) or not np.all(sig[:-1] > 0) or sig[-1] < 0:
        raise ValueError(f"walk must have one sigma per time plus the endpoint, positive but the endpoint (>= 0); "
                         f"got {len(walk.t)} times and {sig.shape[0]} sigmas")
    return walk, clip_x0


def _model_call(model_fn, x_in, t):
    return model_fn(x_in, jnp.full((x_in.shape[0],), t, jnp.float32))


def _ve_x0(out, x, sigma, prediction, clip_x0):
    """x0 from the network's output at diffusers' sample x = x0 + sigma eps."""
    if prediction == "epsilon":
        x0 = x - sigma * out
    else:  # x_in = x / sqrt(sigma^2 + 1) is x_t with abar = 1 / (sigma^2 + 1)
        x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def _f32(a) -> jnp.ndarray:
    return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


def _noise_inputs(noise, n, x_T, key, name):
    """(the per-step noise to scan over or None, the key for sample_loop or None)."""
    if noise is None:
        return None, sampling._check_key(key, name, x_T)
    noise = jnp.asarray(noise)
    if noise.shape != (n, *x_T.shape):
        raise ValueError(f"noise must have shape {(n, *x_T.shape)} (one draw per step), got {noise.shape}")
    return noise, None


def euler_discrete(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                   walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False, clip_x0=None,
                   return_trajectory: bool = False):
    """diffusers' ``EulerDiscreteScheduler`` (without churn): x += (x - x0) / sigma_i (sigma_{i+1} - sigma_i).
    One network evaluation per step; default walk: ``euler_walk`` with diffusers' class defaults."""
    walk, clip_x0 = _setup("euler_discrete", schedule, x_T, walk, steps, timesteps, prediction, clip_x0, euler_walk,
                           karras)
    s = np.asarray(walk.sigmas, np.float64)
    inputs = dict(t=_f32(walk.t), sigma=_f32(s[:-1]), c_in=_f32(1 / np.sqrt(s[:-1] ** 2 + 1)), dt=_f32(s[1:] - s[:-1]))

    def step(x, _, c, k):
        x0 = _ve_x0(_model_call(model_fn, x * c["c_in"], c["t"]), x, c["sigma"], prediction, clip_x0)
        return x + (x - x0) / c["sigma"] * c["dt"], None

    return _loop(step, x_T, _start(x_T, walk), inputs, return_trajectory=return_trajectory)


def euler_ancestral_discrete(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                             walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False,
                             clip_x0=None, noise=None, return_trajectory: bool = False):
    """diffusers' ``EulerAncestralDiscreteScheduler``: Euler down to sigma_down, then fresh noise up to
    sigma_{i+1}: sigma_up = sigma_{i+1} sqrt(1 - sigma_{i+1}^2 / sigma_i^2), sigma_down =
    sigma_{i+1}^2 / sigma_i. One evaluation per step; noise every step (times 0 at the last)."""
    walk, clip_x0 = _setup("euler_ancestral_discrete", schedule, x_T, walk, steps, timesteps, prediction, clip_x0,
                           euler_walk, karras)
    s = np.asarray(walk.sigmas, np.float64)
    s_from, s_to = s[:-1], s[1:]
    up = s_to * np.sqrt(1 - s_to**2 / s_from**2)
    down = s_to**2 / s_from
    inputs = dict(t=_f32(walk.t), sigma=_f32(s_from), c_in=_f32(1 / np.sqrt(s_from**2 + 1)), dt=_f32(down - s_from),
                  up=_f32(up))
    draws, key = _noise_inputs(noise, walk.steps, x_T, key, "euler_ancestral_discrete")
    if draws is not None:
        inputs["noise"] = draws

    def step(x, _, c, k):
        x0 = _ve_x0(_model_call(model_fn, x * c["c_in"], c["t"]), x, c["sigma"], prediction, clip_x0)
        z = c["noise"].astype(x.dtype) if "noise" in c else sampling.noise_like(k, x)
        return x + (x - x0) / c["sigma"] * c["dt"] + z * c["up"], None

    return _loop(step, x_T, _start(x_T, walk), inputs, key=key, return_trajectory=return_trajectory)


def heun_discrete(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                  walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False, clip_x0=None,
                  return_trajectory: bool = False):
    """diffusers' ``HeunDiscreteScheduler``: an Euler step to sigma_{i+1}, then the network there and the
    mean of the two slopes from the start; the last step (to sigma 0) stays Euler. As diffusers, the scan
    runs one evaluation per iteration, 2 steps - 1 in all (the trajectory has one sample per
    evaluation: each Euler guess, then the corrected sample)."""
    walk, clip_x0 = _setup("heun_discrete", schedule, x_T, walk, steps, timesteps, prediction, clip_x0, euler_walk,
                           karras)
    s = np.asarray(walk.sigmas, np.float64)
    n = walk.steps
    t = np.asarray(walk.t, np.float64)
    # iteration 2i is step i's first (Euler) evaluation at sigma_i, 2i + 1 its correction at sigma_{i+1}
    first = np.arange(2 * n - 1) % 2 == 0
    index = np.arange(2 * n - 1) // 2
    sigma_in = np.where(first, s[index], s[np.minimum(index + 1, n)])
    time = np.where(first, t[index], t[np.minimum(index + 1, n - 1)])
    dt = s[index + 1] - s[index]
    inputs = dict(t=_f32(time), sigma=_f32(sigma_in), c_in=_f32(1 / np.sqrt(sigma_in**2 + 1)), dt=_f32(dt),
                  first=jnp.asarray(first))
    x_start = _start(x_T, walk)
    carry = (jnp.zeros_like(x_start), jnp.zeros_like(x_start))  # the first slope and the step's start

    def step(x, carry, c, _):
        slope_0, x_0 = carry
        x0 = _ve_x0(_model_call(model_fn, x * c["c_in"], c["t"]), x, c["sigma"], prediction, clip_x0)
        slope = (x - x0) / c["sigma"]
        x_euler = x + slope * c["dt"]
        x_heun = x_0 + (slope_0 + slope) / 2 * c["dt"]
        return jnp.where(c["first"], x_euler, x_heun), (jnp.where(c["first"], slope, slope_0),
                                                        jnp.where(c["first"], x, x_0))

    return _loop(step, x_T, x_start, inputs, carry=carry, return_trajectory=return_trajectory)


LMS_ORDER = 4  # diffusers' step(order=4), what its pipelines use


def lms_coefficients(sigmas, order: int = LMS_ORDER) -> np.ndarray:
    """(steps, order) weights of the last ``order`` slopes (newest first) in linear multistep step i:
    the integral over [sigma_i, sigma_{i+1}] of each slope's Lagrange basis polynomial through
    sigma_i, sigma_{i-1}, ... (fewer at the start), integrated exactly in float64."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    coef = np.zeros((n, order))
    for i in range(n):
        k = min(i + 1, order)
        nodes = s[i - np.arange(k)]
        for j in range(k):
            others = np.delete(nodes, j)
            basis = np.polynomial.Polynomial.fromroots(others) if k > 1 else np.polynomial.Polynomial([1.0])
            basis = basis / np.prod(nodes[j] - others)
            antiderivative = basis.integ()
            coef[i, j] = antiderivative(s[i + 1]) - antiderivative(s[i])
    return coef


def lms_discrete(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                 walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False, clip_x0=None,
                 order: int = LMS_ORDER, earlier=(), return_trajectory: bool = False):
    """diffusers' ``LMSDiscreteScheduler``: x += sum_j c_ij slope_{i-j} over the last ``order`` slopes
    (x - x0) / sigma, the weights from ``lms_coefficients``. One evaluation per step. ``earlier``: the levels
    of the steps before ``walk`` began (a walk begun mid-way, as image-to-image begins it): diffusers weighs
    by the absolute step index, so its first steps take the whole walk's higher-order weights, with the
    slopes it has not got left out."""
    walk, clip_x0 = _setup("lms_discrete", schedule, x_T, walk, steps, timesteps, prediction, clip_x0, euler_walk,
                           karras)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= 4:
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
    s = np.asarray(walk.sigmas, np.float64)
    before = np.asarray(earlier, np.float64).reshape(-1)
    coef = lms_coefficients(np.concatenate([before, s]), int(order))[len(before):]
    inputs = dict(t=_f32(walk.t), sigma=_f32(s[:-1]), c_in=_f32(1 / np.sqrt(s[:-1] ** 2 + 1)), coef=_f32(coef))
    x_start = _start(x_T, walk)

    def step(x, history, c, _):
        x0 = _ve_x0(_model_call(model_fn, x * c["c_in"], c["t"]), x, c["sigma"], prediction, clip_x0)
        slopes = jnp.concatenate([((x - x0) / c["sigma"])[None], history])  # newest first
        # a sum of products, not a dot: a GPU's dot may round float32 to TF32
        weights = c["coef"].astype(x.dtype).reshape((-1,) + (1,) * x.ndim)
        return x + jnp.sum(weights * slopes, axis=0), slopes[:-1]

    history = jnp.zeros((int(order) - 1, *x_start.shape), x_start.dtype)  # the earlier slopes, newest first
    return _loop(step, x_T, x_start, inputs, carry=history, return_trajectory=return_trajectory)


def dpm_coefficients(sigmas, *, final_first_order: bool, solver_type: str = "midpoint", sde: bool = True) -> dict:
    """Per-step coefficients of DPM-Solver++(2M) on the levels ``sigmas`` (endpoint last), in float64:
    x' = a x + b (x0 + w (x0 - x0_prev)) + c z, with alpha = 1 / sqrt(sigma^2 + 1), s = sigma alpha,
    h = log(sigma_i / sigma_{i+1}) the step in log-SNR / 2. ``sde`` (2M SDE): a = s'/s e^-h,
    b = alpha' (1 - e^-2h), c = s' sqrt(1 - e^-2h); else (the ODE solver) a = s'/s, b = alpha' (1 - e^-h),
    c = 0. w = h / (2 h_prev) ("midpoint"), or from diffusers' "heun" correction term; 0 on first-order
    steps (the first, a step to sigma 0, and the last with ``final_first_order``)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    s_i, s_j = s[:-1], s[1:]
    alpha_i, alpha_j = 1 / np.sqrt(s_i**2 + 1), 1 / np.sqrt(s_j**2 + 1)
    r = s_j / s_i  # e^-h
    to_zero = s_j == 0
    with np.errstate(divide="ignore"):
        h = np.where(to_zero, np.inf, np.log(s_i / np.where(to_zero, 1.0, s_j)))
    ratio = (s_j * alpha_j) / (s_i * alpha_i)
    if sde:
        a, b, c = ratio * r, alpha_j * (1 - r**2), s_j * alpha_j * np.sqrt(1 - r**2)
    else:
        a, b, c = ratio, alpha_j * (1 - r), np.zeros(n)
    h_prev = np.concatenate([[1.0], h[:-1]])
    second = (np.arange(n) > 0) & ~to_zero
    if final_first_order:
        second[-1] = False
    with np.errstate(invalid="ignore", divide="ignore"):
        if solver_type == "midpoint":
            w = 0.5 * h / h_prev
        elif sde:
            w = alpha_j * ((1 - r**2) / (-2 * h) + 1) * h / (b * h_prev)
        else:
            w = alpha_j * ((r - 1) / h + 1) * h / (b * h_prev)
    return dict(a=a, b=b, c=c, w=np.where(second, w, 0.0), alpha=alpha_i, s=s_i * alpha_i)


def _dpm(name, sde, model_fn, schedule, x_T, key, steps, timesteps, walk, prediction, karras, clip_x0, noise,
         final_first_order, solver_type, return_trajectory):
    walk, clip_x0 = _setup(name, schedule, x_T, walk, steps, timesteps, prediction, clip_x0, dpm_walk, karras)
    if final_first_order is None:
        final_first_order = walk.sigmas[-1] == 0 or walk.steps < 15
    if not isinstance(final_first_order, (bool, np.bool_)):
        raise ValueError(f"final_first_order must be True, False or None, got {final_first_order!r}")
    coef = dpm_coefficients(walk.sigmas, final_first_order=bool(final_first_order), solver_type=solver_type,
                            sde=sde)
    inputs = {k: _f32(v) for k, v in coef.items()} | {"t": _f32(walk.t)}
    if sde:
        draws, key = _noise_inputs(noise, walk.steps, x_T, key, name)
        if draws is not None:
            inputs["noise"] = draws
    else:
        key = None
    x_start = _start(x_T, walk)

    def step(x, x0_prev, c, k):
        out = _model_call(model_fn, x, c["t"])
        x0 = (x - c["s"] * out) / c["alpha"] if prediction == "epsilon" else c["alpha"] * x - c["s"] * out
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        x_next = c["a"] * x + c["b"] * (x0 + c["w"] * (x0 - x0_prev))
        if sde:
            x_next = x_next + c["c"] * (c["noise"].astype(x.dtype) if "noise" in c else sampling.noise_like(k, x))
        return x_next, x0

    return _loop(step, x_T, x_start, inputs, key=key, carry=jnp.zeros_like(x_start),
                 return_trajectory=return_trajectory)


def dpm_solver_pp_sde(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                      walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False,
                      clip_x0=None, noise=None, final_first_order: bool | None = None, solver_type: str = "midpoint",
                      return_trajectory: bool = False):
    """diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"``, order 2
    (see ``dpm_coefficients``). x0 = (x - s eps) / alpha, or alpha x - s v. One evaluation per step;
    noise every step. ``final_first_order`` None: as diffusers' defaults (``lower_order_final``) decide,
    first order for a walk to 0 or one under 15 steps."""
    return _dpm("dpm_solver_pp_sde", True, model_fn, schedule, x_T, key, steps, timesteps, walk, prediction, karras,
                clip_x0, noise, final_first_order, solver_type, return_trajectory)


def dpm_solver_pp_2m(model_fn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                     walk: SigmaWalk | None = None, prediction: str = "epsilon", karras: bool = False,
                     clip_x0=None, final_first_order: bool | None = None, solver_type: str = "midpoint",
                     return_trajectory: bool = False):
    """diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, order 2) on its sigma
    walk, Karras sigmas included (``sampling.dpm_solver_pp`` walks integer grids only); deterministic.
    One evaluation per step."""
    return _dpm("dpm_solver_pp_2m", False, model_fn, schedule, x_T, key, steps, timesteps, walk, prediction, karras,
                clip_x0, None, final_first_order, solver_type, return_trajectory)


def _start(x_T, walk: SigmaWalk):
    """The first sample, x_T (standard normal) times the walk's ``init_sigma``, in the loop's dtype
    (float32 at least: a bfloat16 x_T is scaled without rounding to bfloat16 again)."""
    sampling.check_x_T(x_T)
    x = jnp.asarray(x_T)
    return x.astype(sampling.work_dtype(x)) * walk.init_sigma


def _loop(step, x_T, x_start, inputs, **kwargs):
    """``sampling.sample_loop`` from ``x_start``, the result (and trajectory) in x_T's dtype."""
    out = sampling.sample_loop(step, x_start, inputs, **kwargs)
    return jax.tree.map(lambda a: a.astype(x_T.dtype), out)
