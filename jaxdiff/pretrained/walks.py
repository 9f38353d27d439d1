"""Which diffusers walk a sampler name means for a Stable Diffusion folder, and running it.

A name is one of: "auto" (the folder's own scheduler class, ``scheduler_config.json``'s
``_class_name``, as diffusers' pipeline would run it), an A1111 / k-diffusion name ("DPM++ 2M
Karras", "Euler a", ...; ``A1111`` below, as diffusers' scheduler overview maps them), or a jaxdiff
name of a diffusers walk (``scheduler.SAMPLERS``: "pndm", "unipc", "ddim", "dpm_solver_pp", "euler_discrete",
...), or such a name with ``_karras`` ("euler_discrete_karras": the walk with ``use_karras_sigmas=True``, for
classes that have the setting). Each resolves to (jaxdiff walk, overrides): diffusers'
``Class.from_config(folder_config, **overrides)``. DPM-Solver++(2M) on Karras sigmas (from the name or the
folder's config) walks as ``dpm_solver_pp_2m``: ``dpm_solver_pp``'s integer grid cannot hold them.

``make_walk`` turns that into a ``Walk``: a hashable sampler (same walk, same compiled program) with
the samplers' keyword signature, which also says what it runs (``report``). The README's table of
names is ``markdown_table()``, made from ``A1111`` and ``NFE``; a test keeps them equal.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import numpy as np

from jaxdiff import sampling, sigma_sampling
from jaxdiff.pretrained import multistep, scheduler
from jaxdiff.pretrained.scheduler import SchedulerConfigError

DEFAULT_STEPS = 50  # diffusers' StableDiffusionPipeline num_inference_steps

# A1111 name -> (jaxdiff walk, the settings diffusers' scheduler overview says to pass). A1111's PLMS has no
# Runge-Kutta warm-up, so "PLMS" sets skip_prk_steps (SD folders already do).
A1111 = {
    "DPM++ 2M": ("dpm_solver_pp", {}),
    "DPM++ 2M Karras": ("dpm_solver_pp_2m", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("dpm_solver_pp_sde", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("dpm_solver_pp_sde", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "Euler": ("euler_discrete", {}),
    "Euler a": ("euler_ancestral_discrete", {}),
    "Heun": ("heun_discrete", {}),
    "LMS": ("lms_discrete", {}),
    "LMS Karras": ("lms_discrete", {"use_karras_sigmas": True}),
    "DDIM": ("ddim", {}),
    "PLMS": ("pndm", {"skip_prk_steps": True}),
    "UniPC": ("unipc", {}),
}



def _dpm(s: Mapping) -> str:
    if s.get("algorithm_type") == "sde-dpmsolver++":
        return "dpm_solver_pp_sde"
    return "dpm_solver_pp_2m" if s.get("use_karras_sigmas") else "dpm_solver_pp"


# diffusers class -> the jaxdiff walk of it ("auto"); DPMSolverMultistepScheduler by its algorithm_type and sigmas
CLASSES: dict[str, Callable[[dict], str]] = {
    "PNDMScheduler": lambda s: "pndm",
    "DDIMScheduler": lambda s: "ddim",
    "DPMSolverMultistepScheduler": _dpm,
    "EulerDiscreteScheduler": lambda s: "euler_discrete",
    "EulerAncestralDiscreteScheduler": lambda s: "euler_ancestral_discrete",
    "HeunDiscreteScheduler": lambda s: "heun_discrete",
    "LMSDiscreteScheduler": lambda s: "lms_discrete",
    "UniPCMultistepScheduler": lambda s: "unipc",
}

# network evaluations of each walk: per step, and in all for n steps
NFE = {
    "ddim": ("1", lambda n: n),
    "dpm_solver_pp": ("1", lambda n: n),
    "dpm_solver_pp_2m": ("1", lambda n: n),
    "dpm_solver_pp_sde": ("1", lambda n: n),
    "euler_discrete": ("1", lambda n: n),
    "euler_ancestral_discrete": ("1", lambda n: n),
    "heun_discrete": ("2 (2n - 1 in all)", lambda n: 2 * n - 1),
    "lms_discrete": ("1", lambda n: n),
    "pndm": ("1 (n + 1 in all: the first timestep twice)", lambda n: n + 1 if n > 1 else n),
    "unipc": ("1", lambda n: n),
}


KARRAS_SUFFIX = "_karras"  # "<walk>_karras": the walk with use_karras_sigmas=True


def _settings_text(name: str, overrides: Mapping) -> str:
    return scheduler.SAMPLERS[name][0] + "".join(f", {k}={v!r}" for k, v in overrides.items())


def markdown_table() -> str:
    """The README's table of sampler names: A1111's name, the diffusers class and settings it means, the
    jaxdiff walk, and its network evaluations per step."""
    lines = ["| name | diffusers class and settings | jaxdiff sampler | network evaluations per step |",
             "| --- | --- | --- | --- |"]
    for alias, (name, overrides) in A1111.items():
        lines.append(f"| `{alias}` | {_settings_text(name, overrides)} | `{name}` | {NFE[name][0]} |")
    return "\n".join(lines)


def supported() -> list[str]:
    """The names that resolve to a walk this jaxdiff has ("<walk>_karras" last)."""
    return ["auto", *[a for a, (n, _) in A1111.items() if n in RUNNERS], *RUNNERS,
            *[n + KARRAS_SUFFIX for n in RUNNERS if "use_karras_sigmas" in scheduler.SAMPLERS[n][1]]]


def resolve(config: Mapping, sampler: str) -> tuple[str, dict]:
    """(jaxdiff walk, overrides) that ``sampler`` means for the scheduler ``config``."""
    if sampler == "auto":
        cls = config.get("_class_name")
        if cls not in CLASSES:
            raise SchedulerConfigError(
                f"sampler='auto': the folder's scheduler class {cls!r} has no jaxdiff walk; the classes that do: "
                f"{', '.join(c for c, w in CLASSES.items() if w(config) in RUNNERS)}; pick a sampler with "
                f"sampler=... (one of {supported()[1:]})")
        name, overrides, what = CLASSES[cls](config), {}, f"sampler='auto' (the folder's {cls})"
    elif sampler in A1111:
        (name, overrides), what = A1111[sampler], f"sampler={sampler!r}"
    elif sampler in scheduler.SAMPLERS or sampler in NFE:
        name, overrides, what = sampler, {}, f"sampler={sampler!r}"
    elif isinstance(sampler, str) and sampler.endswith(KARRAS_SUFFIX) and "use_karras_sigmas" in scheduler.SAMPLERS.get(
            sampler[: -len(KARRAS_SUFFIX)], ("", {}))[1]:
        name, overrides, what = sampler[: -len(KARRAS_SUFFIX)], {"use_karras_sigmas": True}, f"sampler={sampler!r}"
    else:
        raise SchedulerConfigError(f"unknown sampler {sampler!r}: expected one of {supported()} or jaxdiff's own "
                                   f"{sorted(sampling.SAMPLERS)}")
    if name == "dpm_solver_pp" and overrides.get("use_karras_sigmas", config.get("use_karras_sigmas", False)):
        name = "dpm_solver_pp_2m"  # the same solver on diffusers' sigma walk, which holds Karras sigmas
    if name not in RUNNERS or name not in scheduler.SAMPLERS:
        cls = scheduler.SAMPLERS[name][0] if name in scheduler.SAMPLERS else "?"
        raise SchedulerConfigError(
            f"{what} means jaxdiff's {name!r} walk ({cls}), which this jaxdiff does not have "
            f"yet; the names it has: {supported()}; pick one with sampler=...")
    return name, dict(overrides)


# ----------------------------------------------------------------------------- the walks


def _abar(settings: dict) -> np.ndarray:
    keys = {k: settings[k] for k in scheduler.COMMON_DEFAULTS}
    return np.asarray(scheduler.schedule_from_config(keys).alpha_bars, np.float64)


def _grid_plan(name):
    def plan(settings, steps, config, overrides, start):
        setup = scheduler.sampler_setup(config, steps, name, **overrides)
        return {"timesteps": setup.timesteps[start:], "taus": setup.timesteps[start:-1] - 1,
                "clip_x0": setup.clip_x0, "final_first_order": setup.final_first_order}
    return plan


def _run_ddim(eps_fn, schedule, x_T, plan, *, key, prediction):
    return sampling.ddim(eps_fn, schedule, x_T, timesteps=plan["timesteps"], clip_x0=plan["clip_x0"])


def _run_dpm(eps_fn, schedule, x_T, plan, *, key, prediction):
    return sampling.dpm_solver_pp(eps_fn, schedule, x_T, timesteps=plan["timesteps"],
                                  final_first_order=plan["final_first_order"])


def _sigma_plan(name):
    def plan(settings, steps, config, overrides, start):
        if start:
            raise SchedulerConfigError(f"{name} walks sigmas from its first step only (no image-to-image yet)")
        setup = scheduler.sigma_setup(config, steps, name, **overrides)
        t = np.asarray(setup.walk.t, np.float64)
        if name == "heun_discrete":  # two evaluations a step but the last: t_0, t_1, t_1, t_2, t_2, ...
            t = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        return {"taus": t - 1, "walk": setup.walk, "clip_x0": setup.clip_x0, "options": setup.options}
    return plan


def _sigma_run(fn):
    def run(model_fn, schedule, x_T, plan, *, key, prediction, first=0, stop=None, from_sample=False):
        whole = plan["walk"]
        stop = whole.steps if stop is None else stop
        options = dict(plan["options"])
        if stop < whole.steps and "final_first_order" in options:
            options["final_first_order"] = False  # diffusers' lower_order_final is for the walk's own last step
        if first and fn is sigma_sampling.lms_discrete:
            options["earlier"] = whole.sigmas[:first]
        walk = sigma_sampling.part(whole, first, stop, from_sample=from_sample)
        return fn(model_fn, schedule, x_T, key=key, walk=walk, prediction=prediction, clip_x0=plan["clip_x0"],
                  **options)
    return run


class Runner(NamedTuple):
    """``plan(settings, steps, config, overrides, start)`` -> tables with "taus" (diffusers' timesteps from index
    start on: image-to-image); ``run(model_fn, schedule, x_T, plan, *, key, prediction)`` -> x0. ``model_fn``
    gives eps (a v-prediction network's output converted at the grid's integer t), or with ``raw_output`` the
    network's own output (eps or v), which the walk converts at its own sigma (its times may be fractional)."""

    plan: Callable
    run: Callable
    raw_output: bool = False


RUNNERS = {
    "ddim": Runner(_grid_plan("ddim"), _run_ddim),
    "dpm_solver_pp": Runner(_grid_plan("dpm_solver_pp"), _run_dpm),
    "pndm": Runner(lambda s, n, c, o, start: multistep.pndm_plan(s, n, start),
                   lambda e, sc, x, p, *, key, prediction: multistep.pndm_walk(e, sc, x, p, prediction=prediction)),
    "unipc": Runner(lambda s, n, c, o, start: multistep.unipc_plan(s, _abar(s), n, start),
                    lambda e, sc, x, p, *, key, prediction: multistep.unipc_walk(e, sc, x, p, prediction=prediction)),
    **{name: Runner(_sigma_plan(name), _sigma_run(getattr(sigma_sampling, name)), raw_output=True)
       for name in scheduler.SIGMA_SAMPLERS},
}


def _hashable(v):
    return tuple(_hashable(i) for i in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class Walk:
    """One diffusers scheduler run, as a jaxdiff sampler: ``walk(eps_fn, schedule, x_T, key=...)``.

    ``sampler``: the jaxdiff walk; ``asked``: the name the caller gave; ``scheduler_class`` and
    ``overrides``: diffusers' ``scheduler_class.from_config(config, **overrides)``; ``taus``: diffusers'
    timesteps, the network evaluated once at each (jaxdiff's t = tau + 1; fractional on sigma walks).
    ``grid``: those t and an endpoint; handed a tail of it (``timesteps=grid[k:]``), the walk does what
    diffusers' image-to-image pipeline does from index k, which the pipeline noises the image to
    (``noise_at_timestep``: whether diffusers noises it to that timestep's abar; not so under Karras sigmas,
    which UniPC noises by its own sigma, nor on the sigma walks, which noise by theirs: ``noised``). ``raw_output``: the
    walk takes the network's raw output (``Runner``): a sigma walk's ``grid`` is its distinct times (Heun's
    once each) and a marker endpoint, and it runs any contiguous part of it (``timesteps=grid[a:b + 1]``: steps
    a .. b - 1, an ensemble's base stopping early), from noise times ``init_noise_sigma`` or, ``from_sample``,
    from a sample already at the part's first level (``noised``: an image noised as diffusers' ``add_noise``
    does, a base's latents)."""

    sampler: str
    asked: str
    scheduler_class: str
    overrides: tuple
    steps: int
    taus: tuple
    config: str = dataclasses.field(repr=False)
    noise_at_timestep: bool = True
    raw_output: bool = False
    times: tuple = ()  # a sigma walk's distinct times (jaxdiff's t)
    from_sample: bool = False

    @property
    def __name__(self) -> str:  # what the pipeline calls a sampler function
        return self.sampler

    @property
    def nfe(self) -> int:
        return len(self.taus)

    @property
    def grid(self) -> tuple | None:
        return (*self.times, 0.0) if self.raw_output else (*(t + 1 for t in self.taus), 0)

    @property
    def order(self) -> int:
        """diffusers' ``scheduler.order``: network evaluations a step (Heun's 2)."""
        return 2 if self.sampler == "heun_discrete" else 1

    def _part(self, timesteps) -> tuple[int, int]:
        """(first step, stop) of a sigma walk's part ``timesteps`` = grid[first:stop + 1]."""
        grid, part = self.grid, tuple(float(t) for t in np.asarray(timesteps))
        first = grid.index(part[0]) if part and part[0] in grid[:-1] else -1
        if first < 0 or len(part) < 2 or part != grid[first:first + len(part)]:
            raise ValueError(f"sampler {self.asked!r} walks diffusers' {self.scheduler_class} sigmas; it takes no "
                             f"timesteps= but a contiguous part of its own grid")
        return first, first + len(part) - 1

    def noised(self, x0, noise, timesteps):
        """A sigma walk's start from ``x0`` noised to the level of the part's first step, as diffusers'
        ``add_noise`` after ``set_begin_index`` (the Euler family's x0 + sigma noise; DPM-Solver's x_t)."""
        first, _ = self._part(timesteps)
        with jax.ensure_compile_time_eval():
            sigma = self.plan()["walk"].sigmas[first]
        return sigma_sampling.noised(x0, noise, sigma, carries_x_t=self.sampler.startswith("dpm_"))

    def part_taus(self, timesteps) -> tuple:
        """diffusers' timesteps of the network evaluations in a part of the walk (Heun's twice but the last)."""
        first, stop = self._part(timesteps)
        t = [t - 1 for t in self.times[first:stop]]
        return tuple(t[:1] + [u for u in t[1:] for _ in range(self.order)])

    def plan(self, start: int = 0) -> dict:
        return _plan(json.loads(self.config), self.sampler, self.steps, dict(self.overrides), start)[1]

    def __call__(self, eps_fn, schedule, x_T, *, key=None, steps=None, timesteps=None, clip_x0=None):
        if self.raw_output:
            if clip_x0 is not None:
                raise ValueError(f"sampler {self.asked!r} walks diffusers' {self.scheduler_class} settings; it takes "
                                 f"no clip_x0=")
            first, stop = (0, None) if timesteps is None else self._part(timesteps)
            with jax.ensure_compile_time_eval():
                settings, plan = _plan(json.loads(self.config), self.sampler, self.steps, dict(self.overrides))
            return RUNNERS[self.sampler].run(eps_fn, schedule, x_T, plan, key=key,
                                             prediction=settings["prediction_type"], first=first, stop=stop,
                                             from_sample=self.from_sample)
        start = 0 if timesteps is None or self.grid is None else len(self.grid) - len(timesteps)
        if clip_x0 is not None or (timesteps is not None and (
                self.grid is None or start < 0 or tuple(int(t) for t in np.asarray(timesteps)) != self.grid[start:])):
            raise ValueError(f"sampler {self.asked!r} walks diffusers' {self.scheduler_class} timesteps and settings; "
                             f"it takes no clip_x0= and no timesteps= but the end of its own grid")
        with jax.ensure_compile_time_eval():  # the tables are constants, also when the call is traced (jit)
            settings, plan = _plan(json.loads(self.config), self.sampler, self.steps, dict(self.overrides), start)
        return RUNNERS[self.sampler].run(eps_fn, schedule, x_T, plan, key=key, prediction=settings["prediction_type"])

    def report(self, timesteps=None) -> dict:
        """What ran, JSON-friendly, with one ``line`` for a log; ``timesteps``: the part of a sigma walk's grid
        that ran (image-to-image, an ensemble's base or refiner)."""
        taus = self.taus if timesteps is None or not self.raw_output else self.part_taus(timesteps)
        settings = "".join(f", {k}={v!r}" for k, v in self.overrides)
        line = (f"sampler {self.sampler} ({self.scheduler_class}{settings}; asked {self.asked!r}), {self.steps} steps, "
                f"{len(taus)} network evaluations at diffusers' timesteps {taus[0]} .. {taus[-1]}")
        return {"sampler": self.sampler, "asked": self.asked, "scheduler_class": self.scheduler_class,
                "overrides": dict(self.overrides), "steps": self.steps, "evaluations": len(taus),
                "timesteps": list(taus), "line": line}


def _plan(config: dict, name: str, steps: int, overrides: dict, start: int = 0) -> tuple[dict, dict]:
    settings = scheduler.sampler_settings(config, name, **overrides)
    if name == "pndm" and settings["prediction_type"] not in multistep.PREDICTIONS:
        raise SchedulerConfigError(f"PNDM takes prediction_type 'epsilon' or 'v_prediction', got "
                                   f"{settings['prediction_type']!r}")
    return settings, RUNNERS[name].plan(settings, steps, config, overrides, start)


def make_walk(config: Mapping, sampler: str, steps: int | None = None) -> Walk:
    """The ``Walk`` that ``sampler`` means for scheduler ``config`` at ``steps`` (default diffusers' 50)."""
    config = scheduler.read_scheduler_config(config)
    steps = DEFAULT_STEPS if steps is None else sampling.check_steps(steps)
    T = scheduler._get(config, "num_train_timesteps")
    if steps > T:
        raise SchedulerConfigError(f"steps must be at most num_train_timesteps={T}, got {steps}")
    name, overrides = resolve(config, sampler)
    settings, plan = _plan(config, name, steps, overrides)
    raw = RUNNERS[name].raw_output
    taus = tuple(float(t) if raw else int(t) for t in plan["taus"])
    times = tuple(float(t) for t in plan["walk"].t) if raw else ()
    return Walk(name, sampler, scheduler.SAMPLERS[name][0], tuple((k, _hashable(v)) for k, v in overrides.items()),
                steps, taus, json.dumps(config, sort_keys=True),
                noise_at_timestep=not (raw or (name == "unipc" and settings["use_karras_sigmas"])), raw_output=raw,
                times=times)
