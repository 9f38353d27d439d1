"""Model specs: one frozen, JSON-serialisable description per kind of model.

A spec is everything needed to rebuild a model: ``module(dtype)`` makes the flax module,
``init(seed)`` fresh float32 parameters, ``template()`` their shapes without allocating them
(what a checkpoint restores into). A diffusion model's spec also holds its full noise
schedule, says what it is conditioned on (``condition``) and how to read eps from the
network (``eps_model``). Two runs are the same model exactly when their specs are equal, so a
checkpoint stores ``spec.to_dict()`` and a resume compares it whole::

    spec = specs.LabelUNet(num_classes=10, channels=(64, 128, 256))
    spec == specs.from_dict(json.loads(json.dumps(spec.to_dict())))   # True

``REGISTRY`` maps each ``kind`` to its class; ``from_dict`` is the one way back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditions, host
from jaxdiff.schedules import Schedule, ScheduleSpec

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.kind] = cls
    return cls


def linear_schedule(num_timesteps: int = 1000) -> ScheduleSpec:
    return ScheduleSpec("linear", num_timesteps, 1e-4, 0.02)


def _init_once(init, key, values=lambda: 0):
    """``jax.jit(init)(key)`` as a program that runs once (``jaxdiff.host``: on the host's CPU without XLA's
    backend optimisations, which cut its compile time about five-fold, 10.5 -> 2.2 s for a small U-Net, and
    on a GPU spare its ~6 s compile there; a large network is drawn on the accelerator), the parameters then on
    the default device."""
    return host.to_default_device(host.run_once(init, key, values=values))


@functools.lru_cache(maxsize=16)
def _template(spec):
    """A spec's parameter shapes, traced once per spec (a trace of the whole network: ~0.5 s for a U-Net)."""
    return jax.eval_shape(lambda: spec.init(0))


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class Spec:
    """The base of every spec: JSON round trip and parameter construction."""

    kind: ClassVar[str] = ""

    def module(self, dtype=jnp.float32):
        raise NotImplementedError

    def init_inputs(self) -> tuple:
        """Example inputs (batch 1) that ``module().init`` is called with."""
        raise NotImplementedError

    def init(self, seed: int = 0):
        """Fresh float32 parameters. One compiled program: run op by op, XLA:CPU compiles each of the
        initialisation's hundreds of operations by itself (seconds for a small U-Net)."""
        return _init_once(lambda key: self.module().init(key, *self.init_inputs()), jax.random.key(seed),
                          self.num_params)

    def template(self):
        """The parameters' shapes and dtypes (jax.ShapeDtypeStruct), nothing allocated."""
        try:
            hash(self)
        except TypeError:  # a setting that is not hashable: traced each time
            return jax.eval_shape(lambda: self.init(0))
        return jax.tree.map(lambda a: a, _template(self))  # new containers: the cached tree stays as it is

    def build_schedule(self) -> Schedule:
        """The noise schedule of a spec that has one (diffusion models, noisy classifiers)."""
        return self.schedule.build()

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.template()))

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ScheduleSpec) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def _from_fields(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"kind"}
        if unknown:
            raise ValueError(f"{cls.kind} spec: unknown settings {sorted(unknown)}; expected some of {sorted(names)}")
        kwargs = {k: _tuple(v) for k, v in d.items() if k != "kind"}
        if "schedule" in kwargs:
            kwargs["schedule"] = ScheduleSpec.from_dict(d["schedule"])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class DiffusionSpec(Spec):
    """A network read as eps_theta(x_t, t, condition), with the schedule it was trained under."""

    @property
    def sample_shape(self) -> tuple:
        raise NotImplementedError

    def eps_model(self, module):
        """``eps(params, x_t, t, condition) -> eps`` for this kind of network."""
        raise NotImplementedError


def _x(shape):
    return jnp.zeros((1, *shape), jnp.float32)


# numpy, not jax: a jax array made on import would start the backend before jax.distributed.initialize
_T = np.ones((1,), np.int32)


@register
@dataclasses.dataclass(frozen=True)
class LabelUNet(DiffusionSpec):
    """The textbook's class-conditional U-Net (10.1, 10.4); label ``num_classes`` is the null label."""

    kind: ClassVar[str] = "label_unet"
    num_classes: int = 10
    channels: tuple = (64, 128, 256)
    blocks_per_level: int = 1
    attention_levels: tuple = ()
    cond_dim: int = 256
    image_shape: tuple = (28, 28, 1)
    schedule: ScheduleSpec = dataclasses.field(default_factory=linear_schedule)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.unet import textbook_unet

        return textbook_unet(num_classes=self.num_classes, channels=self.channels,
                             blocks_per_level=self.blocks_per_level, attention_levels=self.attention_levels,
                             cond_dim=self.cond_dim, dtype=dtype)

    def init_inputs(self):
        return _x(self.image_shape), _T, jnp.zeros((1,), jnp.int32)

    @property
    def sample_shape(self):
        return self.image_shape

    def condition(self):
        return conditions.Labels(self.num_classes)

    def eps_model(self, module):
        return lambda p, x, t, y: module.apply(p, x, t, y)


@register
@dataclasses.dataclass(frozen=True)
class SuperRes(DiffusionSpec):
    """A U-Net reading [x_t, the low-resolution image upsampled] as channels (the cascaded example)."""

    kind: ClassVar[str] = "superres"
    channels: tuple = (64, 128, 256)
    image_shape: tuple = (28, 28, 1)
    low_res: int = 14
    schedule: ScheduleSpec = dataclasses.field(default_factory=linear_schedule)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.unet import textbook_unet

        return textbook_unet(num_classes=0, channels=self.channels, out_channels=self.image_shape[-1], dtype=dtype)

    def init_inputs(self):
        x = _x(self.image_shape)
        return jnp.concatenate([x, x], -1), _T

    @property
    def sample_shape(self):
        return self.image_shape

    def condition(self):
        return conditions.LowRes(self.low_res, self.image_shape[0], self.image_shape[-1])

    def eps_model(self, module):
        return lambda p, x, t, low: module.apply(p, jnp.concatenate([x, low.astype(x.dtype)], -1), t)


@register
@dataclasses.dataclass(frozen=True)
class LatentUNet(DiffusionSpec):
    """A U-Net on autoencoder latents with cross-attention to text tokens (10.5); the condition is
    (tokens (B, L, context_dim), mask (B, L)). ``latent_scale`` brings the latents to unit variance."""

    kind: ClassVar[str] = "latent_unet"
    channels: tuple = (64, 128)
    cross_attention_levels: tuple = (0, 1)
    cond_dim: int = 128
    latent_shape: tuple = (8, 8, 4)
    context_dim: int = 128
    max_len: int = 12
    latent_scale: float = 1.0
    schedule: ScheduleSpec = dataclasses.field(default_factory=linear_schedule)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.unet import textbook_unet

        return textbook_unet(num_classes=0, channels=self.channels, cond_dim=self.cond_dim,
                             cross_attention_levels=self.cross_attention_levels,
                             out_channels=self.latent_shape[-1], dtype=dtype)

    def init_inputs(self):
        ctx = jnp.zeros((1, self.max_len, self.context_dim), jnp.float32)
        return _x(self.latent_shape), _T, None, ctx, jnp.ones((1, self.max_len), bool)

    @property
    def sample_shape(self):
        return self.latent_shape

    def eps_model(self, module):
        return lambda p, z, t, c: module.apply(p, z, t, None, c[0], c[1])


@register
@dataclasses.dataclass(frozen=True)
class NoisyClassifier(Spec):
    """p_phi(y | x_t, t), the classifier that classifier guidance differentiates (10.3)."""

    kind: ClassVar[str] = "noisy_classifier"
    num_classes: int = 10
    channels: tuple = (32, 64, 128)
    cond_dim: int = 128
    image_shape: tuple = (28, 28, 1)
    schedule: ScheduleSpec = dataclasses.field(default_factory=linear_schedule)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.classifier import NoisyClassifier as Net

        return Net(num_classes=self.num_classes, channels=self.channels, cond_dim=self.cond_dim, dtype=dtype)

    def init_inputs(self):
        return _x(self.image_shape), _T


@register
@dataclasses.dataclass(frozen=True)
class EvalClassifier(Spec):
    """A clean-image classifier that only judges samples (accuracy; FID in its features)."""

    kind: ClassVar[str] = "eval_classifier"
    num_classes: int = 10
    channels: tuple = (32, 64, 128)
    image_shape: tuple = (28, 28, 1)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.classifier import EvalClassifier as Net

        return Net(num_classes=self.num_classes, channels=self.channels, dtype=dtype)

    def init_inputs(self):
        return (_x(self.image_shape),)


@register
@dataclasses.dataclass(frozen=True)
class Autoencoder(Spec):
    """The small KL autoencoder, 28x28 <-> latents (Stable Diffusion's first stage, in miniature)."""

    kind: ClassVar[str] = "autoencoder"
    channels: tuple = (32, 64, 128)
    latent_channels: int = 4
    image_shape: tuple = (28, 28, 1)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.autoencoder import Autoencoder as Net

        return Net(channels=self.channels, latent_channels=self.latent_channels, out_channels=self.image_shape[-1],
                   dtype=dtype)

    def init_inputs(self):
        return _x(self.image_shape), jax.random.key(1)


@register
@dataclasses.dataclass(frozen=True)
class ContrastiveText(Spec):
    """A CLIP-style pair, trained together: a text encoder over a word vocabulary and an image
    encoder; parameters {"text", "image", "logit_scale"}. ``module`` is (text, image)."""

    kind: ClassVar[str] = "contrastive_text"
    vocab: tuple = ()
    max_len: int = 12
    width: int = 128
    image_shape: tuple = (28, 28, 1)

    def module(self, dtype=jnp.float32):
        from jaxdiff.nets.text import ImageEncoder, TextEncoder

        return (TextEncoder(vocab_size=len(self.vocab), width=self.width, max_len=self.max_len, dtype=dtype),
                ImageEncoder(dtype=dtype))

    def init(self, seed: int = 0):
        text, image = self.module()

        def init(key):  # one compiled program, not op by op (see Spec.init)
            k1, k2 = jax.random.split(key)
            ids, mask = jnp.zeros((1, self.max_len), jnp.int32), jnp.ones((1, self.max_len), bool)
            return {"text": text.init(k1, ids, mask), "image": image.init(k2, _x(self.image_shape)),
                    "logit_scale": jnp.asarray(np.log(10.0), jnp.float32)}

        return _init_once(init, jax.random.key(seed), self.num_params)

    def tokenizer(self):
        from jaxdiff.nets.text import Tokenizer

        return Tokenizer(self.vocab, self.max_len)


def _freeze(v):
    """JSON values -> hashable ones (lists -> tuples, dicts -> sorted item tuples), so a spec stays frozen."""
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v) and v:
        return {k: _thaw(x) for k, x in v}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


@dataclasses.dataclass(frozen=True)
class Pretrained(Spec):
    """A pretrained component described by its own config.json (as diffusers or transformers write
    it), held whole: the config is the spec. Keys starting with "_" (bookkeeping) are left out."""

    config: tuple = ()

    @classmethod
    def from_config(cls, config: dict):
        return cls(_freeze({k: v for k, v in config.items() if not k.startswith("_")}))

    def config_dict(self) -> dict:
        return _thaw(self.config) if self.config else {}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": self.config_dict()}

    @classmethod
    def _from_fields(cls, d: dict):
        if set(d) - {"kind", "config"} or not isinstance(d.get("config"), dict):
            raise ValueError(f"{cls.kind} spec: expected {{'kind', 'config': {{...}}}}, got keys {sorted(d)}")
        return cls.from_config(d["config"])


@register
@dataclasses.dataclass(frozen=True)
class StableDiffusionUNet(Pretrained):
    """diffusers' UNet2DConditionModel: eps (or v) of latents, t, and text tokens by cross-attention."""

    kind: ClassVar[str] = "sd_unet"

    def module(self, dtype=jnp.float32, attention: str | None = None, remat: bool = False):
        """``remat``: gradient checkpointing of the U-Net's blocks (the same parameters and outputs)."""
        from jaxdiff.pretrained.configs import unet_from_config

        return unet_from_config(self.config_dict(), dtype, attention, remat)

    def init_inputs(self):
        c = self.config_dict()
        cross = c.get("cross_attention_dim", 1280)
        cross = cross[0] if isinstance(cross, list) else cross
        y = None if c.get("num_class_embeds") is None else jnp.zeros((1,), jnp.int32)
        inputs = (_x((8, 8, c.get("in_channels", 4))), _T, y, jnp.zeros((1, 1, cross), jnp.float32))
        if c.get("addition_embed_type") == "text_time":
            # add_embedding's input width is all its parameters depend on: any split between the pooled
            # text embedding and the time ids' embeddings gives the same shapes
            width = c["projection_class_embeddings_input_dim"] - c["addition_time_embed_dim"]
            inputs += (None, jnp.zeros((1, width), jnp.float32), jnp.zeros((1, 1), jnp.float32))
        return inputs


@register
@dataclasses.dataclass(frozen=True)
class StableDiffusionAutoencoder(Pretrained):
    """diffusers' AutoencoderKL: images <-> latents (scaled by the config's scaling_factor)."""

    kind: ClassVar[str] = "sd_autoencoder"

    def module(self, dtype=jnp.float32, attention: str | None = None):
        from jaxdiff.pretrained.configs import autoencoder_from_config

        return autoencoder_from_config(self.config_dict(), dtype, attention)

    def init_inputs(self):
        c = self.config_dict()
        size = 2 ** len(c.get("block_out_channels", (64,)))
        return (_x((size, size, c.get("in_channels", 3))),)


@register
@dataclasses.dataclass(frozen=True)
class CLIPText(Pretrained):
    """transformers' CLIPTextModel: token ids -> per-token states for cross-attention."""

    kind: ClassVar[str] = "clip_text"

    def module(self, dtype=jnp.float32, attention: str | None = None):
        from jaxdiff.pretrained.configs import clip_text_from_config

        return clip_text_from_config(self.config_dict(), dtype, attention)

    def init_inputs(self):
        return (jnp.zeros((1, self.config_dict().get("max_position_embeddings", 77)), jnp.int32),)


@register
@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjection(CLIPText):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder): CLIPText plus the projected pooled
    output."""

    kind: ClassVar[str] = "clip_text_projection"

    def module(self, dtype=jnp.float32, attention: str | None = None):
        from jaxdiff.pretrained.configs import clip_text_from_config

        return clip_text_from_config(self.config_dict(), dtype, attention, with_projection=True)


def from_dict(d: Any) -> Spec:
    """The spec a ``to_dict()`` made, checked: its kind, its settings."""
    if not isinstance(d, dict) or d.get("kind") not in REGISTRY:
        kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"not a model spec: kind {kind!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[d["kind"]]._from_fields(d)
