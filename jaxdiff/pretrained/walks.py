"""Which diffusers walk a sampler name means for a Stable Diffusion folder, and running it.

A name is one of: "auto" (the folder's own scheduler class, ``scheduler_config.json``'s
``_class_name``, as diffusers' pipeline would run it), an A1111 / k-diffusion name ("DPM++ 2M
Karras", "Euler a", ...; ``A1111`` below, as diffusers' scheduler overview maps them), or a jaxdiff
name of a diffusers walk (``scheduler.SAMPLERS``: "pndm", "unipc", "ddim", "dpm_solver_pp", ...).
Each resolves to (jaxdiff walk, overrides): diffusers' ``Class.from_config(folder_config, **overrides)``.

``make_walk`` turns that into a ``Walk``: a hashable sampler (same walk, same compiled program) with
the samplers' keyword signature, which also says what it runs (``report``). The README's table of
names is ``markdown_table()``, made from ``A1111`` and ``NFE``; a test keeps them equal.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping

import numpy as np

from jaxdiff import sampling
from jaxdiff.pretrained import multistep, scheduler
from jaxdiff.pretrained.scheduler import SchedulerConfigError

DEFAULT_STEPS = 50  # diffusers' StableDiffusionPipeline num_inference_steps

# A1111 name -> (jaxdiff walk, the settings diffusers' scheduler overview says to pass). A1111's PLMS has no
# Runge-Kutta warm-up, so "PLMS" sets skip_prk_steps (SD folders already do).
A1111 = {
    "DPM++ 2M": ("dpm_solver_pp", {}),
    "DPM++ 2M Karras": ("dpm_solver_pp", {"use_karras_sigmas": True}),
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

# diffusers class -> the jaxdiff walk of it ("auto"); DPMSolverMultistepScheduler by its algorithm_type
CLASSES: dict[str, Callable[[dict], str]] = {
    "PNDMScheduler": lambda s: "pndm",
    "DDIMScheduler": lambda s: "ddim",
    "DPMSolverMultistepScheduler": lambda s: "dpm_solver_pp_sde" if s.get("algorithm_type") == "sde-dpmsolver++"
    else "dpm_solver_pp",
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
    "dpm_solver_pp_sde": ("1", lambda n: n),
    "euler_discrete": ("1", lambda n: n),
    "euler_ancestral_discrete": ("1", lambda n: n),
    "heun_discrete": ("2 (2n - 1 in all)", lambda n: 2 * n - 1),
    "lms_discrete": ("1", lambda n: n),
    "pndm": ("1 (n + 1 in all: the first timestep twice)", lambda n: n + 1 if n > 1 else n),
    "unipc": ("1", lambda n: n),
}


def _settings_text(name: str, overrides: Mapping) -> str:
    cls = scheduler.SAMPLERS[name][0] if name in scheduler.SAMPLERS else _CLASS_OF.get(name, "?")
    return cls + "".join(f", {k}={v!r}" for k, v in overrides.items())


# each walk's diffusers class, also for walks registered elsewhere and not here yet (messages, the table)
_CLASS_OF = {walk(config): cls for config in ({}, {"algorithm_type": "sde-dpmsolver++"})
             for cls, walk in CLASSES.items()}


def markdown_table() -> str:
    """The README's table of sampler names: A1111's name, the diffusers class and settings it means, the
    jaxdiff walk, and its network evaluations per step."""
    lines = ["| name | diffusers class and settings | jaxdiff sampler | network evaluations per step |",
             "| --- | --- | --- | --- |"]
    for alias, (name, overrides) in A1111.items():
        lines.append(f"| `{alias}` | {_settings_text(name, overrides)} | `{name}` | {NFE[name][0]} |")
    return "\n".join(lines)


def supported() -> list[str]:
    """The names that resolve to a walk this jaxdiff has."""
    return ["auto", *[a for a, (n, _) in A1111.items() if n in RUNNERS], *RUNNERS]


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
    else:
        raise SchedulerConfigError(f"unknown sampler {sampler!r}: expected one of {supported()} or jaxdiff's own "
                                   f"{sorted(sampling.SAMPLERS)}")
    if name not in RUNNERS or name not in scheduler.SAMPLERS:
        raise SchedulerConfigError(
            f"{what} means jaxdiff's {name!r} walk ({_CLASS_OF.get(name, '?')}), which this jaxdiff does not have "
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


# walk -> (plan(settings, steps, config, overrides, start) -> tables with "taus" (diffusers' timesteps from
# index start on: image-to-image), run(eps_fn, schedule, x_T, plan, *, key, prediction) -> x0)
RUNNERS = {
    "ddim": (_grid_plan("ddim"), _run_ddim),
    "dpm_solver_pp": (_grid_plan("dpm_solver_pp"), _run_dpm),
    "pndm": (lambda s, n, c, o, start: multistep.pndm_plan(s, n, start),
             lambda e, sc, x, p, *, key, prediction: multistep.pndm_walk(e, sc, x, p, prediction=prediction)),
    "unipc": (lambda s, n, c, o, start: multistep.unipc_plan(s, _abar(s), n, start),
              lambda e, sc, x, p, *, key, prediction: multistep.unipc_walk(e, sc, x, p, prediction=prediction)),
}


def _hashable(v):
    return tuple(_hashable(i) for i in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class Walk:
    """One diffusers scheduler run, as a jaxdiff sampler: ``walk(eps_fn, schedule, x_T, key=...)``.

    ``sampler``: the jaxdiff walk; ``asked``: the name the caller gave; ``scheduler_class`` and
    ``overrides``: diffusers' ``scheduler_class.from_config(config, **overrides)``; ``taus``: diffusers'
    timesteps, the network evaluated once at each (jaxdiff's t = tau + 1). ``grid``: those t and an endpoint;
    handed a tail of it (``timesteps=grid[k:]``), the walk does what diffusers' image-to-image pipeline
    does from index k, which the pipeline noises the image to (``noise_at_timestep``: whether diffusers
    noises it to that timestep's abar; not so under Karras sigmas, which UniPC noises by its own sigma)."""

    sampler: str
    asked: str
    scheduler_class: str
    overrides: tuple
    steps: int
    taus: tuple
    config: str = dataclasses.field(repr=False)
    noise_at_timestep: bool = True

    @property
    def __name__(self) -> str:  # what the pipeline calls a sampler function
        return self.sampler

    @property
    def nfe(self) -> int:
        return len(self.taus)

    @property
    def grid(self) -> tuple:
        return (*(t + 1 for t in self.taus), 0)

    def plan(self, start: int = 0) -> dict:
        return _plan(json.loads(self.config), self.sampler, self.steps, dict(self.overrides), start)[1]

    def __call__(self, eps_fn, schedule, x_T, *, key=None, steps=None, timesteps=None, clip_x0=None):
        start = 0 if timesteps is None else len(self.grid) - len(timesteps)
        if clip_x0 is not None or (timesteps is not None and (
                start < 0 or tuple(int(t) for t in np.asarray(timesteps)) != self.grid[start:])):
            raise ValueError(f"sampler {self.asked!r} walks diffusers' {self.scheduler_class} timesteps and settings; "
                             f"it takes no clip_x0= and no timesteps= but the end of its own grid")
        settings, plan = _plan(json.loads(self.config), self.sampler, self.steps, dict(self.overrides), start)
        return RUNNERS[self.sampler][1](eps_fn, schedule, x_T, plan, key=key, prediction=settings["prediction_type"])

    def report(self) -> dict:
        """What ran, JSON-friendly, with one ``line`` for a log."""
        settings = "".join(f", {k}={v!r}" for k, v in self.overrides)
        line = (f"sampler {self.sampler} ({self.scheduler_class}{settings}; asked {self.asked!r}), {self.steps} steps, "
                f"{self.nfe} network evaluations at diffusers' timesteps {self.taus[0]} .. {self.taus[-1]}")
        return {"sampler": self.sampler, "asked": self.asked, "scheduler_class": self.scheduler_class,
                "overrides": dict(self.overrides), "steps": self.steps, "evaluations": self.nfe,
                "timesteps": list(self.taus), "line": line}


def _plan(config: dict, name: str, steps: int, overrides: dict, start: int = 0) -> tuple[dict, dict]:
    settings = scheduler.sampler_settings(config, name, **overrides)
    if name == "pndm" and settings["prediction_type"] not in multistep.PREDICTIONS:
        raise SchedulerConfigError(f"PNDM takes prediction_type 'epsilon' or 'v_prediction', got "
                                   f"{settings['prediction_type']!r}")
    return settings, RUNNERS[name][0](settings, steps, config, overrides, start)


def make_walk(config: Mapping, sampler: str, steps: int | None = None) -> Walk:
    """The ``Walk`` that ``sampler`` means for scheduler ``config`` at ``steps`` (default diffusers' 50)."""
    config = scheduler.read_scheduler_config(config)
    steps = DEFAULT_STEPS if steps is None else sampling.check_steps(steps)
    T = scheduler._get(config, "num_train_timesteps")
    if steps > T:
        raise SchedulerConfigError(f"steps must be at most num_train_timesteps={T}, got {steps}")
    name, overrides = resolve(config, sampler)
    settings, plan = _plan(config, name, steps, overrides)
    return Walk(name, sampler, scheduler.SAMPLERS[name][0], tuple((k, _hashable(v)) for k, v in overrides.items()),
                steps, tuple(int(t) for t in plan["taus"]), json.dumps(config, sort_keys=True),
                noise_at_timestep=not (name == "unipc" and settings["use_karras_sigmas"]))
