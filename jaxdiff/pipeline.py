"""A few lines from a trained checkpoint to images, in the spirit of Diffusers::

    pipe = Pipeline.from_checkpoint("runs/mnist_cfg/checkpoints")
    images = pipe(labels=[0, 1, 2], gamma=3.0, sampler="dpm++", steps=20, seed=0)  # uint8 (3, 28, 28, 1)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, sampling, schedules
from jaxdiff.checkpoint import Checkpoints, compare_configs
from jaxdiff.data import to_uint8
from jaxdiff.nets.classifier import EvalClassifier, NoisyClassifier
from jaxdiff.nets.unet import UNet

ARCH_KEYS = ("model", "num_classes", "channels", "blocks_per_level", "attention_levels", "cond_dim")
MUST_MATCH = ARCH_KEYS + ("schedule", "num_timesteps", "image_shape", "dataset")
SAMPLERS = ("ddpm", "ddim", "dpm++")


def schedule_from_config(config: dict) -> schedules.Schedule:
    kinds = {"linear": schedules.linear, "cosine": schedules.cosine}
    if config["schedule"] not in kinds:
        raise ValueError(f"unknown schedule {config['schedule']!r}; expected one of {sorted(kinds)}")
    return kinds[config["schedule"]](config["num_timesteps"])


def model_from_config(config: dict, dtype=jnp.float32):
    if config["model"] == "unet":
        return UNet(num_classes=config["num_classes"], channels=tuple(config["channels"]),
                    blocks_per_level=config["blocks_per_level"], attention_levels=tuple(config["attention_levels"]),
                    cond_dim=config["cond_dim"], dtype=dtype)
    if config["model"] == "classifier":
        return NoisyClassifier(num_classes=config["num_classes"], channels=tuple(config["channels"]),
                               cond_dim=config["cond_dim"], dtype=dtype)
    if config["model"] == "eval_classifier":
        return EvalClassifier(num_classes=config["num_classes"], channels=tuple(config["channels"]), dtype=dtype)
    raise ValueError(f"unknown model {config['model']!r}; expected 'unet', 'classifier' or 'eval_classifier'")


def init_params(model, config: dict, seed: int = 0):
    x = jnp.zeros((1, *config["image_shape"]), jnp.float32)
    t = jnp.ones((1,), jnp.int32)
    args = {"classifier": (x, t), "eval_classifier": (x,)}.get(config["model"], (x, t, jnp.zeros((1,), jnp.int32)))
    return model.init(jax.random.key(seed), *args)


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


class Pipeline:
    """Labels (and negative labels) in, uint8 images out.

    Classifier-free guidance with a class-conditional U-Net, or, given ``classifier`` =
    (noisy classifier module, its params), classifier guidance of the U-Net's
    unconditional eps: eps - gamma sqrt(1 - abar_t) grad log p(y | x_t).
    """

    def __init__(self, model, params, schedule: schedules.Schedule, config: dict, classifier=None):
        self.model, self.params, self.schedule, self.config = model, params, schedule, config
        self.classifier = classifier
        self.num_classes = classifier[0].num_classes if classifier else config["num_classes"]
        self.image_shape = tuple(config["image_shape"])
        self._compiled = {}

    @classmethod
    def from_checkpoint(cls, directory: str, step: int | None = None, dtype=jnp.float32,
                        classifier_directory: str | None = None) -> "Pipeline":
        model, params, config = load_model(directory, step, dtype, expect="unet")
        classifier = None
        if classifier_directory is not None:
            net, cparams, cconfig = load_model(classifier_directory, None, dtype, expect="classifier")
            compare_configs(cconfig, config, ("schedule", "num_timesteps", "image_shape"), where=classifier_directory)
            classifier = (net, cparams)
        return cls(model, params, schedule_from_config(config), config, classifier)

    def eps_model(self, params):
        return lambda x, t, y: self.model.apply(params, x, t, y)

    def __call__(self, labels, *, negative_labels=None, gamma=3.0, sampler: str = "dpm++", steps: int = 20,
                 seed: int = 0, eta: float = 0.0, clip_x0: float | None = 1.0) -> np.ndarray:
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.size == 0:
            raise ValueError("labels is empty: ask for at least one image")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        if negative_labels is not None and self.classifier is not None:
            raise ValueError("negative_labels need classifier-free guidance; this pipeline uses a classifier")
        if negative_labels is None:
            uncond = np.full_like(labels, self.num_classes)
        else:
            uncond = np.broadcast_to(np.asarray(negative_labels, np.int32), labels.shape)
            if uncond.min() < 0 or uncond.max() >= self.num_classes:
                raise ValueError(f"negative_labels must be in 0..{self.num_classes - 1}")
        gamma = np.broadcast_to(np.asarray(gamma, np.float32), labels.shape)
        if not np.all(np.isfinite(gamma)):
            raise ValueError(f"gamma must be finite, got {gamma}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        sig = (sampler, steps, float(eta), clip_x0, labels.size)
        if sig not in self._compiled:
            self._compiled[sig] = jax.jit(partial(self._generate, sampler, steps, float(eta), clip_x0))
        x = self._compiled[sig](self.params, jnp.asarray(labels), jnp.asarray(uncond), jnp.asarray(gamma),
                                jax.random.key(seed))
        return to_uint8(x)

    def _generate(self, sampler, steps, eta, clip_x0, params, labels, uncond, gamma, key):
        k_noise, k_run = jax.random.split(key)
        x_T = jax.random.normal(k_noise, (labels.shape[0], *self.image_shape))
        if self.classifier is None:
            eps_fn = guidance.cfg(self.eps_model(params), labels, uncond, gamma)
        else:
            net, cparams = self.classifier
            null = jnp.full_like(labels, self.config["num_classes"])
            log_prob = guidance.log_prob_from_logits(lambda x, t: net.apply(cparams, x, t))
            eps_fn = guidance.classifier_guidance(lambda x, t: self.model.apply(params, x, t, null), log_prob,
                                                  labels, gamma, self.schedule)
        return run_sampler(sampler, eps_fn, self.schedule, x_T, k_run, steps, eta, clip_x0)
