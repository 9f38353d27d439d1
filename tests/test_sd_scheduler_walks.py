"""diffusers' PNDM and UniPC as jaxdiff walks them, sampler="auto" and the A1111 names, against diffusers'
recorded runs (tests/fixtures/make_multistep_fixtures.py: timesteps and every sample of ``step()`` driven by
a closed-form model, SD-1.5's PNDM config and SD-2.1's v-prediction config, Karras sigmas on and off), and
``pipe(["a prompt"])`` on the tiny SD-1 folder against diffusers' default call (PNDM, 50 steps).

Measured: trajectories within 7e-7 of diffusers' (relative to the largest value), the default call's image
within 6e-7; the bounds are 1e-5 and 1e-3. Combining eps instead of v in a v-prediction PNDM run is 2.5e-2
off, and Karras UniPC converting v at the rounded timestep's abar 2.5e-4: the bound tells both apart.
"""

import json
import pathlib
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.conditions import Labels
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import multistep, scheduler, walks
from jaxdiff.pretrained.scheduler import SchedulerConfigError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "sd_scheduler" / "multistep.json").read_text())
RUNS = EXPECTED["runs"]
SD15 = EXPECTED["configs"]["sd15"]


def run_id(r):
    return f"{r['config']}-{r['sampler']}-{r['steps']}" + "".join(f"-{k}={v}" for k, v in r["overrides"].items()) + (
        f"-from-{r['start']}" if r["start"] else "")


def plan_of(r):
    config = scheduler.read_scheduler_config(EXPECTED["configs"][r["config"]])
    return walks._plan(config, r["sampler"], r["steps"], r["overrides"], r["start"])


def padded(sampler, plan, n):
    """The plan with steps that leave the state as it is appended up to n rows, so that runs of one sampler
    share one compiled program (the padding runs after the last real step)."""
    out, k = dict(plan), n - len(plan["t"])
    if sampler == "pndm":
        fill = {"t": 1, "t_src": 1, "t_dst": 1, "acc_keep": 1.0, "acc_add": 0.0, "push": False, "save": False,
                "use_saved": False}
        for key, v in fill.items():
            out[key] = np.concatenate([plan[key], np.full(k, v, np.asarray(plan[key]).dtype)])
        out["w"] = np.concatenate([plan["w"], np.zeros((k, 5))])
        return out
    for key, v in {"t": 1, "alpha": 1.0, "sigma": 0.0, "pA": 1.0, "pB": 0.0, "cA": 0.0, "cB": 0.0, "cD": 0.0,
                   "use_c": 0.0}.items():
        out[key] = np.concatenate([plan[key], np.full(k, v)])
    for key in ("pC", "cC"):
        wide = np.zeros((n, 2))
        wide[: len(plan[key]), : plan[key].shape[1]] = plan[key]
        out[key] = wide
    return out


@jax.jit
def _model_eps(x, abar):
    s = EXPECTED["data_std"]
    return jnp.sqrt(1 - abar) * x / (abar * s**2 + 1 - abar) + 0.1 * jnp.tanh(x)


@pytest.fixture(scope="module")
def trajectories():
    """jaxdiff's trajectory of every recorded run (one compiled program per sampler and prediction type)."""
    schedule = scheduler.schedule_from_config(SD15)  # SD-2.1's betas are SD-1.5's
    walk = {"pndm": multistep.pndm_walk, "unipc": multistep.unipc_walk}

    @partial(jax.jit, static_argnames=("sampler", "prediction"))
    def run_all(plan, x_T, *, sampler, prediction):
        eps_fn = lambda x, t: _model_eps(x, schedule.alpha_bar(t)[:, None])
        return walk[sampler](eps_fn, schedule, x_T, plan, prediction=prediction, return_trajectory=True)[1]
    n = {s: max(len(plan_of(r)[1]["t"]) for r in RUNS if r["sampler"] == s) for s in walk}
    out = {}
    for r in RUNS:
        settings, plan = plan_of(r)
        plan = {k: v for k, v in padded(r["sampler"], plan, n[r["sampler"]]).items() if k not in ("taus", "orders")}
        xs = run_all(plan, jnp.asarray(EXPECTED["x_T"], jnp.float32), sampler=r["sampler"],
                     prediction=settings["prediction_type"])
        out[run_id(r)] = np.asarray(xs)[1: len(r["trajectory"]) + 1]
    return out


@pytest.mark.parametrize("r", RUNS, ids=run_id)
def test_timesteps_and_trajectories_equal_diffusers(r, trajectories):
    """Whole runs, and image-to-image's tails (diffusers' timesteps[start:], the warm-up again from there)."""
    _, plan = plan_of(r)
    assert plan["taus"].tolist() == r["timesteps"]
    want = np.asarray(r["trajectory"])
    got = trajectories[run_id(r)]
    assert got.shape == want.shape and np.all(np.isfinite(got))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{run_id(r)}: {err:.2e}"


def test_the_runs_cover_what_the_issue_asks():
    seen = {(r["config"], r["sampler"], r["steps"] <= 10, bool(r["overrides"].get("use_karras_sigmas"))) for r in RUNS
            if not r["start"]}
    for sampler in ("pndm", "unipc"):
        for config in ("sd15", "sd21"):
            assert (config, sampler, True, False) in seen or (config, sampler, True, True) in seen
    assert {("sd15", "unipc", s, k) for s in (True, False) for k in (True, False)} <= seen
    assert EXPECTED["configs"]["sd21"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("cls,table", [("PNDMScheduler", scheduler.PNDM_DEFAULTS),
                                       ("UniPCMultistepScheduler", scheduler.UNIPC_DEFAULTS)])
def test_default_tables_are_diffusers_defaults(cls, table):
    recorded = EXPECTED["defaults"][cls]
    assert {k: v for k, v in table.items() if k in recorded} == {k: recorded[k] for k in table if k in recorded}
    assert set(table) - set(recorded) <= {"thresholding", "rescale_betas_zero_snr", "disable_corrector"}


def test_the_pndm_and_unipc_tables_hold_diffusers_orders():
    """PLMS: one extra evaluation (the first timestep twice), Adams-Bashforth weights summing to 1; UniPC:
    first order first and last (lower_order_final), second between."""
    plan = multistep.pndm_plan(scheduler.sampler_settings(SD15, "pndm"), 50)
    assert len(plan["t"]) == 51 and plan["t"][1] == plan["t"][2] == 962
    np.testing.assert_allclose(plan["w"].sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(plan["w"][-1, :4], [55 / 24, -59 / 24, 37 / 24, -9 / 24])
    u = multistep.unipc_plan(scheduler.sampler_settings(SD15, "unipc"), walks._abar(scheduler.sampler_settings(
        SD15, "unipc")), 20)
    assert u["orders"].tolist() == [1] + [2] * 18 + [1]
    assert u["use_c"].tolist() == [0.0] + [1.0] * 19


# ----------------------------------------------------------------------------- names


def test_auto_maps_each_diffusers_class():
    for cls, name in [("PNDMScheduler", "pndm"), ("DDIMScheduler", "ddim"), ("UniPCMultistepScheduler", "unipc"),
                      ("DPMSolverMultistepScheduler", "dpm_solver_pp")]:
        assert walks.resolve({**SD15, "_class_name": cls}, "auto") == (name, {})
    sde = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    assert walks.CLASSES["DPMSolverMultistepScheduler"](sde) == "dpm_solver_pp_sde"
    for cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                "LMSDiscreteScheduler"):
        name = walks.CLASSES[cls]({})
        assert name in walks.NFE and name in {n for n, _ in walks.A1111.values()}
        if name not in walks.RUNNERS:  # walks registered by another part; until then one clear line
            with pytest.raises(SchedulerConfigError, match=rf"the folder's {cls}\) means jaxdiff's '{name}' walk.*"
                                                           r"does not have yet.*'pndm'.*pick one with sampler="):
                walks.resolve({**SD15, "_class_name": cls}, "auto")
    with pytest.raises(SchedulerConfigError, match="'KDPM2DiscreteScheduler' has no jaxdiff walk; the classes that "
                                                   "do: PNDMScheduler, DDIMScheduler.*pick a sampler with sampler="):
        walks.resolve({**SD15, "_class_name": "KDPM2DiscreteScheduler"}, "auto")


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_the_table_s_evaluation_counts_are_the_walks(steps):
    for name in walks.RUNNERS:
        assert walks.make_walk(SD15, name, steps).nfe == walks.NFE[name][1](steps), name


def test_a1111_names():
    assert walks.resolve(SD15, "PLMS") == ("pndm", {"skip_prk_steps": True})
    assert walks.resolve(SD15, "UniPC") == ("unipc", {})
    assert walks.resolve(SD15, "DDIM") == ("ddim", {})
    assert walks.A1111["DPM++ 2M Karras"] == ("dpm_solver_pp_2m", {"use_karras_sigmas": True})
    assert walks.A1111["LMS Karras"] == ("lms_discrete", {"use_karras_sigmas": True})
    assert walks.A1111["DPM++ 2M SDE Karras"][0] == "dpm_solver_pp_sde"
    with pytest.raises(SchedulerConfigError, match=r"unknown sampler 'Euler A': expected one of \['auto'"):
        walks.resolve(SD15, "Euler A")
    # the folder's class does not matter for a name: PLMS on SD-2.1's DDIM folder is PNDM from its config
    w = walks.make_walk(EXPECTED["configs"]["sd21"], "PLMS", 10)
    assert (w.sampler, w.scheduler_class, w.steps, w.nfe) == ("pndm", "PNDMScheduler", 10, 11)
    assert w == walks.make_walk(EXPECTED["configs"]["sd21"], "PLMS", 10) and hash(w) == hash(
        walks.make_walk(EXPECTED["configs"]["sd21"], "PLMS", 10))  # one compiled program per walk


def test_a_walk_handed_the_end_of_its_grid_walks_diffusers_img2img_tail():
    r = next(r for r in RUNS if r["sampler"] == "pndm" and r["start"] == 5)
    w = walks.make_walk(EXPECTED["configs"][r["config"]], "pndm", r["steps"])
    assert w.grid[5] - 1 == r["timesteps"][0] and len(w.grid) == r["steps"] + 2  # image noised to grid[start]
    schedule = scheduler.schedule_from_config(SD15)
    eps_fn = lambda x, t: _model_eps(x, schedule.alpha_bar(t)[:, None])
    x = w(eps_fn, schedule, jnp.asarray(EXPECTED["x_T"], jnp.float32), timesteps=np.asarray(w.grid[5:]))
    np.testing.assert_allclose(np.asarray(x), r["trajectory"][-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes no clip_x0= and no timesteps= but the end of its own grid"):
        w(eps_fn, schedule, jnp.zeros((1, 3)), timesteps=np.asarray([501, 301, 0]))
    karras = walks.make_walk(
        {**SD15, "_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}, "auto", 10)
    assert not karras.noise_at_timestep and w.noise_at_timestep


def test_the_readme_table_is_the_code_table():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    found = re.search(r"<!-- sampler-names -->\n(.*?)\n<!-- /sampler-names -->", text, re.S)
    assert found, "README.md lost its <!-- sampler-names --> table"
    assert found.group(1) == walks.markdown_table(), (
        "README's sampler table differs from jaxdiff.pretrained.walks.markdown_table(); paste its output")
    assert set(walks.A1111) == {row.split("`")[1] for row in found.group(1).splitlines()[2:]}


# ----------------------------------------------------------------------------- the pipeline


def test_the_default_call_is_diffusers_default_call():
    """pipe(["a prompt"]) on an SD-1.5-style folder runs its PNDM for diffusers' 50 steps, guidance 7.5."""
    folder = FIXTURES / "sd_tiny_sd1pipe"
    ref = np.load(folder / "default_call.npz")
    latents = np.load(folder / "reference.npz")["latents"][:1]
    pipe = Pipeline.from_pretrained(folder)
    x = pipe.sample(["a prompt"], latents=latents)
    err = np.abs(np.clip((np.asarray(x) + 1) / 2, 0, 1) - ref["images"]).max()
    assert err < 1e-3, err
    used = pipe.last_sampling
    assert (used["sampler"], used["asked"], used["scheduler_class"], used["steps"]) == (
        "pndm", "auto", "PNDMScheduler", 50)
    assert str(ref["scheduler"]) == "PNDMScheduler" and used["timesteps"] == ref["timesteps"].tolist()
    assert used["evaluations"] == 51 and "981 .. 1" in used["line"]
    with pytest.raises(ValueError, match="sampler 'UniPC' walks diffusers' UniPCMultistepScheduler"):
        pipe(["a cat"], sampler="UniPC", steps=2, clip_x0=1.0)


def test_label_pipelines_keep_dpm_solver_for_auto():
    pipe = Pipeline(lambda p, x, t, c: jnp.zeros_like(x), {}, scheduler.schedule_from_config(SD15), Labels(2),
                    (4, 4, 1))
    pipe.sample([0], steps=1)
    assert pipe.last_sampling["sampler"] == "dpm++" and pipe.last_sampling["asked"] == "auto"


def test_the_sigma_walks_are_walks():
    """wt-schedk's sigma walks run through the same names: "auto" of their classes, A1111's names, "<walk>_karras"."""
    for cls, name in [("EulerDiscreteScheduler", "euler_discrete"), ("HeunDiscreteScheduler", "heun_discrete"),
                      ("EulerAncestralDiscreteScheduler", "euler_ancestral_discrete"),
                      ("LMSDiscreteScheduler", "lms_discrete")]:
        assert walks.resolve({**SD15, "_class_name": cls}, "auto") == (name, {})
        assert walks.RUNNERS[name].raw_output and not walks.RUNNERS["pndm"].raw_output
    dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler"}
    assert walks.resolve({**dpm, "use_karras_sigmas": True}, "auto") == ("dpm_solver_pp_2m", {})
    assert walks.resolve({**dpm, "use_karras_sigmas": True}, "DPM++ 2M") == ("dpm_solver_pp_2m", {})
    assert walks.resolve(dpm, "DPM++ 2M") == ("dpm_solver_pp", {})
    assert walks.resolve(SD15, "euler_discrete_karras") == ("euler_discrete", {"use_karras_sigmas": True})
    assert walks.resolve(SD15, "dpm_solver_pp_karras") == ("dpm_solver_pp_2m", {"use_karras_sigmas": True})
    with pytest.raises(SchedulerConfigError, match="unknown sampler 'euler_ancestral_discrete_karras'"):
        walks.resolve(SD15, "euler_ancestral_discrete_karras")  # the class has no use_karras_sigmas
    # the walk's timesteps are sigma_setup's (fractional under Karras), Heun's each but the first twice
    w = walks.make_walk(SD15, "LMS Karras", 7)
    setup = scheduler.sigma_setup(SD15, 7, "lms_discrete", use_karras_sigmas=True)
    np.testing.assert_array_equal(np.asarray(w.taus) + 1, setup.walk.t)
    assert not w.noise_at_timestep and w.report()["overrides"] == {"use_karras_sigmas": True}
    # a sigma walk's grid: its distinct times and a marker endpoint; it runs contiguous parts of it
    assert w.grid == (*setup.walk.t, 0.0) and w.order == 1
    heun = walks.make_walk(SD15, "Heun", 4)
    t = np.asarray(scheduler.sigma_setup(SD15, 4, "heun_discrete").walk.t) - 1
    np.testing.assert_array_equal(heun.taus, [t[0], t[1], t[1], t[2], t[2], t[3], t[3]])
    assert heun.order == 2 and len(heun.grid) == 5
    np.testing.assert_array_equal(heun.part_taus(heun.grid[1:]), [t[1], t[2], t[2], t[3], t[3]])
    np.testing.assert_array_equal(heun.part_taus(heun.grid[:3]), [t[0], t[1], t[1]])  # a base's cut: Euler last
    with pytest.raises(ValueError, match="takes no timesteps= but a contiguous part of its own grid"):
        w(lambda x, t: x, None, jnp.zeros((1, 3)), timesteps=np.asarray([501, 0]))
    with pytest.raises(ValueError, match="takes no clip_x0="):
        w(lambda x, t: x, None, jnp.zeros((1, 3)), clip_x0=1.0)


def test_a_part_of_a_sigma_walk_is_diffusers_begin_index():
    """Parts of a walk as image-to-image and the ensemble run them (closed form, float64): Euler from step 2 of 5
    from a sample already at sigma_2 (no init_noise_sigma), and the base's cut, which ends at sigma_3; LMS's first
    step from step 2 takes the whole walk's third-order weight of its one slope, as diffusers' LMS does."""
    from jaxdiff import sigma_sampling

    whole = scheduler.sigma_setup(SD15, 5, "euler_discrete").walk
    s = np.asarray(whole.sigmas)
    part = sigma_sampling.part(whole, 2, from_sample=True)
    assert part.t == whole.t[2:] and part.sigmas == whole.sigmas[2:] and part.init_sigma == 1.0
    base = sigma_sampling.part(whole, 0, 3)
    assert base.init_sigma == whole.init_sigma and base.t == whole.t[:3] and base.sigmas == whole.sigmas[:4]
    with pytest.raises(ValueError, match="0 <= first < stop <= 5"):
        sigma_sampling.part(whole, 3, 3)
    x = np.float64(0.7)
    zero = lambda x_in, t: jnp.zeros_like(x_in)  # eps 0: x0 = x, every slope 0
    lin = lambda x_in, t: x_in * 0 + 1.0  # eps 1: every slope 1, each step moves by its sigma difference
    got = sigma_sampling.euler_discrete(lin, None, jnp.full((1, 1), x, jnp.float32), walk=part)
    np.testing.assert_allclose(np.asarray(got)[0, 0], x + s[-1] - s[2], rtol=1e-5)
    got = sigma_sampling.euler_discrete(zero, None, jnp.full((1, 1), x, jnp.float32), walk=part)
    np.testing.assert_allclose(np.asarray(got)[0, 0], x, rtol=1e-6)
    one_step = sigma_sampling.part(whole, 2, 3, from_sample=True)
    got = sigma_sampling.lms_discrete(lin, None, jnp.full((1, 1), x, jnp.float32), walk=one_step,
                                      earlier=whole.sigmas[:2])
    weight = sigma_sampling.lms_coefficients(s)[2, 0]  # the Lagrange weight through sigma_2, sigma_1, sigma_0
    np.testing.assert_allclose(np.asarray(got)[0, 0], x + weight, rtol=1e-5)
    assert abs(weight - (s[3] - s[2])) > 1e-3  # not Euler's: the test tells the two apart


def test_a_sigma_walk_gets_the_raw_output_and_converts_v_at_its_sigma():
    """A v-prediction folder's Euler walk, run as the pipeline runs it (the network's raw output), equals
    sigma_sampling's sampler on sigma_setup's walk; converting v to eps at the integer-t abar first would not."""
    sd21 = EXPECTED["configs"]["sd21"]
    w = walks.make_walk(sd21, "euler_discrete_karras", 5)
    setup = scheduler.sigma_setup(sd21, 5, "euler_discrete", use_karras_sigmas=True)
    v_net = lambda x, t: 0.3 * x + 0.01 * t[:, None]
    x_T = jnp.asarray(EXPECTED["x_T"], jnp.float32)
    from jaxdiff import sigma_sampling

    want = sigma_sampling.euler_discrete(v_net, None, x_T, walk=setup.walk, prediction="v_prediction")
    np.testing.assert_array_equal(np.asarray(w(v_net, scheduler.schedule_from_config(sd21), x_T)), np.asarray(want))
