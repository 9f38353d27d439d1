"""Stable Diffusion through jaxdiff's pipeline equals diffusers' StableDiffusionPipeline: two tiny random-weight
pipelines (tests/fixtures/sd_tiny_sd{1,2}pipe, made by make_sd_pipeline_fixtures.py), epsilon and v-prediction,
DDIM and DPM-Solver++ at 20 steps with guidance 7.5 and negative prompts, from the same initial latents.
Measured: at most 1.7e-6 apart (images in [0, 1]); the bound is 1e-3."""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipeline import NonFiniteSample, Pipeline

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
NEGATIVE = ["blurry", "low quality, watermark"]


def folder(name):
    return os.path.join(FIXTURES, f"sd_tiny_{name}")


@pytest.fixture(scope="module", params=["sd1pipe", "sd2pipe"])
def loaded(request):
    return request.param, Pipeline.from_pretrained(folder(request.param)), np.load(
        os.path.join(folder(request.param), "reference.npz"))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_the_whole_pipeline_equals_diffusers(loaded, sampler):
    name, pipe, ref = loaded
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler=sampler, steps=20, latents=ref["latents"], height=32,
                    width=32)
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    assert images.shape == ref[f"{sampler}/images"].shape == (2, 32, 32, 3)
    err = np.abs(images - ref[f"{sampler}/images"]).max()
    assert err < 1e-3, f"{name} {sampler}: {err:.2e}"
    # the grid: diffusers' timesteps, one later in jaxdiff's 1-indexed t, then the endpoint
    grid = np.asarray(pipe.grid(sampler, 20))
    np.testing.assert_array_equal(grid[:-1], ref[f"{sampler}/timesteps"] + 1)
    assert grid[-1] == (1 if sampler == "ddim" else 0)  # SD's DDIM stops at alphas_cumprod[0]


@pytest.mark.parametrize("loaded", ["sd2pipe"], indirect=True)
def test_a_sigma_walk_equals_diffusers(loaded):
    """diffusers' EulerDiscreteScheduler with Karras sigmas (fixtures/sd_ksched/pipeline.npz, made by
    make_ksched_fixtures.py) on the v-prediction pipeline: the U-Net at fractional times, v converted at
    the Karras sigmas. Measured 3.5e-6 apart."""
    name, pipe, ref = loaded
    want = np.load(os.path.join(FIXTURES, "sd_ksched", "pipeline.npz"))
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="euler_discrete_karras", steps=8, latents=ref["latents"],
                    height=32, width=32)
    images = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    assert np.abs(images - want["euler_discrete_karras/images"]).max() < 1e-4
    assert pipe.last_sampling["sampler"] == "euler_discrete" and pipe.last_sampling["overrides"] == {
        "use_karras_sigmas": True}
    walk = pipe.walk("euler_discrete_karras", 8).plan()["walk"]
    np.testing.assert_allclose(np.asarray(walk.t) - 1, want["euler_discrete_karras/timesteps"], rtol=1e-5)
    np.testing.assert_allclose(walk.sigmas, want["euler_discrete_karras/sigmas"], rtol=2e-5)


@pytest.mark.parametrize("loaded", ["sd1pipe"], indirect=True)
def test_a1111_dpm_2m_karras_equals_diffusers(loaded):
    """sampler="DPM++ 2M Karras" (diffusers' DPMSolverMultistepScheduler with use_karras_sigmas=True, recorded in
    fixtures/sd_ksched/pipeline.npz) on the epsilon pipeline: dpm_solver_pp_2m on the Karras sigma walk."""
    name, pipe, ref = loaded
    want = np.load(os.path.join(FIXTURES, "sd_ksched", "pipeline.npz"))
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="DPM++ 2M Karras", steps=8, latents=ref["latents"],
                    height=32, width=32)
    err = np.abs(np.clip((np.asarray(x) + 1) / 2, 0, 1) - want["dpm_2m_karras/images"]).max()
    assert err < 1e-4, err
    used = pipe.last_sampling
    assert (used["sampler"], used["scheduler_class"], used["overrides"], used["evaluations"]) == (
        "dpm_solver_pp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 8)
    np.testing.assert_allclose(used["timesteps"], want["dpm_2m_karras/timesteps"])


def narrowed(params):
    """``params`` with the autoencoder's posterior narrowed as make_ksched_fixtures.py narrows diffusers' (std
    exp(-15)): the image's latents are its mean in both."""
    conv = params["vae"]["params"]["quant_conv"]
    half = conv["bias"].shape[0] // 2
    conv = {"kernel": conv["kernel"].at[..., half:].set(0), "bias": conv["bias"].at[half:].set(-30)}
    return {**params, "vae": {"params": {**params["vae"]["params"], "quant_conv": conv}}}


@pytest.mark.parametrize("loaded", ["sd1pipe"], indirect=True)
@pytest.mark.parametrize("sampler, key", [("euler_discrete_karras", "euler_karras_img2img"), ("LMS", "lms_img2img")])
def test_image_to_image_on_a_sigma_walk_equals_diffusers(loaded, sampler, key):
    """StableDiffusionImg2ImgPipeline under EulerDiscreteScheduler with Karras sigmas and LMS, strength 0.6 of 8
    steps (fixtures/sd_ksched/pipeline.npz): the walk from step 8 - int(4.8) = 4, the image's latents plus the
    noise times that step's sigma, not scaled by init_noise_sigma (the folder's "leading" spacing makes that
    sqrt(sigma^2 + 1)); LMS weighs its first steps by the absolute step index, as diffusers does. (Heun, walked
    from timesteps[2 * 4:], was checked once: 7.6e-6.) Measured at most 1.2e-5 apart (images in [0, 1], stored
    as uint16: within 7.7e-6)."""
    name, pipe, _ = loaded
    want = np.load(os.path.join(FIXTURES, "sd_ksched", "pipeline.npz"))
    params = pipe.params
    pipe.params = narrowed(params)
    try:
        x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler=sampler, steps=8, image=want["img2img/image"],
                        strength=0.6, latents=want["img2img/noise"])
    finally:
        pipe.params = params
    err = np.abs(np.clip((np.asarray(x) + 1) / 2, 0, 1) - want[f"{key}/images_u16"] / 65535).max()
    assert err < 1e-4, err
    np.testing.assert_allclose(pipe.last_sampling["timesteps"], want[f"{key}/timesteps"][4:], rtol=1e-5)


def test_v_prediction_is_read_from_the_scheduler_config():
    assert Pipeline.from_pretrained(folder("sd2pipe")).eps_model.__self__.prediction == "v_prediction"
    sd1 = Pipeline.from_pretrained(folder("sd1pipe"))
    assert sd1.eps_model.__self__.prediction == "epsilon" and not sd1.inpainting  # in_channels 4: text-to-image


def test_uint8_rgb_of_any_multiple_of_the_latent_factor_and_seeds(loaded):
    name, pipe, _ = loaded
    a = pipe(["a cat"], steps=3, height=16, width=24, seed=1)
    assert a.shape == (1, 16, 24, 3) and a.dtype == np.uint8
    # sampler="auto": the folder's scheduler class, and the call says what it ran (diffusers' timesteps)
    used = pipe.last_sampling
    assert (used["sampler"], used["scheduler_class"], used["steps"]) == (
        ("pndm", "PNDMScheduler", 3) if name == "sd1pipe" else ("ddim", "DDIMScheduler", 3))
    assert used["timesteps"] == ([667, 334, 334, 1] if name == "sd1pipe" else [667, 334, 1])
    both = pipe(["a cat", "a dog"], steps=3, height=16, width=24, seed=1)
    np.testing.assert_array_equal(both[:1], a)  # image i depends on (seed, i) alone
    for kwargs, msg in [({"height": 17}, "height must be a positive multiple of 2"), ({"width": 0}, "width"),
                        ({"latents": np.zeros((1, 4, 4, 4))}, r"latents must have shape \(1, 16, 16, 4\)")]:
        with pytest.raises(ValueError, match=msg):
            pipe(["a cat"], steps=3, **kwargs)


def test_image_to_image_walks_the_end_of_the_grid_from_the_noised_image(monkeypatch):
    """With strength s the sampler evaluates the network at grid[steps - int(steps s):-1] only."""
    pipe = Pipeline.from_pretrained(folder("sd1pipe"))
    seen = []
    inner = pipe.eps_model

    def spy(params, z, t, c):
        jax.debug.callback(lambda t: seen.append(int(t[0])), t)
        return inner(params, z, t, c)

    pipe.eps_model = spy
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = pipe(["a cat"], image=image, strength=0.5, sampler="ddim", steps=10)
    assert out.shape == (1, 32, 32, 3)
    grid = pipe.grid("ddim", 10)
    assert seen == list(grid[5:-1])
    # a NumPy or 0-d jax strength is a number like any other (same program, same images)
    np.testing.assert_array_equal(pipe(["a cat"], image=image, strength=np.float32(0.5), sampler="ddim", steps=10), out)
    with pytest.raises(ValueError, match="strength is for image-to-image: pass image= too"):
        pipe(["a cat"], strength=0.5, sampler="ddim", steps=10)
    for kwargs, msg in [({"strength": 0.0}, r"strength must be in \(0, 1\]"), ({"strength": 0.05}, "leaves no step"),
                        ({"strength": "0.5"}, r"strength must be in \(0, 1\]"),
                        ({"strength": np.bool_(True)}, r"strength must be in \(0, 1\]"),
                        ({"sampler": "heun"}, "image-to-image takes a sampler with a timestep grid"),
                        ({"image": np.zeros((16, 16, 3), np.uint8), "height": 32, "width": 32},
                         "image must be uint8 of shape")]:
        with pytest.raises(ValueError, match=msg):
            pipe(["a cat"], **{"image": image, "sampler": "ddim", "steps": 10, **kwargs})


def test_a_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    from jaxdiff.pretrained.folder import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound) as err:
        Pipeline.from_pretrained("someone/stable-diffusion-nowhere")
    assert "\n" not in str(err.value) and "pass the folder" in str(err.value)


def test_bf16_compute_stays_close_to_float32():
    ref = np.load(os.path.join(folder("sd1pipe"), "reference.npz"))
    pipe = Pipeline.from_pretrained(folder("sd1pipe"), dtype=jnp.bfloat16)
    x = pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="dpm++", steps=20, latents=ref["latents"], height=32,
                    width=32)
    err = np.abs(np.clip((np.asarray(x) + 1) / 2, 0, 1) - ref["dpm++/images"]).mean()
    assert err < 0.02, err  # bf16 activations: about 2-3 significant digits per layer


def test_sd_text2img_command(tmp_path, capsys):
    from experiments.sd_text2img import main

    main(["--model", folder("sd2pipe"), "--prompt", "a red bicycle", "--prompt", "a cat", "--per-prompt", "2",
          "--negative", "blurry", "--steps", "3", "--out", str(tmp_path), "--attention", "cudnn"])
    out, err = capsys.readouterr()
    assert "done: 4 images 32x32" in out and "per image" in out
    assert "sampler ddim (DDIMScheduler; asked 'auto'), 3 steps, 3 network evaluations at diffusers' timesteps " \
           "667 .. 1\n" in out
    if jax.default_backend() != "gpu":  # README's attention="cudnn" runs everywhere: XLA's where no cuDNN
        assert "note: attention='cudnn' needs an NVIDIA GPU with cuDNN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.png", "001.png", "002.png", "003.png", "grid.png"]


# --------------------------------------------------------------------------------------------
# bad folders and bad calls: one line naming the culprit (docs/FAULTS.md, "Loading and the pipeline")


def damaged_copy(tmp_path, name="sd1pipe"):
    root = tmp_path / name
    shutil.copytree(folder(name), root)
    return root


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_configs_that_do_not_fit_are_refused_before_any_weight_is_read(tmp_path):
    root = damaged_copy(tmp_path)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never reached
    unet, tok = root / "unet" / "config.json", root / "tokenizer" / "tokenizer.json"
    original = {p: p.read_text() for p in (unet, tok)}

    def eos_5000(d):
        d["model"]["vocab"]["<|endoftext|>"] = 5000
        for t in d["added_tokens"]:
            t["id"] = 5000 if t["content"] == "<|endoftext|>" else t["id"]

    for path, change, msg in [
        (unet, lambda d: d.update(in_channels=7), r"unet/config.json: in_channels 7 fits neither text-to-image \(4, "
                                                  r"the autoencoder's latent_channels\) nor inpainting \(9 = 4 latent "
                                                  r"\+ 1 mask \+ 4 masked-image channels\)"),
        (unet, lambda d: d.update(sample_size=0), r"unet/config.json: sample_size must be a positive integer"),
        (tok, eos_5000, r"tokenizer: eos_token '<\|endoftext\|>' has id 5000, outside \S+text_encoder/config.json's "
                        r"vocab_size 1000"),
    ]:
        edit_json(path, change)
        with pytest.raises(ValueError, match=msg) as err:
            Pipeline.from_pretrained(root)
        assert "\n" not in str(err.value)
        path.write_text(original[path])
    with pytest.raises(ValueError, match="safetensors"):  # the folder is otherwise whole: the weights come next
        Pipeline.from_pretrained(root)


def test_compute_settings_are_checked_and_cudnn_falls_back(capsys):
    from jaxdiff.pretrained.stable_diffusion import compute_settings

    for kwargs, msg in [({"dtype": "garbage"}, "dtype must be one of float32, bfloat16, float16"),
                        ({"dtype": jnp.int32}, "dtype must be one of float32, bfloat16, float16"),
                        ({"attention": "flash"}, r"attention must be one of None, 'xla', 'cudnn' .*got 'flash'")]:
        with pytest.raises(ValueError, match=msg):
            Pipeline.from_pretrained(folder("sd1pipe"), **kwargs)
    assert compute_settings("bfloat16", "xla") == (jnp.dtype(jnp.bfloat16), "xla")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="dtype float16 does not run on the CPU"):
            Pipeline.from_pretrained(folder("sd1pipe"), dtype=jnp.float16)
        capsys.readouterr()
        assert compute_settings(jnp.float32, "cudnn") == (jnp.dtype(jnp.float32), None)
        assert capsys.readouterr().err.count("\n") == 1  # one notice line


def _poisoned(params, part, *names):
    """A copy of params with NaN in every leaf of ``part`` whose path holds all of ``names``."""
    def leaf(path, a):
        key = jax.tree_util.keystr(path)
        return jnp.full_like(a, jnp.nan) if all(f"['{n}']" in key for n in names) else a

    return {**params, part: jax.tree_util.tree_map_with_path(leaf, params[part])}


def test_a_non_finite_stage_is_an_error_naming_it():
    """Finite weights can still give NaN (a float16 overflow, weights edited in memory): the call raises,
    naming the first stage that went non-finite, instead of returning a black image. One program, three
    parameter sets."""
    pipe = Pipeline.from_pretrained(folder("sd1pipe"))
    good, kwargs = pipe.params, dict(steps=2, height=16, width=16, sampler="ddim")
    assert pipe(["a cat"], **kwargs).shape == (1, 16, 16, 3)
    for part, names, stage in [("text", ("token_embedding",), "text states"), ("unet", ("conv_out", "bias"), "latents"),
                               ("vae", ("decoder", "conv_out", "bias"), "decoded image")]:
        pipe.params = _poisoned(good, part, *names)
        with pytest.raises(NonFiniteSample, match=f"non-finite values \\(NaN or inf\\) in the {stage}") as err:
            pipe(["a cat"], **kwargs)
        assert err.value.stage == stage and "\n" not in str(err.value)
    pipe.params = good
    with pytest.raises(ValueError, match=r"latents holds 256 non-finite values \(NaN or inf\) of 256"):
        pipe(["a cat"], latents=np.full((1, 8, 8, 4), np.nan), **kwargs)


def test_a_prompt_longer_than_clip_reads_is_reported_once_per_call():
    """What the pipeline's condition does with the prompts and the negative of every call."""
    from jaxdiff.conditions import PromptTruncated, TextTokens
    from jaxdiff.pretrained.tokenizer import load_tokenizer

    condition = TextTokens(load_tokenizer(os.path.join(folder("sd1pipe"), "tokenizer")), text_encoder=None)
    long = " ".join(["a"] * 80) + " bicycle"
    with pytest.warns(PromptTruncated, match=r"prompts: the text encoder reads 77 tokens; the end of 1 prompt\(s\) "
                                             r"was dropped: #1: 'a a a a a bicycle'") as record:
        ids = condition.host(["a cat", long, long[:20]])
    assert len(record) == 1 and ids.shape == (3, 77)
    with pytest.warns(PromptTruncated, match="negative: .* #0: 'a a a a a bicycle'"):
        condition.host(long, role="negative")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        condition.host(["a cat"])  # nothing dropped, nothing said


def test_sd_text2img_failures_are_one_line_exit_2_and_leave_no_out(tmp_path, capsys):
    """A damaged weight at load, a finite weight that overflows into NaN latents at run time, a flag that
    does nothing: each one stderr line, exit 2, no PNG and no empty --out."""
    from safetensors.numpy import load_file, save_file

    from experiments.sd_text2img import main

    root = damaged_copy(tmp_path)
    weights_file = root / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights_file))
    for value, extra, msg in [(np.nan, [], "error: unet: conv_in.weight holds 1 non-finite value(s)"),
                              (3e38, [], "error: non-finite values (NaN or inf) in the latents"),
                              (None, ["--strength", "0.5"], "error: strength is for image-to-image")]:
        w = tensors["conv_in.weight"].copy()
        if value is not None:
            w.flat[0] = value
            if np.isfinite(value):
                w[:] = value  # every input channel at float32's edge: the first convolution overflows
        save_file({**tensors, "conv_in.weight": w}, str(weights_file))
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as code:
            main(["--model", str(root), "--prompt", "a cat", "--steps", "1", "--height", "16", "--width", "16",
                  "--repeats", "0", "--out", str(out), *extra])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error")]
        assert code.value.code == 2 and len(lines) == 1 and lines[0].startswith(msg), err
        assert not out.exists()
