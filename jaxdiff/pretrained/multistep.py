"""diffusers' PNDM (PLMS, and its Runge-Kutta warm-up) and UniPC, step for step, over an eps closure.

Each sampler is two halves. ``*_plan`` (NumPy, float64, before any tracing) replays the diffusers
scheduler's state machine (its counters, its history list, its order warm-up and lower-order final
step) once for a step count and turns it into per-evaluation tables: which timestep the network sees,
and the weights that combine the current and the remembered outputs. ``*_walk`` runs those tables as
one ``sampling.sample_loop`` (one ``lax.scan``): no branch in the loop, the per-step choices are
``jnp.where`` on table flags.

What the network "outputs" matters: diffusers combines the raw model outputs (eps, or v for a
v-prediction model) before it converts them, so a v model's PLMS step is not the same as combining
eps. jaxdiff's samplers receive eps (the pipeline converts v at the evaluation's own t), so the walks
recover the raw output from eps at that t, combine it as diffusers does, and convert the result with
the step's own sample and timestep.

Timesteps: diffusers' tau is jaxdiff's t - 1 (``jaxdiff.schedules``); the tables hold jaxdiff's t.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff import sampling
from jaxdiff.pretrained.scheduler import SchedulerConfigError

PREDICTIONS = ("epsilon", "v_prediction")


def _raw(eps, x, abar, prediction):
    """The network's own output from the eps the sampler sees (eps = sqrt(abar) v + sqrt(1 - abar) x)."""
    if prediction == "epsilon":
        return eps
    return (eps - jnp.sqrt(1.0 - abar) * x) / jnp.sqrt(abar)


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise SchedulerConfigError(f"prediction_type must be one of {PREDICTIONS}, got {prediction!r}")


# ----------------------------------------------------------------------------- PNDM


def pndm_taus(settings: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(Runge-Kutta taus, PLMS taus) as ``PNDMScheduler.set_timesteps`` lists them."""
    T, spacing, offset = settings["num_train_timesteps"], settings["timestep_spacing"], settings["steps_offset"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        ts = np.arange(steps, dtype=np.int64) * (T // steps) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps))[::-1].astype(np.int64) - 1
    else:
        raise SchedulerConfigError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    if settings["skip_prk_steps"]:
        return np.zeros(0, np.int64), np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    if steps < 4:
        raise SchedulerConfigError(f"PNDM with skip_prk_steps=False needs at least 4 steps (its Runge-Kutta warm-up "
                                   f"walks the last 4), got {steps}")
    prk = np.repeat(ts[-4:], 2) + np.tile([0, T // steps // 2], 4)
    return np.repeat(prk[:-1], 2)[1:-1][::-1], ts[:-3][::-1]


def pndm_plan(settings: dict, steps: int, start: int = 0) -> dict:
    """Per-evaluation tables of ``PNDMScheduler`` (``step_prk`` then ``step_plms``) at ``steps`` steps.
    ``start``: image-to-image, diffusers' ``timesteps[start:]`` walked by a scheduler whose counter starts
    at 0 there (so the warm-up runs again on the tail, as diffusers' img2img pipeline does).

    Each evaluation j sees the network at ``t[j]`` and moves a source sample (the current one, or the
    one saved at the start of a Runge-Kutta group / the first PLMS step) from ``t_src`` to ``t_dst`` by
    PNDM's transfer with out = w . (r, h1, h2, h3, acc): r the raw output now, h the last three pushed
    ones, acc the Runge-Kutta accumulator."""
    T = settings["num_train_timesteps"]
    prk, plms = pndm_taus(settings, steps)
    taus = np.concatenate([prk, plms]).astype(np.int64)[start:]
    final = -1 if settings["set_alpha_to_one"] else 0  # jaxdiff's t of diffusers' final_alpha_cumprod, less one
    rows = {k: [] for k in ("t", "t_src", "t_dst", "w", "acc_keep", "acc_add", "push", "save", "use_saved")}
    ets = 0  # how many outputs diffusers' ets list holds (only the last 4 are read)
    for c, tau in enumerate(taus):
        w, keep, add, push, save, use_saved = [0.0] * 5, 1.0, 0.0, False, False, False
        if c < len(prk):
            half = T // steps // 2
            t_src, t_dst = prk[c // 4 * 4], tau - (0 if c % 2 else half)
            use_saved = True
            if c % 4 == 0:
                w[0], add, keep, push, save = 1.0, 1 / 6, 1.0, True, True
                ets += 1
            elif c % 4 in (1, 2):
                w[0], add = 1.0, 1 / 3
            else:
                w[0], w[4], keep = 1 / 6, 1.0, 0.0
        else:
            t_src, t_dst = tau, tau - T // steps
            if c != 1:
                ets, push = ets + 1, True
            else:
                t_src, t_dst = tau + T // steps, tau
            if ets == 1 and c == 0:
                w[0], save = 1.0, True
            elif ets == 1 and c == 1:
                w[0], w[1], use_saved = 0.5, 0.5, True
            elif ets == 2:
                w[0], w[1] = 1.5, -0.5
            elif ets == 3:
                w[0], w[1], w[2] = 23 / 12, -16 / 12, 5 / 12
            else:
                w[0], w[1], w[2], w[3] = 55 / 24, -59 / 24, 37 / 24, -9 / 24
        rows["t"].append(tau + 1)
        rows["t_src"].append(t_src + 1)
        rows["t_dst"].append(t_dst + 1 if t_dst >= 0 else final + 1)
        for k, v in (("w", w), ("acc_keep", keep), ("acc_add", add), ("push", push), ("save", save),
                     ("use_saved", use_saved)):
            rows[k].append(v)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["taus"] = taus
    return out


def pndm_walk(eps_fn, schedule, x_T, plan: dict, *, prediction: str = "epsilon", return_trajectory: bool = False):
    """Run ``pndm_plan``'s tables: diffusers' PNDMScheduler, one evaluation per table row."""
    _check_prediction(prediction)
    a_t = schedule.alpha_bar(jnp.asarray(plan["t"]))
    a_src = schedule.alpha_bar(jnp.asarray(plan["t_src"]))
    a_dst = schedule.alpha_bar(jnp.asarray(plan["t_dst"]))
    # PNDM's transfer (its paper's eq. 9): x_dst = sqrt(a_dst / a_src) x_src - (a_dst - a_src) eps / denom
    k_eps = -(a_dst - a_src) / (a_src * jnp.sqrt(1 - a_dst) + jnp.sqrt(a_src * (1 - a_src) * a_dst))
    k_x = jnp.sqrt(a_dst / a_src)
    if prediction == "v_prediction":  # eps = sqrt(a_src) v + sqrt(1 - a_src) x_src
        k_x, k_out = k_x + k_eps * jnp.sqrt(1 - a_src), k_eps * jnp.sqrt(a_src)
    else:
        k_out = k_eps
    inputs = dict(t=jnp.asarray(plan["t"], jnp.int32), a_t=a_t, w=jnp.asarray(plan["w"], jnp.float32),
                  keep=jnp.asarray(plan["acc_keep"], jnp.float32), add=jnp.asarray(plan["acc_add"], jnp.float32),
                  push=jnp.asarray(plan["push"]), save=jnp.asarray(plan["save"]),
                  use_saved=jnp.asarray(plan["use_saved"]), k_x=k_x, k_out=k_out)

    def step(x, carry, c, _):
        hist, acc, saved = carry
        eps, _ = sampling.predict(eps_fn, x, c["t"], c["a_t"])
        r = _raw(eps, x, c["a_t"], prediction)
        w = c["w"]
        out = w[0] * r + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2] + w[4] * acc
        saved = jnp.where(c["save"], x, saved)
        src = jnp.where(c["use_saved"], saved, x)
        hist = jnp.where(c["push"], jnp.concatenate([r[None], hist[:-1]]), hist)
        return c["k_x"] * src + c["k_out"] * out, (hist, c["keep"] * acc + c["add"] * r, saved)

    dtype = sampling.work_dtype(x_T)
    shape = jnp.shape(x_T)
    carry = (jnp.zeros((3, *shape), dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return sampling.sample_loop(step, x_T, inputs, carry=carry, return_trajectory=return_trajectory)


# ----------------------------------------------------------------------------- UniPC


def _multistep_taus(settings: dict, steps: int) -> np.ndarray:
    T, spacing, offset = settings["num_train_timesteps"], settings["timestep_spacing"], settings["steps_offset"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(steps + 1, dtype=np.int64) * (T // (steps + 1)))[::-1][:-1] + offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    raise SchedulerConfigError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def karras_sigmas(settings: dict, abar: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(taus, sigmas) of diffusers' ``use_karras_sigmas``: Karras et al.'s rho = 7 ramp between the
    schedule's extreme sigmas (or the config's sigma_min / sigma_max), each mapped back to the nearest
    training timestep by log-sigma interpolation (the network sees that timestep; the solver, the sigma)."""
    sig = np.sqrt((1 - abar) / abar)
    log_sig = np.log(sig)
    lo = settings.get("sigma_min") if settings.get("sigma_min") is not None else sig[0]
    hi = settings.get("sigma_max") if settings.get("sigma_max") is not None else sig[-1]
    ramp = np.linspace(0, 1, steps)
    sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    taus = np.array([_sigma_to_tau(s, log_sig) for s in sigmas]).round().astype(np.int64)
    return taus, sigmas


def _sigma_to_tau(sigma: float, log_sig: np.ndarray) -> float:
    """The fractional training timestep whose log sigma is log(sigma), by linear interpolation."""
    ls = math.log(max(sigma, 1e-10))
    low = int(np.clip(np.sum(ls - log_sig >= 0) - 1, 0, len(log_sig) - 2))
    w = np.clip((log_sig[low] - ls) / (log_sig[low] - log_sig[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def unipc_plan(settings: dict, abar: np.ndarray, steps: int, start: int = 0) -> dict:
    """Per-step tables of ``UniPCMultistepScheduler`` (predict_x0, B(h) = "bh1" or "bh2") at ``steps`` steps.

    ``abar``: the training alphas_cumprod, indexed by diffusers' tau. Step i evaluates the network at
    ``t[i]``, turns it into the data prediction m_i with the step's (alpha, sigma), corrects the sample
    (UniC, order of the previous predictor) unless i = 0 or corrector i - 1 is disabled, and predicts
    the next one (UniP): x' = pA x + pB m_i + sum_k pC_k (m_{i-k} - m_i); the corrector reads
    cA x_prev + cB m_{i-1} + sum_k cC_k (m_{i-1-k} - m_{i-1}) + cD (m_i - m_{i-1}). ``start``: image-to-image,
    the steps from ``start`` on, the order warm-up starting again there (diffusers' ``set_begin_index``)."""
    K = settings["solver_order"]
    if settings["use_karras_sigmas"]:
        taus, sig = karras_sigmas(settings, abar, steps)
        last = sig[-1]
    else:
        taus = _multistep_taus(settings, steps)
        sig_all = np.sqrt((1 - abar) / abar)
        sig = np.interp(taus, np.arange(len(sig_all)), sig_all)
        last = sig_all[0]
    if np.any(taus < 0) or np.any(taus > len(abar) - 1):
        raise SchedulerConfigError(f"UniPC at {steps} steps gives timesteps outside 0..{len(abar) - 1}: {taus}")
    sig = np.append(sig, 0.0 if settings["final_sigmas_type"] == "zero" else last)
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    n = len(taus)
    bh2 = settings["solver_type"] == "bh2"

    def coefficients(h, rks, order, predictor):
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = np.expm1(hh) if bh2 else hh
        R, b, h_phi_k, fact = [], [], h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            R.append(np.asarray(rks) ** (i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = np.array(R), np.array(b)
        if predictor:
            rhos = [] if order == 1 else ([0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]))
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
        return h_phi_1, b_h, np.asarray(rhos, np.float64)

    orders = [min(min(K, n - i) if settings["lower_order_final"] else K, min(i - start, K) + 1) for i in range(n)]
    disabled = set(settings["disable_corrector"])
    tab = {k: np.zeros(n) for k in ("pA", "pB", "cA", "cB", "cD", "use_c")}
    tab["pC"], tab["cC"] = np.zeros((n, max(K - 1, 1))), np.zeros((n, max(K - 1, 1)))
    with np.errstate(all="ignore"):
        for i in range(start, n):
            p = orders[i]
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
            h_phi_1, b_h, rhos = coefficients(h, rks, p, True)
            tab["pA"][i] = sigma[i + 1] / sigma[i]
            tab["pB"][i] = -alpha[i + 1] * h_phi_1
            for k in range(1, p):
                tab["pC"][i, k - 1] = -alpha[i + 1] * b_h * rhos[k - 1] / rks[k - 1]
            if i > start and (i - 1) not in disabled:
                q = orders[i - 1]
                h = lam[i] - lam[i - 1]
                rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, q)] + [1.0]
                h_phi_1, b_h, rhos = coefficients(h, rks, q, False)
                tab["use_c"][i] = 1.0
                tab["cA"][i] = sigma[i] / sigma[i - 1]
                tab["cB"][i] = -alpha[i] * h_phi_1
                for k in range(1, q):
                    tab["cC"][i, k - 1] = -alpha[i] * b_h * rhos[k - 1] / rks[k - 1]
                tab["cD"][i] = -alpha[i] * b_h * rhos[-1]
    bad = [k for k, v in tab.items() if not np.all(np.isfinite(v))]
    if bad:
        raise SchedulerConfigError(f"UniPC at {steps} steps with these settings divides by an infinite or zero step "
                                   f"({', '.join(bad)}); diffusers' own run is not finite either; use "
                                   f"lower_order_final=True or final_sigmas_type='sigma_min'")
    tab.update(t=taus + 1, taus=taus, alpha=alpha[:-1], sigma=sigma[:-1], orders=np.asarray(orders))
    return {k: v[start:] for k, v in tab.items()}


def unipc_walk(eps_fn, schedule, x_T, plan: dict, *, prediction: str = "epsilon", return_trajectory: bool = False):
    """Run ``unipc_plan``'s tables: diffusers' UniPCMultistepScheduler (predict_x0), one evaluation per step."""
    _check_prediction(prediction)
    f32 = lambda k: jnp.asarray(plan[k], jnp.float32)
    inputs = dict(t=jnp.asarray(plan["t"], jnp.int32), a_t=schedule.alpha_bar(jnp.asarray(plan["t"])),
                  **{k: f32(k) for k in ("alpha", "sigma", "pA", "pB", "pC", "cA", "cB", "cC", "cD")},
                  use_c=jnp.asarray(plan["use_c"]) > 0)
    K = plan["pC"].shape[1] + 1

    def step(x, carry, c, _):
        last, ms = carry  # the corrected sample of the step before, the data predictions m_{i-1}, m_{i-2}, ...
        eps, _ = sampling.predict(eps_fn, x, c["t"], c["a_t"])
        r = _raw(eps, x, c["a_t"], prediction)
        # diffusers converts with the step's own (alpha, sigma), the Karras sigma's where that is not t's
        m = (x - c["sigma"] * r) / c["alpha"] if prediction == "epsilon" else c["alpha"] * x - c["sigma"] * r
        corr = c["cA"] * last + c["cB"] * ms[0] + c["cD"] * (m - ms[0])
        for k in range(1, K):
            corr = corr + c["cC"][k - 1] * (ms[k] - ms[0])
        x = jnp.where(c["use_c"], corr, x)
        ms = jnp.concatenate([m[None], ms[:-1]])
        nxt = c["pA"] * x + c["pB"] * m
        for k in range(1, K):
            nxt = nxt + c["pC"][k - 1] * (ms[k] - m)
        return nxt, (x, ms)

    dtype = sampling.work_dtype(x_T)
    shape = jnp.shape(x_T)
    carry = (jnp.zeros(shape, dtype), jnp.zeros((K, *shape), dtype))
    return sampling.sample_loop(step, x_T, inputs, carry=carry, return_trajectory=return_trajectory)
