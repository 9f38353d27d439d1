"""Samplers over an ``eps_fn(x_t, t) -> eps`` closure, each one ``lax.scan`` over timesteps.

Every sampler has one keyword signature::

    sampler(eps_fn, schedule, x_T, *, key=None, steps=..., timesteps=None, clip_x0=None,
            return_trajectory=False, **its own settings)

``timesteps`` (a strictly decreasing integer grid whose last value is the endpoint, 0 for clean
data) overrides ``steps`` + ``spacing``; the network is evaluated at every value but the last.
``key`` is one PRNG key or one per example (shape (B,)): with per-example keys, example i's noise
depends on its own key alone, not on the batch it was drawn in. Deterministic samplers ignore it.
With ``return_trajectory`` a sampler returns ``(x_0, xs)``, xs the states from x_T on, shape
(len(timesteps), B, ...).

Dtypes: ``x_T`` must be a floating-point array (an integer or bool ``x_T`` is refused with a
ValueError). The loop carries its state in float32, or in x_T's dtype where that is wider, whatever
``eps_fn`` returns, and the result (and trajectory) comes back in x_T's dtype: a bfloat16 or float16
``x_T`` runs the same in every sampler, with the sampler's own arithmetic in float32 (over tens of
steps bf16 rounding of the state would add up), while ``eps_fn`` decides its own compute dtype.
``key`` may be a typed key (``jax.random.key``) or a legacy uint32 key (``jax.random.PRNGKey``),
one or one per example; both give the same noise.

The samplers know nothing of labels, guidance or parameters. ``t`` reaches ``eps_fn`` as an int32
array of shape (B,), in 1..T (see ``jaxdiff.schedules``). Wrap the code that builds ``eps_fn``
in one ``jit`` so that a new key or condition reuses the compiled program::

    @jax.jit
    def generate(params, labels, key):
        eps_fn = guidance.cfg(model_eps(params), labels, null, gamma=3.0)
        return sampling.ddim(eps_fn, schedule, jax.random.normal(key, shape), steps=50)

A new sampler is a step function over ``predict`` and the public steps below, run by
``sample_loop``; ``SAMPLERS`` is the one table of names, settings and network evaluations.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.parametrization import eps_from_x0, x0_from_eps
from jaxdiff.schedules import Schedule, check_timesteps
from jaxdiff.schedules import timesteps as make_timesteps

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- building blocks


def predict(eps_fn: EpsFn, x, t, abar, clip_x0: float | None = None):
    """(eps, x0) predicted at x_t, with x0 optionally clipped to [-clip_x0, clip_x0] and eps made
    consistent with the clipped x0. ``t`` is a scalar timestep, ``abar`` its alpha_bar."""
    eps = eps_fn(x, jnp.full((x.shape[0],), t, dtype=jnp.int32))
    x0 = x0_from_eps(x, eps, alpha_bar=abar)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_x0(x, x0, alpha_bar=abar)
    return eps, x0


def noise_like(key, x):
    """Standard normal noise shaped like x. With one key per example (key of shape (B,)), row i
    comes from key i alone."""
    if jnp.ndim(key) == 0:
        return jax.random.normal(key, x.shape, x.dtype)
    return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)


def sample_loop(step, x_T, inputs, *, key=None, carry=None, return_trajectory: bool = False, after_step=None):
    """Run ``step(x, carry, inputs_i, key_i) -> (x, carry)`` over the leading axis of the pytree
    ``inputs`` in one ``lax.scan``. ``key_i`` is ``key`` folded with i (per example if ``key`` is
    per example; None if ``key`` is None). Returns x, or (x, trajectory) with x_T first.
    ``after_step(x, i) -> x`` edits each step's x before the next step reads it (inpainting with a
    text-to-image U-Net puts the known region back); a multistep sampler's carry is left as it was.

    The dtype rule of the module docstring: x_T floating, the state carried in ``work_dtype(x_T)``
    (x and each carry leaf keep the dtype they start with), the result cast back to x_T's dtype."""
    out_dtype = check_x_T(x_T)
    x_T = jnp.asarray(x_T).astype(work_dtype(x_T))
    key = None if key is None else as_key(key, x_T)
    n = jax.tree.leaves(inputs)[0].shape[0]
    index = jnp.arange(n)

    def body(state, scanned):
        x, c = state
        i, inp = scanned
        k = None if key is None else _fold(key, i)
        x_next, c_next = step(x, c, inp, k)
        x_next = x_next if after_step is None else after_step(x_next, i)
        c_next = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), c_next, c)
        return (x_next.astype(x.dtype), c_next), (x if return_trajectory else None)

    (x, _), xs = jax.lax.scan(body, (x_T, carry), (index, inputs))
    if return_trajectory:
        return x.astype(out_dtype), jnp.concatenate([xs, x[None]]).astype(out_dtype)
    return x.astype(out_dtype)


def check_x_T(x_T):
    """x_T's dtype, after checking that x_T is a floating-point array with a leading batch axis."""
    dtype = getattr(x_T, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"x_T must be a floating-point array (e.g. float32), got {dtype or type(x_T).__name__}")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must have a leading batch axis, got shape {x_T.shape}")
    return dtype


def work_dtype(x_T):
    """The dtype a sampler's state is carried in: float32, or x_T's if wider (float64 under x64)."""
    return jnp.promote_types(x_T.dtype, jnp.float32)


def as_key(key, x_T):
    """A typed PRNG key, one or one per example, from a typed key or a legacy uint32 key
    (``jax.random.PRNGKey``: its data in a trailing axis)."""
    if not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        data_shape = jax.random.key_data(jax.random.key(0)).shape
        if jnp.result_type(key) != jnp.uint32 or jnp.shape(key)[-1:] != data_shape:
            raise ValueError(f"key must be a PRNG key (jax.random.key(seed), or a legacy uint32 jax.random.PRNGKey of "
                             f"shape {data_shape}), one or one per example, got {jnp.result_type(key)} of shape "
                             f"{jnp.shape(key)}")
        key = jax.random.wrap_key_data(key)
    if jnp.ndim(key) not in (0, 1) or (jnp.ndim(key) == 1 and key.shape[0] != x_T.shape[0]):
        raise ValueError(f"key must be one PRNG key or one per example ({x_T.shape[0]}), got keys of shape "
                         f"{jnp.shape(key)}")
    return key


def _fold(key, i):
    return jax.random.fold_in(key, i) if jnp.ndim(key) == 0 else jax.vmap(jax.random.fold_in, (0, None))(key, i)


def ddpm_step(x, eps, *, beta, alpha, abar, sigma, noise):
    """One ancestral step: (x - beta / sqrt(1 - abar) eps) / sqrt(alpha) + sigma z."""
    return (x - beta / jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(alpha) + sigma * noise


def ddim_step(x0, eps, *, abar_t, abar_s, eta=0.0, noise=None):
    """One DDIM jump from t to s < t: sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s))."""
    if noise is None:
        return jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps
    sigma = eta * jnp.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
    return jnp.sqrt(abar_s) * x0 + jnp.sqrt(jnp.maximum(1 - abar_s - sigma**2, 0.0)) * eps + sigma * noise


def sigma_of(abar):
    """The noise level of the variance-exploding view, sigma = sqrt((1 - abar) / abar):
    x_t / sqrt(abar) = x0 + sigma eps."""
    return jnp.sqrt((1.0 - abar) / abar)


def euler_step(x, eps, *, abar_t, abar_s):
    """One Euler step of the probability-flow ODE in the variance-exploding view, d(x / sqrt(abar)) = eps d sigma."""
    return jnp.sqrt(abar_s) * (x / jnp.sqrt(abar_t) + (sigma_of(abar_s) - sigma_of(abar_t)) * eps)


def dpm_solver_pp_coefficients(schedule: Schedule, ts, *, final_first_order: bool = False) -> dict:
    """Per-step coefficients of DPM-Solver++(2M) on the grid ``ts`` (its endpoint last), computed once,
    outside the loop: x_s = ratio x + scale D, D = x0 + w (x0 - x0_prev).

    The first step is first order (w = 0), and so is a step to t = 0 (lambda there is infinite).
    ``final_first_order`` makes the last step first order whatever its endpoint, as diffusers'
    DPMSolverMultistepScheduler does on a "sigma_min" grid (endpoint t = 1) with ``euler_at_final``
    or with ``lower_order_final`` under 15 steps (``pretrained.scheduler.sampler_setup`` says which)."""
    if not isinstance(final_first_order, (bool, np.bool_)):
        raise ValueError(f"final_first_order must be True or False, got {final_first_order!r}")
    t, s = ts[:-1], ts[1:]
    abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t)
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1 - abar_s)
    lam_t = jnp.log(alpha_t / sigma_t)
    final = s == 0
    # lambda at t = 0 is +inf; a step to t = 0 is first order, so its h is never used
    lam_s = jnp.where(final, 0.0, jnp.log(alpha_s / jnp.where(final, 1.0, sigma_s)))
    h = lam_s - lam_t
    h_prev = jnp.concatenate([jnp.ones((1,)), h[:-1]])
    first = jnp.arange(len(t)) == 0
    last = (jnp.arange(len(t)) == len(t) - 1) & bool(final_first_order)
    return dict(t=jnp.asarray(t), abar=abar_t, ratio=sigma_s / sigma_t, scale=alpha_s - alpha_t * sigma_s / sigma_t,
                w=jnp.where(first | final | last, 0.0, h / (2 * h_prev)))


def dpm_solver_pp_step(x, x0, x0_prev, *, ratio, scale, w):
    """One DPM-Solver++(2M) step: the data prediction extrapolated from the last two, then the exact
    linear part: x_s = (sigma_s / sigma_t) x + (alpha_s - alpha_t sigma_s / sigma_t) D."""
    return ratio * x + scale * (x0 + w * (x0 - x0_prev))


# ----------------------------------------------------------------------------- samplers


def _is_real(v) -> bool:
    """A concrete real number: Python's or NumPy's (np.float32 is no float), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_common(x_T, clip_x0):
    """x_T checked (the dtype rule), and clip_x0 as a float or None."""
    check_x_T(x_T)
    if clip_x0 is None:
        return None
    if not (_is_real(clip_x0) and math.isfinite(clip_x0) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive number, got {clip_x0!r}")
    return float(clip_x0)


def _grid(schedule, steps, timesteps, spacing):
    if timesteps is not None:
        return check_timesteps(schedule, timesteps)
    return make_timesteps(schedule, steps, spacing)


def _check_key(key, name, x_T):
    if key is None:
        raise ValueError(f"{name} draws noise: pass key= (one PRNG key, or one per example)")
    return as_key(key, x_T)


def _check_eta(eta) -> float:
    if not (_is_real(eta) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def ddpm(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, clip_x0=None, variance: str = "beta",
         return_trajectory: bool = False):
    """Ancestral sampling over all T steps, the textbook's ``denoise`` in a scan.

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, with no noise
    at t = 1. ``variance="beta"`` is sigma_t^2 = beta_t (the textbook's);
    ``"posterior"`` is beta_t (1 - abar_{t-1}) / (1 - abar_t).
    """
    clip_x0 = _check_common(x_T, clip_x0)
    key = _check_key(key, "ddpm", x_T)
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    ts = jnp.arange(schedule.num_timesteps, 0, -1, dtype=jnp.int32)
    abar, abar_prev = schedule.alpha_bar(ts), schedule.alpha_bar(ts - 1)
    beta = schedule.betas[ts - 1]
    var = beta if variance == "beta" else beta * (1.0 - abar_prev) / (1.0 - abar)
    sigma = jnp.where(ts > 1, jnp.sqrt(var), 0.0)

    def step(x, _, inp, k):
        t, ab, b, a, sg = inp
        eps, _ = predict(eps_fn, x, t, ab, clip_x0)
        return ddpm_step(x, eps, beta=b, alpha=a, abar=ab, sigma=sg.astype(x.dtype), noise=noise_like(k, x)), None

    return sample_loop(step, x_T, (ts, abar, beta, schedule.alphas[ts - 1], sigma), key=key,
                       return_trajectory=return_trajectory)


def ddim(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None, eta: float = 0.0,
         clip_x0=None, spacing: str = "uniform", return_trajectory: bool = False, after_step=None):
    """DDIM (Song et al.): eta = 0 is deterministic (the probability-flow ODE, first order),
    eta = 1 matches DDPM's posterior variance at each jump."""
    clip_x0 = _check_common(x_T, clip_x0)
    eta = _check_eta(eta)
    if eta > 0:
        key = _check_key(key, "ddim with eta > 0", x_T)
    ts = _grid(schedule, steps, timesteps, spacing)
    t, s = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])

    def step(x, _, inp, k):
        t, ab_t, ab_s = inp
        eps, x0 = predict(eps_fn, x, t, ab_t, clip_x0)
        noise = noise_like(k, x) if eta > 0 else None
        return ddim_step(x0, eps, abar_t=ab_t, abar_s=ab_s, eta=eta, noise=noise), None

    return sample_loop(step, x_T, (t, schedule.alpha_bar(t), schedule.alpha_bar(s)), key=key if eta > 0 else None,
                       return_trajectory=return_trajectory, after_step=after_step)


def dpm_solver_pp(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int = 20, timesteps=None, clip_x0=None,
                  spacing: str = "logsnr", final_first_order: bool = False, return_trajectory: bool = False,
                  after_step=None):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in the data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_s - lambda_t, one step from t to s is
    x_s = sigma_s / sigma_t x_t + (alpha_s - alpha_t sigma_s / sigma_t) D, where
    D = x0_t + h / (2 h_prev) (x0_t - x0_prev). The first step and a step to t = 0 are first
    order, so the last returns D = x0_t itself; ``final_first_order`` makes the last step first
    order on any grid (see ``dpm_solver_pp_coefficients``).
    """
    clip_x0 = _check_common(x_T, clip_x0)
    coef = dpm_solver_pp_coefficients(schedule, _grid(schedule, steps, timesteps, spacing),
                                      final_first_order=final_first_order)

    def step(x, x0_prev, c, _):
        _, x0 = predict(eps_fn, x, c["t"], c["abar"], clip_x0)
        return dpm_solver_pp_step(x, x0, x0_prev, ratio=c["ratio"], scale=c["scale"], w=c["w"]), x0

    return sample_loop(step, x_T, coef, carry=jnp.zeros(jnp.shape(x_T), work_dtype(x_T)),
                       return_trajectory=return_trajectory, after_step=after_step)


def euler(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int = 20, timesteps=None, clip_x0=None,
          spacing: str = "logsnr", return_trajectory: bool = False):
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - abar) / abar) (Karras et al.'s
    and k-diffusion's ``sample_euler``): the same path as DDIM with eta = 0, derived apart."""
    clip_x0 = _check_common(x_T, clip_x0)
    ts = _grid(schedule, steps, timesteps, spacing)
    t, s = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])

    def step(x, _, inp, k):
        t, ab_t, ab_s = inp
        eps, _ = predict(eps_fn, x, t, ab_t, clip_x0)
        return euler_step(x, eps, abar_t=ab_t, abar_s=ab_s), None

    return sample_loop(step, x_T, (t, schedule.alpha_bar(t), schedule.alpha_bar(s)),
                       return_trajectory=return_trajectory)


def heun(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int = 18, timesteps=None, clip_x0=None,
         spacing: str = "logsnr", return_trajectory: bool = False):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): an Euler step,
    then the trapezoid of the slopes at both ends. The step to t = 0 stays Euler; its second
    evaluation is computed (at t = 1) and discarded, since a ``jnp.where`` replaces a branch in
    the loop, so it costs 2 * steps network evaluations."""
    clip_x0 = _check_common(x_T, clip_x0)
    ts = _grid(schedule, steps, timesteps, spacing)
    t, s = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])

    def step(x, _, inp, k):
        t, s, ab_t, ab_s = inp
        eps, _ = predict(eps_fn, x, t, ab_t, clip_x0)
        x_euler = euler_step(x, eps, abar_t=ab_t, abar_s=ab_s)
        eps_s, _ = predict(eps_fn, x_euler, jnp.maximum(s, 1), schedule.alpha_bar(jnp.maximum(s, 1)), clip_x0)
        x_heun = euler_step(x, 0.5 * (eps + eps_s), abar_t=ab_t, abar_s=ab_s)
        return jnp.where(s > 0, x_heun, x_euler), None

    return sample_loop(step, x_T, (t, s, schedule.alpha_bar(t), schedule.alpha_bar(s)),
                       return_trajectory=return_trajectory)


def euler_ancestral(eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int = 50, timesteps=None,
                    eta: float = 1.0, clip_x0=None, spacing: str = "uniform", return_trajectory: bool = False):
    """k-diffusion's ``sample_euler_ancestral``: from sigma_t down to sigma_down by Euler, then fresh
    noise up to sigma_s, sigma_up = min(sigma_s, eta sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2)).
    With eta = 1 it is DDIM with eta = 1 in other coordinates."""
    clip_x0 = _check_common(x_T, clip_x0)
    eta = _check_eta(eta)
    key = _check_key(key, "euler_ancestral", x_T)
    ts = _grid(schedule, steps, timesteps, spacing)
    t, s = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])

    def step(x, _, inp, k):
        t, ab_t, ab_s = inp
        eps, _ = predict(eps_fn, x, t, ab_t, clip_x0)
        sig_t, sig_s = sigma_of(ab_t), sigma_of(ab_s)
        up = jnp.minimum(sig_s, eta * jnp.sqrt(sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2))
        down = jnp.sqrt(sig_s**2 - up**2)
        x_ve = x / jnp.sqrt(ab_t) + (down - sig_t) * eps + up * noise_like(k, x)
        return jnp.sqrt(ab_s) * x_ve, None

    return sample_loop(step, x_T, (t, schedule.alpha_bar(t), schedule.alpha_bar(s)), key=key,
                       return_trajectory=return_trajectory)


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """What a sampler is and costs. ``evals_per_step`` network evaluations per step (a guided
    evaluation's doubled batch counts once); DDPM always walks all T steps."""

    name: str
    fn: Callable
    default_steps: int | None  # None: takes no steps (all T)
    stochastic: bool  # draws noise, needs a key
    takes_eta: bool = False
    evals_per_step: int = 1

    def nfe(self, steps: int | None, schedule: Schedule) -> int:
        n = schedule.num_timesteps if self.default_steps is None else (
            self.default_steps if steps is None else check_steps(steps))
        return self.evals_per_step * n


SAMPLERS = {
    info.name: info
    for info in [
        SamplerInfo("ddpm", ddpm, None, stochastic=True),
        SamplerInfo("ddim", ddim, 50, stochastic=False, takes_eta=True),
        SamplerInfo("dpm++", dpm_solver_pp, 20, stochastic=False),
        SamplerInfo("euler", euler, 20, stochastic=False),
        SamplerInfo("heun", heun, 18, stochastic=False, evals_per_step=2),
        SamplerInfo("euler_a", euler_ancestral, 50, stochastic=True, takes_eta=True),
    ]
}


def get(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {tuple(SAMPLERS)}")
    return SAMPLERS[name]


def nfe(name: str, steps: int | None, schedule: Schedule) -> int:
    """Network evaluations per sample of sampler ``name`` at ``steps``."""
    return get(name).nfe(steps, schedule)


def run(name: str, eps_fn: EpsFn, schedule: Schedule, x_T, *, key=None, steps: int | None = None, timesteps=None,
        eta: float | None = None, clip_x0=None, **kwargs):
    """Call sampler ``name`` with only the settings it takes (DDPM ignores steps, only DDIM and
    Euler ancestral take eta, only the stochastic ones a key). ``steps=None`` is the sampler's
    default; any other value must be a positive integer, even where DDPM ignores it."""
    info = get(name)
    if steps is not None:
        steps = check_steps(steps)
    if info.default_steps is not None:
        kwargs["timesteps"] = timesteps
        kwargs["steps"] = info.default_steps if steps is None else steps
    if info.takes_eta and eta is not None:
        kwargs["eta"] = eta
    return info.fn(eps_fn, schedule, x_T, key=key, clip_x0=clip_x0, **kwargs)


def check_steps(steps, name: str = "steps") -> int:
    """A step count from a caller: a positive integer (not a bool, not 2.7)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")
    return int(steps)
