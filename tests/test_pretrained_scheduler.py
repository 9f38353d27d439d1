"""Scheduler configs -> Schedule, prediction type and timestep grids, against diffusers' recorded runs.

tests/fixtures/make_scheduler_fixtures.py ran diffusers' DDIMScheduler and
DPMSolverMultistepScheduler (swapped in as ``X.from_config(pipe.scheduler.config, **overrides)``)
for SD 1.5's and SD 2.1's scheduler configs and recorded the timesteps, the abar each DDIM step
actually used (read back from ``step()``) and DPM-Solver's sigmas.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.pretrained import scheduler as S
from jaxdiff.pretrained.scheduler import SchedulerConfigError

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "sd_scheduler" / "expected.json").read_text())
CONFIGS = FIXTURE["configs"]
RUNS = FIXTURE["runs"]


def steps_off_grid(r):
    """diffusers' DDIM stepped to an abar other than the one it then evaluated at (observed)."""
    return r["sampler"] == "ddim" and not np.allclose(r["abar_prev"][:-1], r["abar_t"][1:], rtol=1e-5)


EXACT = [r for r in RUNS if not steps_off_grid(r)]
INEXACT = [r for r in RUNS if r not in EXACT]


def abar_at(config, t):
    """abar_t for jaxdiff's t in 0..T (abar_0 = 1), in NumPy."""
    abar = np.asarray(S.schedule_from_config(config).alpha_bars, np.float64)
    return np.concatenate([[1.0], abar])[np.asarray(t)]


def run_id(r):
    extra = ",".join(f"{k}={v}" for k, v in r["overrides"].items())
    return f"{r['config']}-{r['sampler']}-{r['steps']}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("name", sorted(FIXTURE["alphas_cumprod"]))
def test_alpha_bars_equal_diffusers(name):
    schedule = S.schedule_from_config(CONFIGS[name])
    want = np.asarray(FIXTURE["alphas_cumprod"][name], np.float64)
    # diffusers multiplies 1000 float32 factors; jaxdiff takes the product in float64
    np.testing.assert_allclose(np.asarray(schedule.alpha_bars, np.float64), want, rtol=2e-5)
    assert schedule.num_timesteps == len(want)


def test_scaled_linear_is_the_closed_form():
    s = S.schedule_from_config(CONFIGS["sd15"])
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    np.testing.assert_allclose(np.asarray(s.betas, np.float64), betas, rtol=1e-6)
    assert s.spec == schedules.ScheduleSpec("scaled_linear", 1000, 0.00085, 0.012)  # so a checkpoint can record it


@pytest.mark.parametrize("r", EXACT, ids=[run_id(r) for r in EXACT])
def test_grid_reproduces_diffusers(r):
    config = CONFIGS[r["config"]]
    grid = S.inference_timesteps(config, r["steps"], r["sampler"], **r["overrides"])
    abar = abar_at(config, grid)
    assert grid.dtype == np.int32 and (np.diff(grid) < 0).all()
    # the network is evaluated at every element but the last, at diffusers' tau = t - 1
    assert (grid[:-1] - 1).tolist() == r["timesteps"]
    if r["sampler"] == "ddim":
        # each step goes from abar(grid[i]) to abar(grid[i + 1]), as diffusers' step() did
        np.testing.assert_allclose(abar[:-1], r["abar_t"], rtol=2e-5)
        np.testing.assert_allclose(abar[1:], r["abar_prev"], rtol=2e-5)
    else:
        sigma = np.sqrt((1 - abar) / abar)
        np.testing.assert_allclose(sigma, r["sigmas"], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("r", INEXACT, ids=[run_id(r) for r in INEXACT])
def test_ddim_spacings_diffusers_steps_off_grid_are_refused(r):
    config = CONFIGS[r["config"]]
    with pytest.raises(SchedulerConfigError, match="no jaxdiff grid reproduces it exactly"):
        S.inference_timesteps(config, r["steps"], r["sampler"], **r["overrides"])
    # diffusers' last step (tau - T // steps) lands where the listed next tau would not: why it is refused
    assert any(a != b for a, b in zip(np.asarray(r["timesteps"][:-1]) - 1000 // r["steps"], r["timesteps"][1:],
                                      strict=True))
    loose = S.inference_timesteps(config, r["steps"], r["sampler"], strict=False, **r["overrides"])
    # the listed taus, each step to the next one, and diffusers' final abar (a last tau 0 that
    # would step to abar_1 again is dropped)
    listed = r["timesteps"][:-1] if r["timesteps"][-1] == 0 and loose[-1] == 1 else r["timesteps"]
    assert (loose[:-1] - 1).tolist() == listed
    final = abar_at(config, loose)[-1]
    np.testing.assert_allclose(final, r["abar_prev"][-1], rtol=2e-5)


def test_sd_defaults():
    """The facts the lead's pipeline relies on, in one place."""
    assert S.prediction_type(CONFIGS["sd15"]) == "epsilon"
    assert S.prediction_type(CONFIGS["sd21"]) == "v_prediction"
    ddim = S.sampler_setup(CONFIGS["sd15"], 50, "ddim")
    assert ddim.timesteps[:2].tolist() == [982, 962] and ddim.timesteps[-2:].tolist() == [2, 1]  # ends at abar_1
    assert ddim.clip_x0 is None and ddim.final_first_order
    dpm = S.sampler_setup(CONFIGS["sd15"], 20, "dpm_solver_pp")
    assert dpm.timesteps[0] == 1000 and dpm.timesteps[-1] == 0 and dpm.final_first_order
    assert dpm.settings["timestep_spacing"] == "linspace"  # PNDM's default "leading" is not inherited
    resaved = S.sampler_setup(CONFIGS["sd15_resaved"], 20, "dpm_solver_pp")
    assert resaved.settings["timestep_spacing"] == "leading" and resaved.timesteps[0] == 942  # steps + 1 spacing
    assert not S.sampler_setup(CONFIGS["sd15"], 20, "dpm_solver_pp", final_sigmas_type="sigma_min").final_first_order
    assert S.sampler_setup(CONFIGS["sd15"], 14, "dpm_solver_pp", final_sigmas_type="sigma_min").final_first_order
    assert S.sampler_setup(CONFIGS["linear"], 20, "ddim", clip_sample=True).clip_x0 == 1.0
    assert (
        S.sampler_setup(CONFIGS["sd15"], 20, "DPMSolverMultistepScheduler").timesteps.tolist() == dpm.timesteps.tolist()
    )


def test_effective_settings_match_diffusers():
    for r in RUNS:
        settings = S.sampler_settings(CONFIGS[r["config"]], r["sampler"], **r["overrides"])
        for key, value in r["effective"].items():
            assert settings[key] == value, (run_id(r), key)


@pytest.mark.parametrize(
    "cls,table", [("DDIMScheduler", S.DDIM_DEFAULTS), ("DPMSolverMultistepScheduler", S.DPM_DEFAULTS)]
)
def test_default_tables_are_diffusers_defaults(cls, table):
    recorded = FIXTURE["defaults"][cls]
    for key, value in table.items():
        want = recorded[key]
        assert (value == -math.inf and want == "-inf") or value == want, key


def test_read_from_folder_and_file(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIGS["sd21"]))
    grid = S.inference_timesteps(tmp_path / "scheduler", 20, "ddim")
    assert grid.tolist() == S.inference_timesteps(CONFIGS["sd21"], 20, "ddim").tolist()
    assert S.prediction_type(tmp_path / "scheduler" / "scheduler_config.json") == "v_prediction"
    with pytest.raises(SchedulerConfigError, match="scheduler_config.json: missing"):
        S.read_scheduler_config(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule must be"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas must hold num_train_timesteps=1000"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_schedule_refusals(change, match):
    with pytest.raises(SchedulerConfigError, match=match):
        S.schedule_from_config({**CONFIGS["sd15"], **change})


def test_prediction_type_refusals():
    with pytest.raises(SchedulerConfigError, match="eps_from_x0"):
        S.prediction_type({"prediction_type": "sample"})
    with pytest.raises(SchedulerConfigError, match="'epsilon' or 'v_prediction'"):
        S.prediction_type({"prediction_type": "flow_prediction"})


@pytest.mark.parametrize(
    "sampler,overrides,match",
    [
        ("dpm_solver_pp", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("dpm_solver_pp", {"solver_order": 3}, "solver_order"),
        ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpm_solver_pp", {"solver_type": "heun"}, "solver_type"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing must be"),
        ("euler", {}, "sampler must be one of"),
    ],
)
def test_sampler_refusals(sampler, overrides, match):
    with pytest.raises(SchedulerConfigError, match=match):
        S.inference_timesteps(CONFIGS["sd15"], 20, sampler, **overrides)


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(SchedulerConfigError, match="steps must be an integer"):
        S.inference_timesteps(CONFIGS["sd15"], steps, "ddim")


def test_out_of_range_timesteps_are_refused():
    # leading with steps_offset 1 at T steps would evaluate tau = T, past alphas_cumprod
    with pytest.raises(SchedulerConfigError, match="outside 0..999"):
        S.inference_timesteps(CONFIGS["sd15"], 1000, "ddim")


def test_a_last_step_that_does_not_move_is_dropped():
    # trained config: leading, offset 0, set_alpha_to_one False: diffusers' last tau is 0 and it
    # steps to alphas_cumprod[0] again (the network runs, the sample is returned unchanged)
    grid = S.inference_timesteps(CONFIGS["trained"], 10, "ddim", set_alpha_to_one=False)
    assert grid.tolist() == [46, 41, 36, 31, 26, 21, 16, 11, 6, 1]


def test_in_memory_diffusers_config_drops_keys_filled_by_default():
    # pipe.scheduler.config as diffusers holds it: PNDM's defaults listed in _use_default_values
    live = {
        **CONFIGS["sd15"],
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
        "_use_default_values": ["timestep_spacing", "prediction_type"],
    }
    assert S.sampler_settings(live, "dpm_solver_pp")["timestep_spacing"] == "linspace"
    assert (
        S.inference_timesteps(live, 20, "dpm_solver_pp").tolist()
        == S.inference_timesteps(CONFIGS["sd15"], 20, "dpm_solver_pp").tolist()
    )


SAMPLES = FIXTURE["samples"]


def sample_id(r):
    return f"{r['config']}-{r['steps']}-" + ",".join(f"{k}={v}" for k, v in r["overrides"].items())


@pytest.mark.parametrize("r", SAMPLES, ids=[sample_id(r) for r in SAMPLES])
def test_dpm_solver_pp_runs_equal_diffusers_end_to_end(r):
    """Whole runs against diffusers' step(): the order of the last step on a sigma_min grid (first
    under 15 steps or with euler_at_final, second otherwise) changes x0 by ~0.1-0.2 here, the bound is 1e-5."""
    import jax.numpy as jnp

    from jaxdiff import sampling

    config = CONFIGS[r["config"]]
    setup = S.sampler_setup(config, r["steps"], "dpm_solver_pp", **r["overrides"])
    assert (setup.timesteps[:-1] - 1).tolist() == r["timesteps"]
    schedule = S.schedule_from_config(config)
    var = r["data_std"] ** 2

    def eps_fn(x, t):  # the optimal predictor for data N(0, var), as the fixture script's
        abar = schedule.alpha_bar(t)[:, None]
        return jnp.sqrt(1 - abar) * x / (abar * var + 1 - abar)

    x = sampling.dpm_solver_pp(eps_fn, schedule, jnp.asarray(r["x_T"], jnp.float32), timesteps=setup.timesteps,
                               final_first_order=setup.final_first_order)
    np.testing.assert_allclose(np.asarray(x, np.float64), r["x0"], atol=1e-5)


def test_the_final_order_flag_reaches_the_coefficients():
    """The issue's probe: a 10-step sigma_min grid ends at t = 1, and its last step is first order."""
    import jax.numpy as jnp

    from jaxdiff import sampling

    cfg = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "final_sigmas_type": "sigma_min", "steps_offset": 1}
    setup = S.sampler_setup(cfg, 10, "dpm_solver_pp")
    assert setup.final_first_order and setup.timesteps[-1] == 1
    ts = jnp.asarray(setup.timesteps)
    w = sampling.dpm_solver_pp_coefficients(S.schedule_from_config(cfg), ts, final_first_order=True)["w"]
    assert float(w[-1]) == 0.0 and float(w[0]) == 0.0 and np.all(np.asarray(w[1:-1]) > 0)
    w2 = sampling.dpm_solver_pp_coefficients(S.schedule_from_config(cfg), ts)["w"]
    assert float(w2[-1]) > 0  # without the flag only a step to t = 0 is first order


def test_stable_diffusion_passes_the_setup_flags_to_its_samplers():
    from jaxdiff.pretrained.stable_diffusion import _frozen, _setup

    sigma_min = {**CONFIGS["sd15"], "final_sigmas_type": "sigma_min"}
    assert _setup(_frozen(sigma_min), "dpm_solver_pp", 10)[2] is True
    assert _setup(_frozen(sigma_min), "dpm_solver_pp", 20)[2] is False
    # a DDIMScheduler file without clip_sample clips x0 at 1 in diffusers (the class default)
    ddim = {k: v for k, v in CONFIGS["sd21"].items() if k != "clip_sample"}
    assert _setup(_frozen(ddim), "ddim", 20)[1] == 1.0
    assert _setup(_frozen(CONFIGS["sd21"]), "ddim", 20)[1] is None


def test_class_keys_are_diffusers_constructor_keys():
    assert sorted(S.SUPPORTED_CLASSES) == sorted(FIXTURE["class_keys"])
    for cls, keys in FIXTURE["class_keys"].items():
        assert sorted(S.CLASS_KEYS[cls]) == keys, cls
    for key in (*S.DDIM_DEFAULTS, *S.DPM_DEFAULTS):
        assert key in S.KNOWN_KEYS


def test_an_unsupported_scheduler_class_is_refused(tmp_path):
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    for reader in (S.schedule_from_config, S.prediction_type, lambda c: S.sampler_settings(c, "ddim")):
        with pytest.raises(SchedulerConfigError, match="'FlowMatchEulerDiscreteScheduler' is not supported") as err:
            reader(flow)
        assert "DDIMScheduler" in str(err.value) and "EulerDiscreteScheduler" in str(err.value)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(flow))
    with pytest.raises(SchedulerConfigError, match=r"scheduler_config.json: scheduler class"):
        S.read_scheduler_config(tmp_path)
    # every supported class reads as the same betas
    for cls in S.SUPPORTED_CLASSES:
        assert S.schedule_from_config({**CONFIGS["sd15"], "_class_name": cls}).spec == S.schedule_from_config(
            CONFIGS["sd15"]).spec


def test_unknown_keys_are_named_with_the_closest_known_one(capsys):
    S._warned.clear()
    typo = {**CONFIGS["sd15"], "beta_shedule": "linear"}
    S.schedule_from_config(typo)
    S.prediction_type(typo)  # read again: no second line
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown scheduler key 'beta_shedule' (did you mean 'beta_schedule'?) is ignored" in err
    # an override is the caller's own typo: refused
    with pytest.raises(SchedulerConfigError, match=r"unknown scheduler setting 'timestep_spaceing' \(did you mean "
                                                   r"'timestep_spacing'\?\)"):
        S.sampler_setup(CONFIGS["sd15"], 20, "ddim", timestep_spaceing="trailing")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"beta_start": "abc"}, r"beta_start must be a number, got 'abc'"),
        ({"beta_end": True}, "beta_end must be a number"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an integer"),
        ({"trained_betas": ["x"]}, "trained_betas must be null or a list of numbers"),
        ({"steps_offset": "1"}, "steps_offset must be an integer"),
        ({"set_alpha_to_one": 0}, "set_alpha_to_one must be true or false"),
    ],
)
def test_mistyped_values_are_named(change, match):
    with pytest.raises(SchedulerConfigError, match=match):
        S.sampler_setup({**CONFIGS["sd15"], **change}, 20, "ddim")


def test_long_timestep_lists_are_shortened_in_messages():
    with pytest.raises(SchedulerConfigError) as err:
        S.sampler_setup(CONFIGS["sd15"], 1000, "dpm_solver_pp")
    msg = str(err.value)
    assert "repeats a timestep (diffusers' tau [500] of [999, 998, 997, ..., 3, 2, 1] (1000 values))" in msg
    with pytest.raises(SchedulerConfigError, match=r"\[1000, 999, 998, \.\.\., 3, 2, 1\] \(1000 values\)"):
        S.sampler_setup(CONFIGS["sd15"], 1000, "ddim")


def test_the_sd_pipeline_hands_the_flags_to_sampling_run(monkeypatch):
    """What Pipeline.sample passes on for a sigma_min DPM-Solver config and a clipping DDIM config
    (sampling.run replaced by a recorder, so no network runs)."""
    import jax

    from jaxdiff import pipeline as P
    from jaxdiff.pretrained import stable_diffusion

    sd = stable_diffusion.load(pathlib.Path(__file__).parent / "fixtures" / "sd_tiny_sd1pipe", offline=True)
    pipe = P.Pipeline.for_stable_diffusion(sd)
    pipe.decode = None
    seen = []

    def record(name, eps_fn, schedule, x_T, **kwargs):
        seen.append((name, {k: kwargs.get(k) for k in ("clip_x0", "final_first_order")}))
        return x_T

    monkeypatch.setattr(P.sampling, "run", record)
    for config, sampler, want in [
        ({**sd.scheduler_config, "final_sigmas_type": "sigma_min"}, "dpm++",
         {"clip_x0": None, "final_first_order": True}),
        ({**sd.scheduler_config, "clip_sample": True}, "ddim", {"clip_x0": 1.0, "final_first_order": None}),
    ]:
        sd.scheduler_config = config  # read by sd.sampler_options at each call
        jax.block_until_ready(pipe.sample(["a cat"], sampler=sampler, steps=10, height=16, width=16))
        assert seen[-1] == (sampler, want)
