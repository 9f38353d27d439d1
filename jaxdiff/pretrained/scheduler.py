"""A diffusers ``scheduler_config.json`` -> jaxdiff's Schedule, prediction type and timestep grids.

Timesteps: jaxdiff's t is 1..T with ``alpha_bars[t - 1]`` (see ``jaxdiff.schedules``); diffusers'
tau is 0-indexed, so t = tau + 1. A grid from ``inference_timesteps`` is strictly decreasing and its
LAST element is the endpoint the sampler steps to without evaluating the network there: 0 is clean
data, 1 is diffusers' ``alphas_cumprod[0]`` (DDIM with ``set_alpha_to_one=False``, DPM-Solver with
``final_sigmas_type="sigma_min"``).

Sampler settings: a pipeline that swaps its scheduler in diffusers writes
``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``. Since diffusers records which
keys it filled from its own defaults (``_use_default_values``) and drops them in ``from_config``,
that is the same as: the keys written in the file, and the new class's defaults for every other
key (``PNDMScheduler``'s default ``timestep_spacing="leading"`` does NOT carry over into
DPM-Solver's "linspace"; a file saved by ``save_pretrained``, which writes every key, does carry
it). ``sampler_settings`` resolves exactly that; keyword overrides play ``from_config(config, **kw)``.

What is checked: the class (``_class_name``) must be one of ``SUPPORTED_CLASSES``, the diffusers
schedulers over the same discrete beta schedule (a flow-matching or EDM scheduler is refused, not
read as default betas). A key that none of those classes takes is named in one ``warning:`` line on
stderr with the closest known key, and otherwise ignored, as diffusers itself ignores it (with a
logged warning), so a folder that loads in diffusers loads here; an unknown key passed as a keyword
override is a caller's typo and raises. The keys jaxdiff reads must have their JSON type
(``beta_start: "abc"`` raises, naming beta_start).
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxdiff import schedules, sigma_sampling
from jaxdiff.pretrained.folder import read_json
from jaxdiff.schedules import Schedule, brief


class SchedulerConfigError(ValueError):
    """A scheduler config (or sampler setting) jaxdiff cannot reproduce."""


# The defaults of the diffusers classes (0.42.1) for the keys read here; tests check them against
# the signatures recorded by tests/fixtures/make_scheduler_fixtures.py.
COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}
DDIM_DEFAULTS = {
    **COMMON_DEFAULTS,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}
DPM_DEFAULTS = {
    **COMMON_DEFAULTS,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_dynamic_shifting": False,
}
PNDM_DEFAULTS = {
    **COMMON_DEFAULTS,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
UNIPC_DEFAULTS = {
    **COMMON_DEFAULTS,
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "sigma_min": None,
    "sigma_max": None,
}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
EULER_DEFAULTS = {
    **COMMON_DEFAULTS,
    **_SIGMA_KINDS,
    "interpolation_type": "linear",
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
}
EULER_ANCESTRAL_DEFAULTS = {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "steps_offset": 0}
HEUN_DEFAULTS = {
    **COMMON_DEFAULTS,
    **_SIGMA_KINDS,
    "beta_start": 0.00085,  # Heun's own defaults differ from the other classes'
    "beta_end": 0.012,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
LMS_DEFAULTS = {**COMMON_DEFAULTS, **_SIGMA_KINDS, "timestep_spacing": "linspace", "steps_offset": 0}
# jaxdiff sampler name -> (the diffusers class it reproduces, that class's defaults)
SAMPLERS = {
    "ddim": ("DDIMScheduler", DDIM_DEFAULTS),
    "dpm_solver_pp": ("DPMSolverMultistepScheduler", DPM_DEFAULTS),
    "pndm": ("PNDMScheduler", PNDM_DEFAULTS),
    "unipc": ("UniPCMultistepScheduler", UNIPC_DEFAULTS),
    # the sigma-space walks of jaxdiff.sigma_sampling (``sigma_setup``)
    "euler_discrete": ("EulerDiscreteScheduler", EULER_DEFAULTS),
    "euler_ancestral_discrete": ("EulerAncestralDiscreteScheduler", EULER_ANCESTRAL_DEFAULTS),
    "heun_discrete": ("HeunDiscreteScheduler", HEUN_DEFAULTS),
    "lms_discrete": ("LMSDiscreteScheduler", LMS_DEFAULTS),
    # DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++")
    "dpm_solver_pp_sde": ("DPMSolverMultistepScheduler", DPM_DEFAULTS),
    # the same class with algorithm_type="dpmsolver++" on its sigma walk (dpm_solver_pp's grid cannot hold Karras)
    "dpm_solver_pp_2m": ("DPMSolverMultistepScheduler", DPM_DEFAULTS),
}
SIGMA_SAMPLERS = ("euler_discrete", "euler_ancestral_discrete", "heun_discrete", "lms_discrete", "dpm_solver_pp_sde",
                  "dpm_solver_pp_2m")
_ALGORITHM = {"dpm_solver_pp_sde": "sde-dpmsolver++", "dpm_solver_pp_2m": "dpmsolver++"}
_ALIASES = {}
for _name, (_cls, _) in SAMPLERS.items():
    _ALIASES.setdefault(_cls, _name)  # a class names its first sampler: DPMSolverMultistepScheduler -> dpm_solver_pp

# The diffusers classes (0.42.1) whose config is a discrete beta schedule read as jaxdiff reads it,
# each with the keys its constructor takes (recorded by make_scheduler_fixtures.py; a test compares).
_BETAS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_THRESHOLD = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
_FLOW = ("use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type")
_SPACING = ("timestep_spacing", "steps_offset")
CLASS_KEYS = {
    "DDPMScheduler": (*_BETAS, *_THRESHOLD, *_SPACING, "variance_type", "clip_sample", "clip_sample_range",
                      "rescale_betas_zero_snr"),
    "DDIMScheduler": (*_BETAS, *_THRESHOLD, *_SPACING, "clip_sample", "set_alpha_to_one", "clip_sample_range",
                      "rescale_betas_zero_snr"),
    "PNDMScheduler": (*_BETAS, *_SPACING, "skip_prk_steps", "set_alpha_to_one"),
    "LMSDiscreteScheduler": (*_BETAS, *_SIGMAS, *_SPACING),
    "EulerDiscreteScheduler": (*_BETAS, *_SIGMAS, *_SPACING, "interpolation_type", "sigma_min", "sigma_max",
                               "timestep_type", "rescale_betas_zero_snr", "final_sigmas_type"),
    "EulerAncestralDiscreteScheduler": (*_BETAS, *_SPACING, "rescale_betas_zero_snr"),
    "HeunDiscreteScheduler": (*_BETAS, *_SIGMAS, *_SPACING, "clip_sample", "clip_sample_range"),
    "DPMSolverMultistepScheduler": (*_BETAS, *_THRESHOLD, *_SIGMAS, *_FLOW, *_SPACING, "solver_order",
                                    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                                    "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped", "variance_type",
                                    "rescale_betas_zero_snr"),
    "DPMSolverSinglestepScheduler": (*_BETAS, *_THRESHOLD, *_SIGMAS, *_FLOW, "solver_order", "algorithm_type",
                                     "solver_type", "lower_order_final", "final_sigmas_type", "lambda_min_clipped",
                                     "variance_type"),
    "KDPM2DiscreteScheduler": (*_BETAS, *_SIGMAS, *_SPACING),
    "KDPM2AncestralDiscreteScheduler": (*_BETAS, *_SIGMAS, *_SPACING),
    "DEISMultistepScheduler": (*_BETAS, *_THRESHOLD, *_SIGMAS, *_FLOW, *_SPACING, "solver_order", "algorithm_type",
                               "solver_type", "lower_order_final"),
    "UniPCMultistepScheduler": (*_BETAS, *_THRESHOLD, *_SIGMAS, *_FLOW, *_SPACING, "solver_order", "predict_x0",
                                "solver_type", "lower_order_final", "disable_corrector", "solver_p",
                                "final_sigmas_type", "rescale_betas_zero_snr", "sigma_min", "sigma_max",
                                "shift_terminal"),
}
SUPPORTED_CLASSES = tuple(CLASS_KEYS)
KNOWN_KEYS = frozenset(k for keys in CLASS_KEYS.values() for k in keys)

# The JSON type of each key jaxdiff reads: (accepts, what to say).
_REAL = (lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)), "a number")
_INT = (lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)), "an integer")
_BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_TYPES = {
    "num_train_timesteps": _INT, "beta_start": _REAL, "beta_end": _REAL, "beta_schedule": _STR,
    "trained_betas": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(_REAL[0](b) for b in v)),
                      "null or a list of numbers"),
    "prediction_type": _STR, "thresholding": _BOOL, "rescale_betas_zero_snr": _BOOL, "clip_sample": _BOOL,
    "clip_sample_range": _REAL, "set_alpha_to_one": _BOOL, "steps_offset": _INT, "timestep_spacing": _STR,
    "solver_order": _INT, "algorithm_type": _STR, "solver_type": _STR, "lower_order_final": _BOOL,
    "euler_at_final": _BOOL, "use_karras_sigmas": _BOOL, "use_exponential_sigmas": _BOOL, "use_beta_sigmas": _BOOL,
    "use_lu_lambdas": _BOOL, "use_flow_sigmas": _BOOL, "final_sigmas_type": _STR, "lambda_min_clipped": _REAL,
    "variance_type": (lambda v: v is None or isinstance(v, str), "null or a string"), "use_dynamic_shifting": _BOOL,
    "skip_prk_steps": _BOOL, "predict_x0": _BOOL,
    "disable_corrector": (lambda v: isinstance(v, (list, tuple)) and all(_INT[0](i) for i in v), "a list of integers"),
    "interpolation_type": _STR, "timestep_type": _STR,
    "sigma_min": (lambda v: v is None or _REAL[0](v), "null or a number"),
    "sigma_max": (lambda v: v is None or _REAL[0](v), "null or a number"),
}
_warned: set[str] = set()


class SamplerSetup(NamedTuple):
    """What a jaxdiff sampler needs to reproduce one diffusers scheduler run.

    ``timesteps``: the grid (int32, strictly decreasing, last = endpoint). ``clip_x0``: DDIM's
    ``clip_sample_range`` when ``clip_sample`` is on, else None. ``final_first_order``: whether
    diffusers takes the last step of a multistep solver at first order (DPM-Solver: with
    ``final_sigmas_type="zero"``, ``euler_at_final``, or ``lower_order_final`` under 15 steps).
    ``settings``: the resolved diffusers config of the sampler.
    """

    timesteps: np.ndarray
    clip_x0: float | None
    final_first_order: bool
    settings: dict


def read_scheduler_config(source: str | os.PathLike | Mapping) -> dict:
    """The config dict from a ``scheduler/`` folder, a ``scheduler_config.json`` path, or a dict,
    checked: a supported class (a dict without ``_class_name`` is taken as one), known keys (an
    unknown one is named in a warning line, once), and the types of the keys jaxdiff reads."""
    if isinstance(source, Mapping):
        config, where = dict(source), "scheduler config"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "scheduler_config.json"
        if not path.is_file():
            raise SchedulerConfigError(f"{path}: missing (expected a diffusers scheduler_config.json)")
        config, where = read_json(path, SchedulerConfigError), str(path)
    cls = config.get("_class_name", SUPPORTED_CLASSES[0])
    if cls not in CLASS_KEYS:
        raise SchedulerConfigError(
            f"{where}: scheduler class {cls!r} is not supported: jaxdiff reads the discrete beta schedules of "
            f"{', '.join(SUPPORTED_CLASSES)}"
        )
    for key in config:
        if not key.startswith("_") and key not in KNOWN_KEYS:
            _warn(f"{where}: unknown scheduler key {key!r}{_closest(key)} is ignored (as diffusers ignores it)")
    _check_types(config, where)
    return config


def _closest(key: str) -> str:
    near = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _warn(message: str) -> None:
    # one line per distinct message: every reader of a config re-reads it
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _check_types(config: Mapping, where: str) -> None:
    for key, value in config.items():
        if key in _TYPES and not _TYPES[key][0](value):
            raise SchedulerConfigError(f"{where}: {key} must be {_TYPES[key][1]}, got {value!r}")


def _get(config: Mapping, key: str, defaults: Mapping = COMMON_DEFAULTS):
    return config[key] if key in config else defaults[key]


def schedule_from_config(config: str | os.PathLike | Mapping) -> Schedule:
    """The training noise schedule: betas as diffusers builds them (taken in float64 here, so
    alpha_bars differ from diffusers' float32 cumulative product by ~1e-6 relative).

    beta_schedule "linear": linspace(beta_start, beta_end, T); "scaled_linear" (Stable Diffusion):
    linspace(sqrt(beta_start), sqrt(beta_end), T)^2; "squaredcos_cap_v2": the cosine schedule with
    betas capped at 0.999; ``trained_betas``: those betas.
    """
    config = read_scheduler_config(config)
    if _get(config, "rescale_betas_zero_snr"):
        raise SchedulerConfigError(
            "rescale_betas_zero_snr=True makes abar_T = 0 (infinite noise), which jaxdiff's schedules do not represent"
        )
    T = _get(config, "num_train_timesteps")
    if not isinstance(T, int) or T < 1:
        raise SchedulerConfigError(f"num_train_timesteps must be a positive integer, got {T!r}")
    trained = _get(config, "trained_betas")
    kind = _get(config, "beta_schedule")
    b0, b1 = float(_get(config, "beta_start")), float(_get(config, "beta_end"))
    try:
        if trained is not None:
            betas = np.asarray(trained, np.float64)
            if betas.shape != (T,):
                raise SchedulerConfigError(
                    f"trained_betas must hold num_train_timesteps={T} values, got shape {betas.shape}"
                )
            return schedules.from_betas(betas)
        if kind in ("linear", "scaled_linear"):
            return schedules.ScheduleSpec(kind, T, b0, b1).build()
        if kind == "squaredcos_cap_v2":  # diffusers' cosine: s = 0.008, betas capped at 0.999
            return schedules.cosine(T, 0.008, 0.999)
    except SchedulerConfigError:
        raise
    except ValueError as e:
        raise SchedulerConfigError(f"scheduler config gives invalid betas: {e}") from None
    raise SchedulerConfigError(
        f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2' (or trained_betas given), got {kind!r}"
    )


def prediction_type(config: str | os.PathLike | Mapping) -> str:
    """What the U-Net predicts: "epsilon" or "v_prediction" (convert with
    ``jaxdiff.parametrization.eps_from_v`` before a sampler sees it)."""
    config = read_scheduler_config(config)
    kind = _get(config, "prediction_type")
    if kind in ("epsilon", "v_prediction"):
        return kind
    if kind == "sample":
        raise SchedulerConfigError(
            "prediction_type 'sample' (the network predicts x0) is not supported yet: it needs an eps adapter "
            "eps = parametrization.eps_from_x0(x_t, x0, alpha_bar=abar_t) in the pipeline"
        )
    raise SchedulerConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")


def sampler_settings(config: str | os.PathLike | Mapping, sampler: str, **overrides) -> dict:
    """The config diffusers' ``<Sampler>.from_config(config, **overrides)`` would run with: the keys
    present in ``config`` (hidden ``_``-keys aside), the sampler class's defaults for the rest.
    Refuses settings that jaxdiff's sampler cannot reproduce."""
    name = _sampler_name(sampler)
    config = read_scheduler_config(config)
    for key in overrides:
        if key not in KNOWN_KEYS:
            raise SchedulerConfigError(f"unknown scheduler setting {key!r}{_closest(key)}")
    _check_types(overrides, "scheduler setting")
    defaults = SAMPLERS[name][1]
    used = [k for k in config.get("_use_default_values", []) if k in config]
    settings = {k: v for k, v in config.items() if not k.startswith("_") and k not in used}
    settings.update(overrides)
    for k, v in defaults.items():
        settings.setdefault(k, v)
    if settings["thresholding"]:
        raise SchedulerConfigError("thresholding=True (dynamic thresholding of x0) is not supported")
    if name == "dpm_solver_pp":
        _check_dpm(settings)
    if name in _ALGORITHM:
        if overrides.get("algorithm_type", _ALGORITHM[name]) != _ALGORITHM[name]:
            raise SchedulerConfigError(f"{name} is algorithm_type {_ALGORITHM[name]!r}, got "
                                       f"{overrides['algorithm_type']!r}")
        settings["algorithm_type"] = _ALGORITHM[name]  # what from_config(config, algorithm_type=...) does
    if name in SIGMA_SAMPLERS:
        _check_sigma(name, settings)
    if name == "unipc":
        _check_unipc(settings)
    return settings


def _check_unipc(s: dict) -> None:
    want = {"predict_x0": True, "solver_p": None, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_flow_sigmas": False, "use_dynamic_shifting": False}
    for key, value in want.items():
        if s[key] != value:
            raise SchedulerConfigError(f"UniPC setting {key}={s[key]!r} is not supported (jaxdiff's unipc needs "
                                       f"{key}={value!r})")
    if s["solver_type"] not in ("bh1", "bh2"):
        raise SchedulerConfigError(f"UniPC solver_type must be 'bh1' or 'bh2', got {s['solver_type']!r}")
    if not 1 <= s["solver_order"] <= 3:
        raise SchedulerConfigError(f"UniPC solver_order must be 1, 2 or 3, got {s['solver_order']!r}")
    if s["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise SchedulerConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {s['final_sigmas_type']!r}")


def _check_sigma(name: str, s: dict) -> None:
    """Refuse what jaxdiff's sigma walks do not reproduce."""
    want = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "interpolation_type": "linear",
            "timestep_type": "discrete", "use_lu_lambdas": False, "use_flow_sigmas": False,
            "use_dynamic_shifting": False, "solver_order": 2, "variance_type": None}
    for key, value in want.items():
        if key in SAMPLERS[name][1] and s[key] != value:
            raise SchedulerConfigError(
                f"{name} setting {key}={s[key]!r} is not supported (jaxdiff needs {key}={value!r})")
    if s["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise SchedulerConfigError(
            f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {s['timestep_spacing']!r}")
    if "final_sigmas_type" in SAMPLERS[name][1] and s["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise SchedulerConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {s['final_sigmas_type']!r}")
    if name in _ALGORITHM and s["solver_type"] not in ("midpoint", "heun"):
        raise SchedulerConfigError(f"solver_type must be 'midpoint' or 'heun', got {s['solver_type']!r}")


def _check_dpm(s: dict) -> None:
    want = {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "variance_type": None,
        "use_dynamic_shifting": False,
    }
    for key, value in want.items():
        if s[key] != value:
            raise SchedulerConfigError(
                f"DPM-Solver setting {key}={s[key]!r}: jaxdiff's dpm_solver_pp is DPM-Solver++(2M), "
                f"which needs {key}={value!r}"
            )
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if s[key]:
            raise SchedulerConfigError(f"DPM-Solver setting {key}=True is not supported on dpm_solver_pp's integer "
                                       f"grid (Karras sigmas: dpm_solver_pp_2m)")
    if s["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise SchedulerConfigError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {s['final_sigmas_type']!r}")


def _sampler_name(sampler: str) -> str:
    if sampler in SAMPLERS:
        return sampler
    if sampler in _ALIASES:
        return _ALIASES[sampler]
    raise SchedulerConfigError(f"sampler must be one of {sorted(SAMPLERS)} (or {sorted(_ALIASES)}), got {sampler!r}")


def sampler_setup(
    config: str | os.PathLike | Mapping, steps: int, sampler: str, *, strict: bool = True, **overrides
) -> SamplerSetup:
    """The jaxdiff timestep grid and options that reproduce diffusers' ``sampler`` at ``steps`` steps.

    DDIM (diffusers' ``DDIMScheduler``): tau lists by ``timestep_spacing`` ("leading":
    arange(steps) * (T // steps) + steps_offset; "trailing": round(arange(T, 0, -T / steps)) - 1;
    "linspace": round(linspace(0, T - 1, steps))), reversed. diffusers steps each tau to
    tau - T // steps, not to the next listed tau, and ends at alphas_cumprod[prev] or, below 0, at
    1 (``set_alpha_to_one``) or alphas_cumprod[0]. Where the two differ (trailing and linspace
    spacings at most step counts) no single jaxdiff grid reproduces diffusers: ``strict`` raises,
    ``strict=False`` returns the listed taus (each step to the next listed one).

    DPM-Solver (``DPMSolverMultistepScheduler``): "linspace": round(linspace(0, last - 1, steps + 1))
    reversed, without its final 0; "leading": arange(steps + 1) * (last // (steps + 1)) reversed,
    without the final 0, + steps_offset; "trailing": round(arange(last, 0, -T / steps)) - 1; with
    last = T unless ``lambda_min_clipped`` cuts the noisiest steps. Endpoint 0 for
    ``final_sigmas_type="zero"``, 1 for "sigma_min".

    A last step that would not move (its endpoint equal to its own timestep: diffusers evaluates
    the network and returns the sample unchanged) is dropped.
    """
    name = _sampler_name(sampler)
    if name not in ("ddim", "dpm_solver_pp"):
        raise SchedulerConfigError(f"{name} walks its own tables, not one grid: see jaxdiff.pretrained.walks.make_walk")
    settings = sampler_settings(config, name, **overrides)
    T = settings["num_train_timesteps"]
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise SchedulerConfigError(f"steps must be an integer in 1..num_train_timesteps={T}, got {steps!r}")
    steps = int(steps)
    spacing = settings["timestep_spacing"]
    offset = settings["steps_offset"]
    if name == "ddim":
        taus, endpoint, exact = _ddim_grid(settings, T, steps, spacing, offset)
        if not exact and strict:
            raise SchedulerConfigError(
                f"DDIM with timestep_spacing={spacing!r} at {steps} steps: "
                f"diffusers steps each tau to tau - {T // steps} "
                f"but then evaluates the next listed tau, which differs, so no jaxdiff grid reproduces it exactly; "
                f"pass strict=False for the listed timesteps, "
                f"or use steps that divide {T} with 'trailing', or 'leading'"
            )
        clip = float(settings["clip_sample_range"]) if settings["clip_sample"] else None
        final_first = True
    else:
        taus, endpoint = _dpm_grid(settings, T, steps, spacing, offset)
        clip = None
        final_first = bool(
            settings["final_sigmas_type"] == "zero"
            or settings["euler_at_final"]
            or (settings["lower_order_final"] and len(taus) < 15)
        )
    if np.any(taus < 0) or np.any(taus > T - 1):
        raise SchedulerConfigError(
            f"{name} with timestep_spacing={spacing!r}, steps_offset={offset} at {steps} steps gives timesteps "
            f"outside 0..{T - 1}: {brief(taus)}"
        )
    grid = np.append(taus + 1, endpoint).astype(np.int64)
    if len(grid) > 2 and grid[-1] == grid[-2]:
        grid = np.delete(grid, -2)
    if not np.all(np.diff(grid) < 0):
        raise SchedulerConfigError(
            f"{name} with timestep_spacing={spacing!r} at {steps} steps repeats a timestep (diffusers' tau "
            f"{brief(grid[:-1][np.diff(grid) >= 0] - 1)} of {brief(grid[:-1] - 1)}): jaxdiff's samplers need strictly "
            f"decreasing timesteps; use fewer steps"
        )
    return SamplerSetup(grid.astype(np.int32), clip, final_first, settings)


def inference_timesteps(
    config: str | os.PathLike | Mapping, steps: int, sampler: str, *, strict: bool = True, **overrides
) -> np.ndarray:
    """The jaxdiff timestep grid (int32, 1-indexed, strictly decreasing, last = endpoint) that
    reproduces diffusers' ``sampler`` at ``steps`` steps: see ``sampler_setup``."""
    return sampler_setup(config, steps, sampler, strict=strict, **overrides).timesteps


def _ddim_grid(s: dict, T: int, steps: int, spacing: str, offset: int) -> tuple[np.ndarray, int, bool]:
    if spacing == "leading":
        taus = np.arange(steps, dtype=np.int64)[::-1] * (T // steps) + offset
    elif spacing == "trailing":
        taus = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        taus = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise SchedulerConfigError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    prev = taus - T // steps
    exact = bool(np.array_equal(prev[:-1], taus[1:]))
    endpoint = int(prev[-1]) + 1 if prev[-1] >= 0 else (0 if s["set_alpha_to_one"] else 1)
    return taus, endpoint, exact


def _dpm_grid(s: dict, T: int, steps: int, spacing: str, offset: int) -> tuple[np.ndarray, int]:
    last = T
    if s["lambda_min_clipped"] != -math.inf:
        # diffusers drops the noisiest timesteps whose lambda = log(alpha / sigma) lies below the clip
        abar = np.cumprod(1.0 - _betas_for_clip(s))
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))
        last = T - int(np.searchsorted(lam[::-1], s["lambda_min_clipped"]))
    if spacing == "linspace":
        taus = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        taus = (np.arange(steps + 1, dtype=np.int64) * ratio)[::-1][:-1] + offset
    elif spacing == "trailing":
        taus = np.round(np.arange(last, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise SchedulerConfigError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    endpoint = 0 if s["final_sigmas_type"] == "zero" else 1
    return taus, endpoint


def _betas_for_clip(s: dict) -> np.ndarray:
    # only the schedule's keys: the rest were checked (and any unknown one named) when the config was read
    return np.asarray(schedule_from_config({k: s[k] for k in COMMON_DEFAULTS}).betas, np.float64)


class SigmaSetup(NamedTuple):
    """What a ``jaxdiff.sigma_sampling`` sampler needs to reproduce one diffusers scheduler run: the
    ``walk``, the network's ``prediction`` type, ``clip_x0`` (Heun's ``clip_sample``) and ``options``,
    the sampler's own keywords (DPM-Solver SDE: ``final_first_order``, ``solver_type``)."""

    walk: Any
    prediction: str
    clip_x0: float | None
    options: dict
    settings: dict


def sigma_setup(config: str | os.PathLike | Mapping, steps: int, sampler: str, **overrides) -> SigmaSetup:
    """The walk diffusers' ``<Sampler>.from_config(config, **overrides)`` takes at ``steps`` steps, for a
    sampler of ``SIGMA_SAMPLERS`` (or its diffusers class name). The betas are the resolved settings'
    (Heun's class defaults differ). A key the class does not take (Euler ancestral's ``use_karras_sigmas``)
    is ignored when the config has it, as diffusers ignores it, and refused when asked for."""
    name = _sampler_name(sampler)
    if name not in SIGMA_SAMPLERS:
        raise SchedulerConfigError(f"sigma_setup is for {', '.join(SIGMA_SAMPLERS)}, got {sampler!r}")
    own = SAMPLERS[name][1]
    for key in overrides:
        if key not in own and key in ("use_karras_sigmas", "final_sigmas_type", "sigma_min", "sigma_max"):
            raise SchedulerConfigError(f"{SAMPLERS[name][0]} has no setting {key!r}")
    s = sampler_settings(config, name, **overrides)

    def get(key, otherwise):
        return s[key] if key in own else otherwise

    T = s["num_train_timesteps"]
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise SchedulerConfigError(f"steps must be an integer in 1..num_train_timesteps={T}, got {steps!r}")
    alpha_bars = np.asarray(schedule_from_config({k: s[k] for k in COMMON_DEFAULTS}).alpha_bars)
    karras = bool(get("use_karras_sigmas", False))
    final = get("final_sigmas_type", "zero")
    options: dict = {}
    try:
        if name in _ALGORITHM:
            taus = None if karras else _dpm_grid(s, T, int(steps), s["timestep_spacing"], s["steps_offset"])[0]
            walk = sigma_sampling.dpm_walk(alpha_bars, int(steps), taus=taus, karras=karras, final_sigma=final,
                                           round_times=s["beta_schedule"] != "squaredcos_cap_v2")
            options = {"final_first_order": bool(final == "zero" or s["euler_at_final"]
                                                  or (s["lower_order_final"] and walk.steps < 15)),
                       "solver_type": s["solver_type"]}
        else:
            walk = sigma_sampling.euler_walk(alpha_bars, int(steps), spacing=s["timestep_spacing"],
                                             offset=s["steps_offset"], karras=karras, final_sigma=final,
                                             sigma_min=get("sigma_min", None), sigma_max=get("sigma_max", None))
    except ValueError as err:
        raise SchedulerConfigError(f"{name}: {err}") from None
    clip = float(s["clip_sample_range"]) if get("clip_sample", False) else None
    return SigmaSetup(walk, prediction_type(s), clip, options, s)


def describe(setup: SamplerSetup) -> dict[str, Any]:
    """A JSON-friendly summary (for logs and the CLI)."""
    return {
        "timesteps": setup.timesteps.tolist(),
        "clip_x0": setup.clip_x0,
        "final_first_order": setup.final_first_order,
        "timestep_spacing": setup.settings["timestep_spacing"],
        "steps_offset": setup.settings["steps_offset"],
    }
