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
whole batch.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditions, guidance, sampling, schedules
from jaxdiff.checkpoint import Checkpoints, compare_configs
from jaxdiff.data import to_uint8
from jaxdiff.nets.autoencoder import Autoencoder
from jaxdiff.nets.classifier import EvalClassifier, NoisyClassifier
from jaxdiff.nets.text import ImageEncoder, TextEncoder, Tokenizer
from jaxdiff.nets.unet import textbook_unet

ARCH_KEYS = ("model", "num_classes", "channels", "blocks_per_level", "attention_levels", "cond_dim")
MUST_MATCH = ARCH_KEYS + ("schedule", "num_timesteps", "image_shape", "dataset")
SAMPLERS = ("ddpm", "ddim", "dpm++")
TEXT_STAGES = ("autoencoder", "clip", "ldm")  # the sub-folders of a text-to-image run


def schedule_from_config(config: dict) -> schedules.Schedule:
    kinds = {"linear": schedules.linear, "cosine": schedules.cosine}
    if config["schedule"] not in kinds:
        raise ValueError(f"unknown schedule {config['schedule']!r}; expected one of {sorted(kinds)}")
    return kinds[config["schedule"]](config["num_timesteps"])


def model_from_config(config: dict, dtype=jnp.float32):
    """The flax module a checkpoint's configuration describes ('clip': (text, image) encoders)."""
    kind, ch = config["model"], tuple(config.get("channels") or ())
    if kind == "unet":
        return textbook_unet(num_classes=config["num_classes"], channels=ch,
                             blocks_per_level=config["blocks_per_level"],
                             attention_levels=tuple(config["attention_levels"]), cond_dim=config["cond_dim"],
                             dtype=dtype)
    if kind == "classifier":
        return NoisyClassifier(num_classes=config["num_classes"], channels=ch, cond_dim=config["cond_dim"], dtype=dtype)
    if kind == "eval_classifier":
        return EvalClassifier(num_classes=config["num_classes"], channels=ch, dtype=dtype)
    if kind == "superres":
        return textbook_unet(num_classes=0, channels=ch, out_channels=config["image_shape"][-1], dtype=dtype)
    if kind == "autoencoder":
        return Autoencoder(channels=ch, latent_channels=config["latent_channels"], dtype=dtype)
    if kind == "clip":
        return (TextEncoder(vocab_size=len(config["vocab"]), max_len=config["max_len"], dtype=dtype),
                ImageEncoder(dtype=dtype))
    if kind == "ldm":
        return textbook_unet(num_classes=0, channels=ch, cond_dim=config["cond_dim"],
                             cross_attention_levels=tuple(config["cross_attention_levels"]),
                             out_channels=config["latent_shape"][-1], dtype=dtype)
    raise ValueError(f"unknown model {kind!r}; expected unet, classifier, eval_classifier, superres, autoencoder, "
                     f"clip or ldm")


def init_params(model, config: dict, seed: int = 0):
    """Fresh float32 parameters of ``model_from_config(config)``: the template a checkpoint restores into."""
    key = jax.random.key(seed)
    x = jnp.zeros((1, *config["image_shape"]), jnp.float32)
    t = jnp.ones((1,), jnp.int32)
    kind = config["model"]
    if kind == "classifier":
        return model.init(key, x, t)
    if kind == "eval_classifier":
        return model.init(key, x)
    if kind == "superres":
        return model.init(key, jnp.concatenate([x, x], -1), t)
    if kind == "autoencoder":
        return model.init(key, x, jax.random.key(1))
    if kind == "clip":
        text, image = model
        ids, mask = jnp.zeros((1, config["max_len"]), jnp.int32), jnp.ones((1, config["max_len"]), bool)
        k1, k2 = jax.random.split(key)
        return {"text": text.init(k1, ids, mask), "image": image.init(k2, x),
                "logit_scale": jnp.asarray(np.log(10.0), jnp.float32)}
    if kind == "ldm":
        z = jnp.zeros((1, *config["latent_shape"]), jnp.float32)
        ctx = jnp.zeros((1, config["max_len"], config["context_dim"]), jnp.float32)
        return model.init(key, z, t, None, ctx, jnp.ones((1, config["max_len"]), bool))
    return model.init(key, x, t, jnp.zeros((1,), jnp.int32))


def run_sampler(name: str, eps_fn, schedule, x_T, key, steps: int, eta: float = 0.0, clip_x0=None):
    """Dispatch by name: 'ddpm' (all T steps), 'ddim' (``steps``, ``eta``), 'dpm++' (``steps``)."""
    if name == "ddpm":
        return sampling.ddpm(eps_fn, schedule, x_T, key, clip_x0=clip_x0)
    if name == "ddim":
        return sampling.ddim(eps_fn, schedule, x_T, key, steps=steps, eta=eta, clip_x0=clip_x0)
    if name == "dpm++":
        return sampling.dpm_solver_pp(eps_fn, schedule, x_T, steps=steps, clip_x0=clip_x0)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def nfe(sampler: str, steps: int, schedule) -> int:
    """Network evaluations per sample (a guided one counts its doubled batch as one)."""
    return schedule.num_timesteps if sampler == "ddpm" else steps


def load_model(directory: str, step=None, dtype=jnp.float32, expect: str = "unet"):
    """(module, EMA params, config) from a checkpoint folder, checking which kind of model it holds."""
    ckpt = Checkpoints(directory)
    config = ckpt.config(step)
    if config.get("model") != expect:
        raise ValueError(f"{directory} holds a {config.get('model')!r} checkpoint, expected {expect!r}")
    params = ckpt.restore_ema(init_params(model_from_config(config), config), step)
    ckpt.close()
    return model_from_config(config, dtype), params, config


def low_res_eps(model):
    """eps(params, x_t, t, low) of a super-resolution U-Net: it reads [x_t, upsampled low-res] as channels."""
    return lambda p, x, t, low: model.apply(p, jnp.concatenate([x, low.astype(x.dtype)], -1), t)


def text_eps(unet):
    """eps(params, z_t, t, (tokens, mask)) of a latent U-Net with cross-attention to text tokens."""
    return lambda p, z, t, c: unet.apply(p, z, t, None, c[0], c[1])


def _checkpoint_folder(directory: str) -> str:
    """A run's folder or its checkpoints/ folder -> the checkpoints/ folder."""
    inner = os.path.join(directory, "checkpoints")
    return inner if os.path.isdir(inner) else directory


class Pipeline:
    """A condition in, uint8 images out, by classifier-free guidance
    eps = eps(negative) + gamma (eps(condition) - eps(negative)), or, for a label pipeline given
    ``classifier`` = (noisy classifier, its params), by classifier guidance of the unconditional
    eps: eps - gamma sqrt(1 - abar_t) grad log p(y | x_t).

    ``eps_model(params, x_t, t, c)`` reads the condition in the form ``condition.network`` gives;
    ``decode(params, x0)`` maps what was sampled to images in [-1, 1] (identity in pixel space,
    the autoencoder's decoder in latent space). Build one with ``for_labels``, ``for_prompts``,
    ``for_low_res`` or ``from_checkpoint``.
    """

    def __init__(self, eps_model, params, schedule: schedules.Schedule, condition, sample_shape, *, decode=None,
                 config: dict | None = None, classifier=None, default_gamma: float = 3.0, clip_x0: float | None = 1.0):
        self.eps_model, self.params, self.schedule, self.condition = eps_model, params, schedule, condition
        self.sample_shape, self.decode, self.config = tuple(sample_shape), decode, config or {}
        self.classifier, self.default_gamma, self.clip_x0 = classifier, default_gamma, clip_x0
        if classifier is not None and not isinstance(condition, conditions.Labels):
            raise ValueError("classifier guidance needs a label pipeline")
        self._compiled = {}

    @classmethod
    def for_labels(cls, model, params, schedule, config: dict, classifier=None) -> "Pipeline":
        num_classes = config["num_classes"]  # label num_classes is the U-Net's null label, guided or not
        if classifier is not None and classifier[0].num_classes != num_classes:
            raise ValueError(f"the classifier knows {classifier[0].num_classes} classes, the U-Net {num_classes}")
        return cls(lambda p, x, t, y: model.apply(p, x, t, y), params, schedule, conditions.Labels(num_classes),
                   config["image_shape"], config=config, classifier=classifier)

    @classmethod
    def for_low_res(cls, model, params, schedule, config: dict) -> "Pipeline":
        """A super-resolution U-Net reading [x_t, upsampled low-res image] as channels."""
        shape = config["image_shape"]
        return cls(low_res_eps(model), params, schedule, conditions.LowRes(config["low_res"], shape[0], shape[-1]), shape,
                   config=config, default_gamma=1.0)

    @classmethod
    def for_prompts(cls, unet, params: dict, schedule, tokenizer, text_encoder, autoencoder, config: dict) -> "Pipeline":
        """Latent diffusion: ``params`` = {"unet", "text", "autoencoder"}; the sampled latents are divided by
        ``config["latent_scale"]`` and decoded. No clipping: latents are not bounded like pixels."""
        scale = config["latent_scale"]
        eps = lambda p, z, t, c: text_eps(unet)(p["unet"], z, t, c)
        decode = lambda p, z: autoencoder.apply(p["autoencoder"], z / scale, method=Autoencoder.decode)
        return cls(eps, params, schedule, conditions.Prompts(tokenizer, text_encoder), config["latent_shape"],
                   decode=decode, config=config, clip_x0=None)

    @classmethod
    def from_checkpoint(cls, directory: str, step: int | None = None, dtype=jnp.float32,
                        classifier_directory: str | None = None) -> "Pipeline":
        """A run's output folder (or its checkpoints/): mnist_cfg / mnist_cond (labels), mnist_superres
        (low-res images), mnist_text2img (prompts: the folder holding autoencoder/, clip/, ldm/)."""
        if all(os.path.isdir(os.path.join(directory, s)) for s in TEXT_STAGES):
            return cls._text_from_run(directory, dtype)
        folder = _checkpoint_folder(directory)
        with Checkpoints(folder) as ckpt:
            kind = ckpt.config(step).get("model")
        if kind == "superres":
            model, params, config = load_model(folder, step, dtype, expect="superres")
            return cls.for_low_res(model, params, schedule_from_config(config), config)
        if kind == "ldm":
            raise ValueError(f"{folder} is the latent U-Net of a text-to-image run: pass the run's folder, "
                             f"which holds {', '.join(TEXT_STAGES)}")
        model, params, config = load_model(folder, step, dtype, expect="unet")
        classifier = None
        if classifier_directory is not None:
            cdir = _checkpoint_folder(classifier_directory)
            net, cparams, cconfig = load_model(cdir, None, dtype, expect="classifier")
            compare_configs(cconfig, config, ("schedule", "num_timesteps", "image_shape"), where=cdir)
            classifier = (net, cparams)
        return cls.for_labels(model, params, schedule_from_config(config), config, classifier)

    @classmethod
    def _text_from_run(cls, directory: str, dtype) -> "Pipeline":
        loaded = {s: load_model(_checkpoint_folder(os.path.join(directory, s)), None, dtype, expect=s) for s in TEXT_STAGES}
        (text, _), clip_params, clip_cfg = loaded["clip"]
        unet, unet_params, config = loaded["ldm"]
        ae, ae_params, _ = loaded["autoencoder"]
        params = {"unet": unet_params, "text": clip_params["text"], "autoencoder": ae_params}
        tok = Tokenizer(clip_cfg["vocab"], clip_cfg["max_len"])
        return cls.for_prompts(unet, params, schedule_from_config(config), tok, text, ae, config)

    def __call__(self, condition, negative=None, *, gamma=None, sampler: str = "dpm++", steps: int = 20,
                 seed: int = 0, eta: float = 0.0, clip_x0="auto") -> np.ndarray:
        """uint8 images, one per entry of ``condition``."""
        return to_uint8(self.sample(condition, negative, gamma=gamma, sampler=sampler, steps=steps, seed=seed,
                                    eta=eta, clip_x0=clip_x0))

    def sample(self, condition, negative=None, *, gamma=None, sampler: str = "dpm++", steps: int = 20,
               seed: int = 0, eta: float = 0.0, clip_x0="auto") -> jax.Array:
        """What the sampler produced (decoded, for latent diffusion), as floats; images are in [-1, 1].

        ``gamma``: a scale or one per entry (default: the pipeline's, 3 for labels and prompts, 1 for
        low-resolution images). ``clip_x0``: clip the predicted x0 to [-c, c] at each step; "auto"
        clips at 1 in pixel space and not at all in latent space.
        """
        cond = self.condition.host(condition)
        n = conditions.batch_size(cond)
        if negative is None:
            uncond = self.condition.null(n)
        elif self.classifier is not None:
            raise ValueError("a negative condition needs classifier-free guidance; this pipeline uses a classifier")
        else:
            uncond = conditions.broadcast(self.condition.host(negative, role="negative"), n, "negative")
        gamma = np.asarray(self.default_gamma if gamma is None else gamma, np.float32)
        if gamma.size not in (1, n):
            raise ValueError(f"gamma has {gamma.size} values for {n} images: give one or {n}")
        gamma = np.broadcast_to(gamma.reshape(-1), (n,))
        if not np.all(np.isfinite(gamma)):
            raise ValueError(f"gamma must be finite, got {gamma}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        clip_x0 = self.clip_x0 if clip_x0 == "auto" else clip_x0
        sig = (sampler, int(steps), float(eta), clip_x0)
        if sig not in self._compiled:
            self._compiled[sig] = jax.jit(partial(self._generate, *sig))
        return self._compiled[sig](self.params, cond, uncond, jnp.asarray(gamma), jax.random.key(seed))

    def _generate(self, sampler, steps, eta, clip_x0, params, cond, uncond, gamma, key):
        k_noise, k_run = jax.random.split(key)
        cond, uncond = self.condition.network(params, cond), self.condition.network(params, uncond)
        x_T = jax.random.normal(k_noise, (jax.tree.leaves(cond)[0].shape[0], *self.sample_shape))
        model = lambda x, t, c: self.eps_model(params, x, t, c)
        if self.classifier is None:
            eps_fn = guidance.cfg(model, cond, uncond, gamma)
        else:
            net, cparams = self.classifier
            log_prob = guidance.log_prob_from_logits(lambda x, t: net.apply(cparams, x, t))
            eps_fn = guidance.classifier_guidance(lambda x, t: model(x, t, uncond), log_prob, cond, gamma, self.schedule)
        x0 = run_sampler(sampler, eps_fn, self.schedule, x_T, k_run, steps, eta, clip_x0)
        return x0 if self.decode is None else self.decode(params, x0)
