"""A few lines from a trained checkpoint to images, in the spirit of Diffusers. One call shape
for every condition: class labels, text prompts, low-resolution images::

    pipe = Pipeline.from_checkpoint("runs/mnist_cfg")          # labels
    images = pipe([0, 1, 2], gamma=3.0, sampler="dpm++", steps=20, seed=0)   # uint8 (3, 28, 28, 1)
    pipe = Pipeline.from_checkpoint("runs/mnist_text2img")     # prompts
    images = pipe(["a handwritten 3"] * 8, negative="the digit 8")
    pipe = Pipeline.from_checkpoint("runs/mnist_superres")     # low-resolution uint8 images
    images = pipe(low_res_14x14)

``pipe(condition, negative=None, *, gamma, sampler, steps, seed)``: ``negative`` (default the
null condition) is what classifier-free guidance steers away from; one negative serves a
whole batch. Image i depends on (seed, i) alone, not on how many images were asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxdiff import conditions, guidance, inpainting, sampling, specs
from jaxdiff.checkpoint import CheckpointError, Checkpoints
from jaxdiff.data import to_uint8
from jaxdiff.schedules import add_noise

TEXT_STAGES = ("autoencoder", "clip", "ldm")  # the sub-folders of a text-to-image run


class NonFiniteSample(ValueError):
    """A call whose result (or an intermediate of it) holds NaN or inf; ``stage`` names the first such
    stage: the condition's states (e.g. "text states"), "encoded image", "latents" or "samples",
    "decoded image". Raised instead of returning what would become a black or noise image."""

    def __init__(self, stage: str):
        hints = {"text states": "the text encoder's output, before any sampling step",
                 "encoded image": "the autoencoder's encoding of image=",
                 "encoded masked image": "the autoencoder's encoding of image= with the region to repaint blanked",
                 "latents": "what the sampler produced, before decoding: the U-Net's output or its compute dtype",
                 "samples": "what the sampler produced: the network's output or its compute dtype",
                 "decoded image": "the autoencoder's decoding of finite latents: the decoder or its compute dtype"}
        super().__init__(f"non-finite values (NaN or inf) in the {stage} ({hints.get(stage, 'the condition')}); "
                         f"no image was made; try dtype float32, and check the weights")
        self.stage = stage


def load_model(directory, *, expect: str | tuple, step=None, dtype=jnp.float32):
    """(spec, module in ``dtype``, EMA parameters) of the checkpoint in ``directory``, checking which
    kind of model it holds."""
    with Checkpoints(directory) as ckpt:
        config = ckpt.config(step)
        if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
            raise CheckpointError(f"{directory} holds no model spec: not a jaxdiff checkpoint, or one made "
                                  f"before specs existed (retrain it)")
        spec = specs.from_dict(config["spec"])
        expect = (expect,) if isinstance(expect, str) else expect
        if spec.kind not in expect:
            raise ValueError(f"{directory} holds a {spec.kind!r} model, expected {' or '.join(map(repr, expect))}")
        params = ckpt.restore_ema(spec.template(), step)
    return spec, spec.module(dtype), params


def checkpoint_folder(directory) -> epath.Path:
    """A run's folder or its checkpoints/ folder -> the checkpoints/ folder (never created)."""
    directory = epath.Path(directory)
    if not directory.exists():
        raise CheckpointError(f"no such run folder: {directory}")
    inner = directory / "checkpoints"
    return inner if inner.is_dir() else directory


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
    return int(seed)


def check_gamma(gamma, n: int) -> np.ndarray:
    """One guidance scale or one per image, as float32 (n,)."""
    try:
        values = np.asarray(gamma, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a real number or one per image, got {gamma!r}") from None
    if values.dtype.kind not in "fiu" or values.ndim > 1 or values.size not in (1, n):
        raise ValueError(f"gamma must be a real number or {n} of them (one per image), got {gamma!r}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    return np.broadcast_to(values.reshape(-1), (n,)).astype(np.float32)


def _real(value):
    """A Python, NumPy or 0-d (jax or NumPy) real number as a float; None for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and value.dtype.kind in "iuf":
        try:
            return float(value)
        except jax.errors.ConcretizationTypeError:  # traced: no value to check
            return None
    return None


def _all_finite(tree):
    """One bool: every float leaf of ``tree`` finite (True for a tree of integers, e.g. labels)."""
    flags = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)) \
            or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


# XLA:GPU's DotMerger joins dots that share an input (a block's q, k and v; every cross-attention's k and v of
# the text; every resnet's time projection) into one dot against the weights concatenated, and it does so
# inside the sampling loop: a copy of those weights at every step. The separate dots read the weights once
# a step and write nothing (SD-1.5 at batch 1 on an H200: -0.8% a call, docs/BENCHMARKS.md). The option
# holds for the whole program (text encoder and decoder too).
LOOP_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


def loop_compiler_options() -> dict | None:
    """LOOP_COMPILER_OPTIONS where the default backend is a GPU (they are XLA:GPU's), else None."""
    return LOOP_COMPILER_OPTIONS if jax.default_backend() == "gpu" else None


class Pipeline:
    """A condition in, uint8 images out, by classifier-free guidance
    eps = eps(negative) + gamma (eps(condition) - eps(negative)), or, for a label pipeline given a
    noisy classifier, by classifier guidance of the unconditional eps:
    eps - gamma sqrt(1 - abar_t) grad log p(y | x_t).

    ``params`` is a dict of the parts' parameters, passed into the compiled sampler (never
    compiled in as constants). ``eps_model(params, x_t, t, c)`` reads the condition in the form
    ``condition.network`` gives; ``decode(params, x0)`` maps what was sampled to images in [-1, 1]
    (None in pixel space); ``classifier(params, x_t, t)`` gives a noisy classifier's logits.
    Build one with ``for_labels``, ``for_prompts``, ``for_low_res`` or ``from_checkpoint``.
    """

    inpainting = False  # the U-Net reads a mask and a masked image beside the latents (for_stable_diffusion sets it)
    inpaint_strength = 1.0  # strength with mask= when none is given: diffusers' (its SDXL inpainting's is 0.9999)

    def __init__(self, eps_model, params: dict, schedule, condition, sample_shape, *, decode=None, spec=None,
                 classifier=None, default_gamma: float = 3.0, clip_x0: float | None = 1.0, latent_size=None,
                 encode=None, grid=None, sampler_options=None, walk=None, model_output=None):
        self.eps_model, self.params, self.schedule, self.condition = eps_model, params, schedule, condition
        self.sample_shape, self.decode, self.spec = tuple(sample_shape), decode, spec
        self.classifier, self.default_gamma, self.clip_x0 = classifier, default_gamma, clip_x0
        # latent_size = (factor, default image size): images of any height and width that are multiples
        # of factor, sampled as latents of (height / factor, width / factor, sample_shape[-1])
        self.latent_size, self.encode, self.grid = latent_size, encode, grid
        # sampler_options(sampler, steps) -> the settings besides the grid that reproduce a scheduler
        # config (DDIM's clip_x0, DPM-Solver++'s final_first_order); an explicit clip_x0 overrides its
        self.sampler_options = sampler_options
        # walk(sampler, steps) -> the diffusers walk a name ("auto", "DPM++ 2M Karras", "pndm") means (a sampler
        # function), for a pipeline read from a diffusers folder; last_sampling: what the last call ran
        self.walk, self.last_sampling = walk, None
        # model_output(params, x_t, t, c): the network's raw output (v for a v-prediction U-Net), for the walks
        # that convert it at their own sigma (a Walk's raw_output: the sigma walks)
        self.model_output = model_output
        # the U-Net's compute dtype: its float32 parameters are cast once per call, before the sampling
        # loop, rather than by every layer at every step (XLA left those casts in the loop)
        self.compute_dtype = None
        if classifier is not None and not isinstance(condition, conditions.Labels):
            raise ValueError("classifier guidance needs a label pipeline")
        self._compiled = {}
        self._loras, self._fused = [], None  # (LoRA, scale) applied in each call; (base params, LoRAs) fused

    @classmethod
    def for_labels(cls, spec: specs.LabelUNet, module, params, classifier=None) -> Pipeline:
        """A class-conditional U-Net; ``classifier`` = (NoisyClassifier spec, module, params) switches to
        classifier guidance of the U-Net's null-label eps."""
        eps = spec.eps_model(module)
        all_params, logits = {"unet": params}, None
        if classifier is not None:
            cspec, cnet, cparams = classifier
            if cspec.num_classes != spec.num_classes:
                raise ValueError(f"the classifier knows {cspec.num_classes} classes, the U-Net {spec.num_classes}")
            if cspec.schedule != spec.schedule or tuple(cspec.image_shape) != tuple(spec.image_shape):
                raise ValueError(f"the classifier was trained on another schedule or image shape: "
                                 f"{cspec.schedule}, {cspec.image_shape} vs the U-Net's "
                                 f"{spec.schedule}, {spec.image_shape}")
            all_params["classifier"] = cparams
            logits = lambda p, x, t: cnet.apply(p["classifier"], x, t)
        return _cast_once(cls(lambda p, x, t, y: eps(p["unet"], x, t, y), all_params, spec.build_schedule(),
                              spec.condition(), spec.sample_shape, spec=spec, classifier=logits), module)

    @classmethod
    def for_low_res(cls, spec: specs.SuperRes, module, params) -> Pipeline:
        """A super-resolution U-Net reading [x_t, upsampled low-res image] as channels; gamma 1 by default."""
        eps = spec.eps_model(module)
        return _cast_once(cls(lambda p, x, t, c: eps(p["unet"], x, t, c), {"unet": params}, spec.build_schedule(),
                              spec.condition(), spec.sample_shape, spec=spec, default_gamma=1.0), module)

    @classmethod
    def for_prompts(cls, spec: specs.LatentUNet, unet, params: dict, tokenizer, text_encoder, autoencoder) -> Pipeline:
        """Latent diffusion: ``params`` = {"unet", "text", "autoencoder"}; the sampled latents are divided by
        ``spec.latent_scale`` and decoded. No clipping: latents are not bounded like pixels."""
        eps = spec.eps_model(unet)
        decode = lambda p, z: autoencoder.apply(p["autoencoder"], z / spec.latent_scale, method="decode")
        return _cast_once(cls(lambda p, z, t, c: eps(p["unet"], z, t, c), params, spec.build_schedule(),
                   conditions.Prompts(tokenizer, text_encoder), spec.sample_shape, decode=decode, spec=spec,
                   clip_x0=None), unet)

    @classmethod
    def from_checkpoint(cls, directory, step: int | None = None, dtype=jnp.float32,
                        classifier_directory=None) -> Pipeline:
        """A run's output folder (or its checkpoints/): a label U-Net (mnist_cfg, mnist_cond), a
        super-resolution U-Net (mnist_superres), or a text-to-image run (the folder holding
        autoencoder/, clip/, ldm/). ``classifier_directory``: a noisy classifier for classifier guidance."""
        root = epath.Path(directory)
        if root.is_dir() and all((root / s).is_dir() for s in TEXT_STAGES):
            return cls._text_from_run(root, dtype)
        folder = checkpoint_folder(root)
        spec, module, params = load_model(folder, expect=("label_unet", "superres", "latent_unet"), step=step,
                                          dtype=dtype)
        if spec.kind == "latent_unet":
            raise ValueError(f"{folder} is the latent U-Net of a text-to-image run: pass the run's folder, "
                             f"which holds {', '.join(TEXT_STAGES)}")
        if spec.kind == "superres":
            return cls.for_low_res(spec, module, params)
        classifier = None
        if classifier_directory is not None:
            classifier = load_model(checkpoint_folder(classifier_directory), expect="noisy_classifier", dtype=dtype)
        return cls.for_labels(spec, module, params, classifier)

    @classmethod
    def from_pretrained(cls, model, *, dtype=jnp.float32, attention: str | None = None, variant: str | None = None,
                        offline: bool | None = None) -> Pipeline:
        """Stable Diffusion (1.x, 2.x, SDXL base and refiner) from a diffusers folder, or a hub id when online::

            pipe = Pipeline.from_pretrained("path/to/stable-diffusion-v1-5", dtype=jnp.bfloat16, attention="cudnn")
            images = pipe(["a red bicycle"], negative="blurry", gamma=7.5, sampler="dpm++", steps=25, seed=0)

        ``dtype`` is the compute dtype, float32, bfloat16 or float16 (not on the CPU: refused at load);
        parameters stay as stored. ``attention``: None or "xla" (XLA's), "cudnn" (the fused GPU kernel;
        where there is no cuDNN, XLA's, with a notice). The default sampler "auto" runs the folder's
        scheduler class as diffusers would (50 steps unless told); samplers "ddim" and "dpm++" walk the
        timesteps diffusers' DDIMScheduler and DPMSolverMultistepScheduler would, from the checkpoint's
        scheduler config. The folder is checked before and while its weights are read (configs that disagree,
        non-float or non-finite tensors); a call whose result goes non-finite raises ``NonFiniteSample``.
        A path ending in ``.safetensors`` is one file in the original layout: see ``from_single_file``.
        SDXL (``jaxdiff.pretrained.sdxl``): the call also takes prompt_2, negative_2 and the micro-conditioning
        (see ``sample``); guidance defaults to 5 and the size to the U-Net's sample_size x 8 (1024)."""
        from jaxdiff.pretrained import stable_diffusion

        if str(model).endswith(".safetensors"):  # one file in the original layout, not a diffusers folder
            return cls.from_single_file(model, dtype=dtype, attention=attention)
        return cls.for_stable_diffusion(stable_diffusion.load(model, dtype=dtype, attention=attention, variant=variant,
                                                              offline=offline))

    @classmethod
    def from_single_file(cls, path, *, config=None, prediction_type: str | None = None, ema: bool | None = None,
                         dtype=jnp.float32, attention: str | None = None) -> Pipeline:
        """Stable Diffusion 1.x / 2.x / SDXL from one .safetensors file in the original (A1111 / LDM / SGM) layout::

            pipe = Pipeline.from_single_file("v1-5-pruned-emaonly.safetensors")
            pipe = Pipeline.from_single_file("v2-1_512-ema-pruned.safetensors", prediction_type="epsilon")
            pipe = Pipeline.from_single_file("sd_xl_base_1.0.safetensors")  # or the refiner's file

        Configs are inferred from the tensors' shapes (``config``: a diffusers folder of the same model
        instead); the tokenizer is CLIP's, shipped with jaxdiff. ``prediction_type``: None (1.x and SDXL
        epsilon, 2.x v_prediction, as diffusers assumes), "epsilon" or "v_prediction". ``ema``: None reads the
        U-Net's EMA copy when the file has one. See ``jaxdiff.pretrained.single_file``."""
        from jaxdiff.pretrained import single_file

        return cls.for_stable_diffusion(single_file.load(path, config=config, prediction_type=prediction_type,
                                                         ema=ema, dtype=dtype, attention=attention))

    @classmethod
    def for_stable_diffusion(cls, sd) -> Pipeline:
        """From loaded parts (``jaxdiff.pretrained.stable_diffusion.StableDiffusion``)."""
        pipe = cls(sd.eps_model, sd.params, sd.schedule, sd.condition(), (None, None, sd.latent_channels),
                   decode=sd.decode, spec=sd.unet_spec, default_gamma=getattr(sd, "default_gamma", 7.5),
                   clip_x0=None,
                   latent_size=(sd.latent_factor, sd.default_size), encode=sd.encode, grid=sd.grid,
                   sampler_options=sd.sampler_options, walk=sd.walk, model_output=sd.model_output)
        pipe.inpainting = getattr(sd, "inpainting", False)
        pipe.inpaint_strength = getattr(sd, "inpaint_strength", 1.0)
        return pipe

    @classmethod
    def _text_from_run(cls, root: epath.Path, dtype) -> Pipeline:
        loaded = {s: load_model(checkpoint_folder(root / s), expect=k, dtype=dtype)
                  for s, k in zip(TEXT_STAGES, ("autoencoder", "contrastive_text", "latent_unet"), strict=True)}
        clip_spec, (text, _), clip_params = loaded["clip"]
        spec, unet, unet_params = loaded["ldm"]
        _, ae, ae_params = loaded["autoencoder"]
        params = {"unet": unet_params, "text": clip_params["text"], "autoencoder": ae_params}
        return cls.for_prompts(spec, unet, params, clip_spec.tokenizer(), text, ae)

    def __call__(self, condition, negative=None, **kwargs) -> np.ndarray:
        """uint8 images, one per entry of ``condition``; the settings are ``sample``'s (with ``denoising_end``,
        the latents it returns)."""
        out = self.sample(condition, negative, **kwargs)
        return out if kwargs.get("denoising_end") is not None else to_uint8(out)

    def sample(self, condition, negative=None, **settings) -> jax.Array:
        """What the sampler produced (decoded, for latent diffusion), as floats; images are in [-1, 1].

        ``gamma``: a scale or one per entry (default: the pipeline's: 3 for labels and small prompts,
        7.5 for Stable Diffusion, 1 for low-resolution images). ``sampler``: a name in
        ``jaxdiff.sampling.SAMPLERS``, or a function of one's own with the samplers' signature
        ``(eps_fn, schedule, x_T, *, key, steps, timesteps, clip_x0) -> x0`` (steps default 20); for a
        pipeline read from a diffusers folder also "auto" (the default: the folder's scheduler class, as
        diffusers runs it), an A1111 name ("PLMS", "UniPC", "DPM++ 2M", ...) or a diffusers walk's name
        ("pndm", "unipc", "euler_discrete", ...; see ``jaxdiff.pretrained.walks``), whose steps default to
        diffusers' 50;
        elsewhere "auto" is "dpm++". ``pipe.last_sampling`` then says what ran.
        ``steps`` (default the sampler's) and ``eta`` are checked only
        where the sampler uses them. ``clip_x0``: clip the predicted x0 to [-c, c] at each step; "auto"
        clips at 1 in pixel space, not in latent space. ``height``, ``width``: the image size of a
        latent pipeline (multiples of its latent factor). ``latents``: the starting noise x_T, (N, ...)
        as the sampler sees it (e.g. diffusers' latents, transposed to NHWC), instead of the seed's.
        ``image`` (uint8 (N, H, W, 3); its size when height and width are not given) with ``strength`` in (0, 1]
        (default 0.8): image-to-image, the image's latents noised to the grid's step
        ``steps - int(steps * strength)`` (on a sigma walk, to its sigma there, as diffusers' ``add_noise``) and
        denoised from there.

        ``mask`` (uint8 (H, W) or (N, H, W), white = repaint) with ``image``: inpainting (``jaxdiff.inpainting``),
        the mask and masked image fed to an inpainting U-Net (``self.inpainting``), or for a text-to-image U-Net
        the known region put back after every step; strength defaults to 1, from pure noise, as diffusers does (SDXL:
        0.9999, diffusers' SDXL default, which skips the grid's first step and starts from the noised image).

        ``denoising_end`` / ``denoising_start`` in (0, 1) (SDXL's ensemble of experts, as diffusers): stop at,
        or start from, the first grid timestep below (1 - fraction) of the training steps; with ``denoising_end``
        the result is the latents there, not decoded (hand them to the refiner as ``latents=`` with
        ``denoising_start``, which walks the rest of the grid from them, adding no noise). Any other keyword is
        the condition's own (SDXL: prompt_2, negative_2, original_size, crops_coords_top_left,
        target_size, their negative_ counterparts, aesthetic_score, negative_aesthetic_score).

        Raises ``NonFiniteSample`` (a ValueError naming the stage) when any stage of the result holds NaN
        or inf: the condition's states, the latents or samples, the decoded image.
        """
        fn, args, stages, self.last_sampling = self._program(condition, negative, **settings)
        out, finite = fn(*args)
        finite = np.asarray(finite)  # the one wait: a result is checked before it is handed out
        if not finite.all():
            raise NonFiniteSample(stages[int(np.argmin(finite))])
        return out

    def compile(self, condition, negative=None, **settings) -> None:
        """Compile, ahead of time and without running it, the program ``sample`` runs for these arguments (the
        same checks first), so that call starts at once: e.g. in a background thread while the parameters are
        still being trained. The parameters' values are not read, only their tree, shapes and dtypes, which must
        be those the call will have (``self.params`` may be replaced in between by arrays of the same tree,
        shapes and dtypes; loading a LoRA or fusing one makes new programs)."""
        fn, args, _, _ = self._program(condition, negative, **settings)
        fn.lower(*args).compile()

    def _program(self, condition, negative=None, *, gamma=None, sampler: str = "auto", steps: int | None = None,
                 seed: int = 0, eta: float | None = None, clip_x0="auto", height: int | None = None,
                 width: int | None = None, latents=None, image=None, strength: float | None = None,
                 mask=None, denoising_end: float | None = None, denoising_start: float | None = None,
                 **settings):
        """(the compiled sampler, its arguments, the names of the stages it checks for non-finite values) for
        ``sample``'s arguments, checked."""
        asked = sampler
        sampler, steps, walk = self._resolve(sampler, steps, image)
        # a sampler of one's own: any function with the samplers' keyword signature (key, steps,
        # timesteps, clip_x0), e.g. a step function run by sampling.sample_loop
        info = sampling.get(sampler) if not callable(sampler) else sampling.SamplerInfo(
            getattr(sampler, "__name__", "custom"), sampler, 20, stochastic=True)
        seed = check_seed(seed)
        steps = None if info.default_steps is None else sampling.check_steps(
            info.default_steps if steps is None else steps)
        if steps is not None and steps > self.schedule.num_timesteps:
            raise ValueError(f"steps must be at most {self.schedule.num_timesteps} (the schedule's T), got {steps}")
        eta = _check_eta(eta) if (info.takes_eta and eta is not None) else None
        if image is not None and height is None and width is None and self.latent_size is not None \
                and np.ndim(image) in (3, 4):
            height, width = np.shape(image)[-3:-1]  # image-to-image: the image's size, as diffusers
        shape = self._shape(height, width)
        if hasattr(self.condition, "host_pair"):
            size = (shape[0] * self.latent_size[0], shape[1] * self.latent_size[0])
            cond, uncond = self.condition.host_pair(condition, negative, size, **settings,
                                                    from_image=image is not None or denoising_start is not None)
            n = conditions.batch_size(cond)
        elif settings:
            raise ValueError(f"unknown keyword argument(s) {', '.join(sorted(settings))} for this pipeline")
        else:
            cond = self.condition.host(condition)
            n = conditions.batch_size(cond)
        if hasattr(self.condition, "host_pair"):
            pass  # the negative is the condition's business (SDXL zeroes a missing one)
        elif negative is None:
            uncond = self.condition.null(n)
        elif self.classifier is not None:
            raise ValueError("a negative condition needs classifier-free guidance; this pipeline uses a classifier")
        else:
            uncond = conditions.broadcast(self.condition.host(negative, role="negative"), n, "negative")
        gamma = check_gamma(self.default_gamma if gamma is None else gamma, n)
        options = dict(self.sampler_options(sampler, steps)) if self.sampler_options is not None and isinstance(
            sampler, str) else {}
        config_clip = options.pop("clip_x0", self.clip_x0)
        clip_x0 = config_clip if isinstance(clip_x0, str) and clip_x0 == "auto" else clip_x0
        grid = self.grid(sampler, steps) if self.grid is not None and isinstance(sampler, str) else getattr(
            sampler, "grid", None)  # a diffusers walk has its own
        inpaint = None
        if mask is not None or self.inpainting:
            strength = self._check_inpaint(image, mask, strength)
        if mask is not None and not self.inpainting and sampler not in _GRID_SAMPLERS:
            raise ValueError(f"mask= with a U-Net that is not an inpainting one puts the known region back after each "
                             f"step, which samplers 'ddim' and 'dpm++' do; sampler {asked!r} runs "
                             f"{getattr(sampler, 'sampler', sampler)!r}: pass sampler='ddim' or 'dpm++'")
        start, image = self._check_image(image, strength, n, shape, sampler, steps, grid)
        if mask is not None:  # an inpainting U-Net reads the masked image, another gets the image's known region back
            inpaint = inpainting.host_inputs(inpainting.check_mask(mask, *image.shape[:3]), image, self.latent_size[0])
            inpaint = inpaint if self.inpainting else (inpaint[0], image)
            if _real(strength) == 1:  # diffusers' inpainting starts from pure noise, not the noised image
                image = None
        if start is not None:
            grid = tuple(grid[start:])
        grid, to_latents = self._denoising_range(grid, denoising_end, denoising_start, sampler, image, latents)
        if getattr(sampler, "raw_output", False):  # a sigma walk scales pure noise by init_noise_sigma, nothing else
            sampler = dataclasses.replace(sampler, from_sample=image is not None or denoising_start is not None)
        if to_latents and "final_first_order" in options:
            options["final_first_order"] = False  # the base's last step is not the end of diffusers' grid
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *shape):
                raise ValueError(f"latents must have shape {(n, *shape)} (one per image), got {latents.shape}")
            bad = latents.size - np.count_nonzero(np.isfinite(latents))
            if bad:
                raise ValueError(f"latents holds {bad} non-finite values (NaN or inf) of {latents.size}: the starting "
                                 f"noise must be finite")
        if walk is not None and walk.raw_output:
            report = walk.report(grid)
        else:
            report = walk.report() if walk is not None and image is None else _report(asked, info.name, steps, grid)
        sig = (sampler, steps, eta, clip_x0, shape, grid, tuple(sorted(options.items())), to_latents)
        fn = self._compiled.get(sig)
        if fn is None:  # setdefault: a compile() in another thread may have made it meanwhile
            fn = self._compiled.setdefault(sig, jax.jit(partial(self._generate, *sig),
                                                        compiler_options=loop_compiler_options()))
        args = (self.params, cond, uncond, jnp.asarray(gamma), jax.random.key(seed), latents, image, inpaint)
        return fn, args, self._stages(image is not None, inpaint is not None), report

    def _resolve(self, sampler, steps, image):
        """(sampler, steps, walk) to run: jaxdiff's own samplers and functions as given (walk None); any other
        name is a diffusers walk of a folder's scheduler ("auto" is "dpm++" where there is no folder). A DDIM or
        DPM-Solver++ walk without overrides runs as jaxdiff's "ddim" / "dpm++" on the folder's grid (the same
        steps)."""
        if callable(sampler) or sampler in sampling.SAMPLERS:
            return sampler, steps, None
        if self.walk is None:  # a walk's name is refused here; sampling.get refuses an unknown one
            from jaxdiff.pretrained import walks

            if sampler != "auto" and sampler in walks.supported():
                raise ValueError(f"sampler {sampler!r} walks a diffusers scheduler config, which this pipeline lacks "
                                 f"(it is for Stable Diffusion folders); use one of {tuple(sampling.SAMPLERS)}")
            return ("dpm++", steps, None) if sampler == "auto" else (sampler, steps, None)
        walk = self.walk(sampler, steps)
        if walk.sampler in ("ddim", "dpm_solver_pp") and not walk.overrides:
            return {"ddim": "ddim", "dpm_solver_pp": "dpm++"}[walk.sampler], walk.steps, walk
        if image is not None and not walk.noise_at_timestep and not walk.raw_output:
            raise ValueError(f"image-to-image with sampler {sampler!r} (diffusers' {walk.scheduler_class} with Karras "
                             f"sigmas) is not supported yet: pass another sampler, e.g. 'ddim' or 'dpm++'")
        return walk, walk.steps, walk

    def _stages(self, with_image: bool, with_mask: bool = False) -> list[str]:
        """The stages ``_generate`` checks for NaN and inf, in the order it computes them."""
        return [getattr(self.condition, "stage", "condition")] + (["encoded image"] if with_image else []) \
            + ([f"encoded {'masked ' if self.inpainting else ''}image"] if with_mask else []) \
            + (["samples"] if self.decode is None else ["latents", "decoded image"])

    def _check_inpaint(self, image, mask, strength):
        """The strength for inpainting (diffusers' default 1), after the checks image-to-image lacks."""
        if not self.inpainting and self.encode is None:
            raise ValueError("mask= needs a latent pipeline with an encoder (Stable Diffusion)")
        if image is None:
            raise ValueError("this pipeline's U-Net is an inpainting U-Net: pass image= (the image to repaint) and "
                             "mask= (uint8, white = repaint)" if mask is None else
                             "mask= needs image= (the uint8 image whose masked region is repainted)")
        if mask is None:
            raise ValueError("this pipeline's U-Net is an inpainting U-Net: pass mask= (uint8 (H, W) or (N, H, W), "
                             "white = repaint) with image=")
        return self.inpaint_strength if strength is None else strength

    def load_lora(self, path, scale: float = 1.0, *, strict: bool = True) -> Pipeline:
        """Apply a LoRA file (``jaxdiff.lora.save``'s, one diffusers / peft wrote, or kohya's / A1111's
        ``lora_unet_...`` layout, LoCon included) at ``scale``; several add up. ``strict=False``: keys that map to
        no layer are skipped and listed in a warning rather than refused. Unfused, each call merges them into a
        copy of the parameters once, before the sampling loop; ``fuse_lora`` merges them into the parameters for
        good, ``unfuse_lora`` undoes that and ``unload_lora`` removes every LoRA. Returns the pipeline."""
        from jaxdiff import lora as loras

        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        adapter = loras.load(path, self.params, strict=strict)
        self._loras.append((adapter, float(scale)))
        self._set_params({k: v for k, v in self.params.items() if k != "lora"})
        return self

    def fuse_lora(self) -> Pipeline:
        """Merge the loaded LoRAs into the parameters (no merge per call); ``unfuse_lora`` restores them."""
        base = {k: v for k, v in self.params.items() if k != "lora"}
        if self._loras:
            before, fused = self._fused if self._fused is not None else (base, [])
            self._fused = (before, fused + self._loras)
            merged = self._apply_loras(self.params)
            self._loras = []
            self._set_params(merged)
        return self

    def unfuse_lora(self) -> Pipeline:
        """The parameters as they were before ``fuse_lora``; its LoRAs stay loaded, applied per call."""
        if self._fused is not None:
            base, fused = self._fused
            self._fused, self._loras = None, fused + self._loras
            self._set_params(base)
        return self

    def unload_lora(self) -> Pipeline:
        """Remove every LoRA, fused or not."""
        self.unfuse_lora()
        self._loras = []
        self._set_params({k: v for k, v in self.params.items() if k != "lora"})
        return self

    def lora_params(self) -> dict:
        """The parameters the sampler uses: every loaded LoRA merged in."""
        return self._apply_loras(self.params)

    def _set_params(self, base: dict) -> None:
        # the unfused LoRAs' weights travel with the parameters into the compiled sampler (data, not constants);
        # their alphas and scales are read when it is traced, so a change recompiles
        self.params = {**base, "lora": tuple(a.weights for a, _ in self._loras)} if self._loras else base
        self._compiled.clear()

    def _apply_loras(self, params: dict) -> dict:
        if "lora" not in params:
            return params
        from jaxdiff import lora as loras

        params = dict(params)
        weights = params.pop("lora")
        for w, (adapter, scale) in zip(weights, self._loras, strict=True):
            params = loras.merge(params, adapter.replace(w), scale)
        return params

    def _shape(self, height, width) -> tuple:
        if self.latent_size is None:
            if height is not None or width is not None:
                raise ValueError("height and width are for latent pipelines (Stable Diffusion); this one makes "
                                 f"{self.sample_shape} samples")
            return self.sample_shape
        factor, default = self.latent_size
        default = (default, default) if np.ndim(default) == 0 else tuple(default)
        size = []
        for name, v, d in (("height", height, default[0]), ("width", width, default[1])):
            v = d if v is None else v
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < factor or v % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {v!r}")
            size.append(int(v) // factor)
        return (*size, self.sample_shape[-1])

    def _check_image(self, image, strength, n, shape, sampler, steps, grid):
        """(grid index to start from, the image as floats in [-1, 1]) for image-to-image, else (None, None)."""
        if image is None:
            if strength is not None:
                raise ValueError("strength is for image-to-image: pass image= too (or leave strength out)")
            return None, None
        if self.encode is None:
            raise ValueError("image-to-image needs a latent pipeline with an encoder (Stable Diffusion)")
        if grid is None:
            raise ValueError(f"image-to-image takes a sampler with a timestep grid ({', '.join(_GRID_SAMPLERS)}, or a "
                             f"diffusers walk such as 'auto'), got {_sampler_name(sampler)}")
        value = 0.8 if strength is None else _real(strength)
        if value is None or not 0 < value <= 1:
            raise ValueError(f"strength must be in (0, 1] (a real number), got {strength!r}")
        strength = value
        arr = np.asarray(image)
        arr = arr[None] if arr.ndim == 3 else arr
        factor = self.latent_size[0]
        want = (n, shape[0] * factor, shape[1] * factor, 3)
        if arr.dtype != np.uint8 or arr.shape not in (want, (1, *want[1:])):
            raise ValueError(f"image must be uint8 of shape {want[1:]} or {want}, got {arr.dtype} {arr.shape}")
        start = steps - int(steps * strength)
        if start >= steps:
            raise ValueError(f"strength {strength} leaves no step of {steps}: raise strength or steps")
        return start, np.broadcast_to(arr, want).astype(np.float32) / 127.5 - 1.0

    def _denoising_range(self, grid, end, start, sampler, image, latents):
        """(the grid cut at ``denoising_end`` or from ``denoising_start``, whether to return latents)."""
        if end is None and start is None:
            return grid, False
        if grid is None:
            raise ValueError(f"denoising_end and denoising_start take a sampler with a timestep grid "
                             f"({', '.join(_GRID_SAMPLERS)}, or a diffusers walk such as 'auto'), got "
                             f"{_sampler_name(sampler)}")
        which = "denoising_end" if end is not None else "denoising_start"
        if end is not None and start is not None:
            raise ValueError("give denoising_end (the base of an ensemble) or denoising_start (the refiner), not both")
        value = _real(end if end is not None else start)
        if value is None or not 0 < value < 1:
            raise ValueError(f"{which} must be a number in (0, 1), got {end if end is not None else start!r}")
        # diffusers' cutoff in its 0-based tau; jaxdiff's t is tau + 1
        cutoff = int(round(self.schedule.num_timesteps * (1 - value)))
        k = sum(1 for t in grid[:-1] if t - 1 >= cutoff)
        if start is not None and getattr(sampler, "order", 1) == 2 and k:
            # diffusers' refiner of an order-2 walk (Heun: every time but the first twice) counts the evaluations
            # below the cutoff, an even number, plus 1: it begins with the step the base ended with an Euler guess
            k -= 1
        if end is not None:
            if k == 0:
                raise ValueError(f"denoising_end {value} stops before the first of the grid's steps: raise it")
            return tuple(grid[:k + 1]), True
        if image is not None:
            raise ValueError("denoising_start continues from latents= (the base's output with denoising_end), "
                             "not from image=")
        if latents is None:
            raise ValueError("denoising_start needs latents=: the base's output with denoising_end")
        if k >= len(grid) - 1:
            raise ValueError(f"denoising_start {value} leaves no step of the grid: lower it")
        return tuple(grid[k:]), False

    def _generate(self, sampler, steps, eta, clip_x0, shape, grid, options, to_latents, params, cond, uncond, gamma,
                  key, latents, image, inpaint=None):
        params = self._apply_loras(params)
        n = gamma.shape[0]
        if self.compute_dtype is not None and "unet" in params:
            cast = lambda a: a.astype(self.compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
            params = {**params, "unet": jax.tree.map(cast, params["unet"])}
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))  # image i: (seed, i) alone
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys) if latents is None \
            else latents
        run_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
        noise = x_T
        raw = getattr(sampler, "raw_output", False)
        if image is not None:  # image-to-image: the image's latents, noised to the first step of the grid
            z0 = self.encode(params, image, jax.vmap(jax.random.fold_in, (0, None))(keys, 2))
            x_T = sampler.noised(z0, x_T, grid) if raw else add_noise(self.schedule, z0, jnp.full((n,), grid[0]), x_T)
        cond, uncond = self.condition.network(params, cond), self.condition.network(params, uncond)
        finite = [_all_finite((cond, uncond))] + ([_all_finite(z0)] if image is not None else [])
        # a sigma walk converts the network's raw output at its own sigma; the others take eps
        network = self.model_output if raw else self.eps_model
        model = lambda x, t, c: network(params, x, t, c)
        if inpaint is not None and self.inpainting:  # the mask and masked image's latents ride with each condition
            encode = lambda x: self.encode(params, x, jax.vmap(jax.random.fold_in, (0, None))(keys, 3))
            extra = inpainting.channels(encode, *inpaint)
            finite.append(_all_finite(extra))
            cond, uncond = (cond, extra), (uncond, extra)
            model = lambda x, t, c: network(params, x, t, c[0], c[1])
        elif inpaint is not None:  # the image's latents (the same draw as image-to-image's) kept outside the mask
            known = self.encode(params, inpaint[1], jax.vmap(jax.random.fold_in, (0, None))(keys, 2))
            finite.append(_all_finite(known))
            options = (*options, ("after_step", inpainting.keep_known(self.schedule, known, noise, inpaint[0], grid)))
        if self.classifier is None:
            eps_fn = guidance.cfg(model, cond, uncond, gamma)
        else:
            log_prob = guidance.log_prob_from_logits(lambda x, t: self.classifier(params, x, t))
            eps_fn = guidance.classifier_guidance(lambda x, t: model(x, t, uncond), log_prob, cond, gamma,
                                                  self.schedule)
        # a sigma walk's grid holds its (fractional) times
        timesteps = None if grid is None else np.asarray(grid, np.float64 if raw else np.int32)
        if callable(sampler):
            x0 = sampler(eps_fn, self.schedule, x_T, key=run_keys, steps=steps, timesteps=timesteps, clip_x0=clip_x0)
        else:
            x0 = sampling.run(sampler, eps_fn, self.schedule, x_T, key=run_keys, steps=steps, eta=eta, clip_x0=clip_x0,
                              timesteps=timesteps, **dict(options))
        finite.append(_all_finite(x0))
        if self.decode is None or to_latents:
            return x0, jnp.stack(finite)
        images = self.decode(params, x0)
        return images, jnp.stack([*finite, _all_finite(images)])


_GRID_SAMPLERS = ("ddim", "dpm++")


def _sampler_name(sampler) -> str:
    """A sampler as an error message names it: the name asked for, and the diffusers walk it resolved to."""
    if isinstance(sampler, str):
        return repr(sampler)
    if hasattr(sampler, "asked"):
        return f"{sampler.asked!r} (diffusers' {sampler.scheduler_class} walk)"
    return getattr(sampler, "__name__", repr(sampler))


def _report(asked, sampler: str, steps, grid) -> dict:
    """What a call of one of jaxdiff's own samplers ran (``Walk.report``'s keys); timesteps are diffusers' (t - 1)
    where the grid came from a scheduler config, else None (the sampler's own grid)."""
    taus = None if grid is None else [int(t) - 1 for t in grid[:-1]]
    line = f"sampler {sampler}" + (f" (asked {asked!r})" if asked != sampler else "") + f", {steps} steps"
    if taus is not None:
        line += f", {len(taus)} network evaluations at diffusers' timesteps {taus[0]} .. {taus[-1]}"
    return {"sampler": sampler, "asked": asked if isinstance(asked, str) else sampler, "scheduler_class": None,
            "overrides": {}, "steps": steps, "evaluations": None if taus is None else len(taus), "timesteps": taus,
            "line": line}


# sample and compile take _program's keywords: say so to help() and editors
Pipeline.sample.__signature__ = inspect.signature(Pipeline._program).replace(return_annotation="jax.Array")
Pipeline.compile.__signature__ = inspect.signature(Pipeline._program).replace(return_annotation="None")


def _cast_once(pipe: Pipeline, module) -> Pipeline:
    dtype = getattr(module, "dtype", jnp.float32)
    pipe.compute_dtype = None if jnp.dtype(dtype) == jnp.float32 else dtype
    return pipe
