"""A diffusers Stable Diffusion folder (or hub id) -> a jaxdiff ``Pipeline``.

The parts: the U-Net, the KL autoencoder and the CLIP text encoder built from their own
config.json and filled from their safetensors (every tensor accounted for); CLIP's tokenizer; the
scheduler config's training schedule and prediction type (epsilon, or v through
``parametrization.eps_from_v``); the timestep grids that reproduce diffusers' DDIM and
DPM-Solver++ for the samplers of the same name, and the diffusers walks of ``jaxdiff.pretrained.walks``
(the sigma walks among them take the U-Net's raw output, ``model_output``). diffusers' timestep tau is
jaxdiff's t - 1: the U-Net is fed t - 1.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import conditions, inpainting, specs
from jaxdiff.parametrization import eps_from_v
from jaxdiff.pretrained import folder as folders
from jaxdiff.pretrained import save, scheduler, walks, weights
from jaxdiff.pretrained import tokenizer as tokenizers
from jaxdiff.sampling import check_steps

# jaxdiff's sampler names -> the diffusers scheduler whose timestep grid they take
DIFFUSERS_SAMPLERS = {"ddim": "ddim", "dpm++": "dpm_solver_pp"}


class StableDiffusion:
    """The parts of one Stable Diffusion: specs (configs), parameters {"unet", "vae", "text"}, tokenizer and
    scheduler config; modules in compute ``dtype`` with ``attention`` (None: XLA; "cudnn": the fused
    kernel where it applies). Parameters stay as they are (float32 or float16 as stored). ``load`` reads
    them from a diffusers folder; a benchmark can build them from configs and random parameters.
    ``key_names``: per part, flax path -> (torch key, shape) as the folder stored it, so that
    ``save_pretrained`` writes the same tensor names (None: the rule's names)."""

    def __init__(self, unet_spec, vae_spec, text_spec, params: dict, tokenizer, scheduler_config: dict, *,
                 dtype=jnp.float32, attention: str | None = None, key_names: dict | None = None):
        dtype, attention = compute_settings(dtype, attention)
        where = {"unet": "unet config", "vae": "vae config", "text_encoder": "text_encoder config",
                 "tokenizer": "the tokenizer"}
        self.default_size = check_parts(unet_spec.config_dict(), vae_spec.config_dict(), text_spec.config_dict(),
                                        tokenizer, where)
        self.unet_spec, self.vae_spec, self.text_spec = unet_spec, vae_spec, text_spec
        self.unet = unet_spec.module(dtype, attention)
        self.vae = vae_spec.module(dtype, attention)
        self.text = text_spec.module(dtype, attention)
        self.params, self.tokenizer, self.scheduler_config = params, tokenizer, scheduler_config
        self.key_names = key_names
        self.schedule = scheduler.schedule_from_config(scheduler_config)
        self.prediction = scheduler.prediction_type(scheduler_config)
        self.latent_factor = 2 ** (len(self.vae.block_out_channels) - 1)
        self.latent_channels = self.vae.latent_channels
        # an inpainting U-Net reads the mask and the masked image's latents beside the noisy latents
        self.inpainting = unet_spec.config_dict().get("in_channels", 4) == 2 * self.latent_channels + 1
        self.default_size = tuple(s * self.latent_factor for s in self.default_size)

    @classmethod
    def from_folder(cls, root, *, dtype=jnp.float32, attention: str | None = None, variant: str | None = None):
        dtype, attention = compute_settings(dtype, attention)  # before minutes of reading weights
        index = folders.read_pipeline_index(root)
        configs = {c: folders.read_json(index[c] / "config.json") for c in ("unet", "vae", "text_encoder")}
        unet = specs.StableDiffusionUNet.from_config(configs["unet"])
        vae = specs.StableDiffusionAutoencoder.from_config(configs["vae"])
        text = specs.CLIPText.from_config(configs["text_encoder"])
        tokenizer = tokenizers.load_tokenizer(index["tokenizer"])
        where = {c: str(index[c] / "config.json") for c in configs} | {"tokenizer": f"{index['tokenizer']}"}
        check_parts(unet.config_dict(), vae.config_dict(), text.config_dict(), tokenizer, where)
        parts = {"unet": (unet, "unet"), "vae": (vae, "vae"), "text": (text, "text_encoder")}
        params, names = {}, {}
        for key, (spec, sub) in parts.items():
            template = spec.template()
            params[key] = weights.load_params(template, index[sub], variant=variant, name=sub)
            names[key] = weights.key_names(template, index[sub], variant=variant)
        return cls(unet, vae, text, params, tokenizer, scheduler.read_scheduler_config(index["scheduler"]),
                   dtype=dtype, attention=attention, key_names=names)

    def save_pretrained(self, folder, params: dict | None = None, *, dtype=None):
        """Write a diffusers folder (see ``jaxdiff.pretrained.save``): ``params`` whole or by part
        ({"unet": trained}), the rest this model's; ``dtype`` casts floating tensors."""
        return save.save_pretrained(self, folder, params=params, dtype=dtype)

    def model_output(self, params, z, t, context, extra=None):
        """The U-Net's raw output (eps, or v for a v-prediction U-Net) at jaxdiff's t, integer or
        fractional (the U-Net reads diffusers' t - 1): what the sigma walks convert themselves. ``extra``: an
        inpainting U-Net's mask and masked-image channels (``jaxdiff.inpainting.channels``), read after z."""
        x = z if extra is None else inpainting.unet_input(z, extra)
        return self.unet.apply(params["unet"], x, t - 1, None, context)

    def eps_model(self, params, z, t, context, extra=None):
        """eps of the latents z_t at jaxdiff's integer t; a v-prediction U-Net's output converted to eps."""
        out = self.model_output(params, z, t, context, extra)
        if self.prediction == "v_prediction":
            out = eps_from_v(z, out, alpha_bar=self.schedule.alpha_bar(t))
        return out

    def decode(self, params, z):
        """Latents -> images in [-1, 1] (N, H, W, 3): undo the config's scaling (and shift) first."""
        z = z / self.vae.scaling_factor + (self.vae.shift_factor or 0.0)
        return self.vae.apply(params["vae"], z, method="decode").astype(jnp.float32)

    def encode(self, params, images, keys):
        """Images in [-1, 1] -> scaled latents, a draw from the encoder's posterior per image."""
        mean, logvar = self.vae.apply(params["vae"], images, method="encode")
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        z = mean + jnp.exp(0.5 * logvar) * noise
        return (z - (self.vae.shift_factor or 0.0)) * self.vae.scaling_factor

    def condition(self):
        return conditions.TextTokens(self.tokenizer, self.text)

    def grid(self, sampler: str, steps: int):
        """The timestep grid (endpoint last) diffusers would walk for this sampler, or None for
        samplers diffusers has no twin of here (they take jaxdiff's own grid)."""
        if sampler not in DIFFUSERS_SAMPLERS:
            return None
        return _setup(_frozen(self.scheduler_config), DIFFUSERS_SAMPLERS[sampler], steps)[0]

    def walk(self, sampler: str, steps: int | None = None):
        """The diffusers walk (``jaxdiff.pretrained.walks.Walk``) that ``sampler`` ("auto", an A1111 name, or
        a walk's name) means for this folder's scheduler config, at ``steps`` (default diffusers' 50)."""
        return _walk(_frozen(self.scheduler_config), sampler, None if steps is None else check_steps(steps))

    def sampler_options(self, sampler: str, steps: int) -> dict:
        """The settings besides the grid with which jaxdiff's ``sampler`` reproduces diffusers' run
        (``sampler_setup``'s flags): DDIM's ``clip_x0`` (``clip_sample``, in latent space as diffusers
        clips), DPM-Solver++'s ``final_first_order``; {} for samplers without a diffusers twin."""
        if sampler not in DIFFUSERS_SAMPLERS:
            return {}
        _, clip_x0, final_first_order = _setup(_frozen(self.scheduler_config), DIFFUSERS_SAMPLERS[sampler], steps)
        return {"clip_x0": clip_x0} if sampler == "ddim" else {"final_first_order": final_first_order}


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = (None, "xla", "cudnn")


def compute_settings(dtype, attention):
    """(dtype, attention) checked: one of COMPUTE_DTYPES (a jnp dtype or its name) and one of ATTENTION.
    float16 is refused on the CPU, where XLA has no float16 matrix product (it would fail at the first
    call); "cudnn" falls back to XLA's attention, with a notice, where there is no cuDNN (CPU, TPU, ROCm)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES or isinstance(dtype, bool):
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (a jnp dtype or its name), got {dtype!r}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION))} (None: XLA's), got {attention!r}")
    backend = jax.default_backend()
    if name == "float16" and backend == "cpu":
        raise ValueError("dtype float16 does not run on the CPU (XLA's CPU matrix product has no float16); "
                         "use float32 or bfloat16 there")
    if attention == "cudnn" and not _has_cudnn():
        print(f"note: attention='cudnn' needs an NVIDIA GPU with cuDNN, which the {backend} backend lacks; "
              f"using XLA's attention", file=sys.stderr)
        attention = None
    return jnp.dtype(name), attention


def _has_cudnn() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        return "rocm" not in jax.devices()[0].client.platform_version.lower()
    except AttributeError:  # no platform version to read: trust the gpu backend to be CUDA
        return True


def check_parts(unet: dict, vae: dict, text: dict, tokenizer, where: dict) -> tuple[int, int]:
    """What the configs must agree on before any weight is read; ``where`` names each part's file in errors.
    Returns the U-Net's default latent size (height, width) from its sample_size."""
    latent = vae.get("latent_channels", 4)
    in_channels = unet.get("in_channels", 4)
    if in_channels not in (latent, 2 * latent + 1):
        raise ValueError(f"{where['unet']}: in_channels {in_channels} fits neither text-to-image ({latent}, the "
                         f"autoencoder's latent_channels) nor inpainting ({2 * latent + 1} = {latent} latent + 1 mask "
                         f"+ {latent} masked-image channels)")
    size = unet.get("sample_size", 64)
    pair = list(size) if isinstance(size, (list, tuple)) and len(size) == 2 else [size, size]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{where['unet']}: sample_size must be a positive integer or a [height, width] pair "
                         f"(latent pixels: the default image size over the autoencoder's factor), got {size!r}")
    vocab_size = text.get("vocab_size", 49408)
    for attr in ("bos_token", "eos_token", "pad_token"):
        token_id = getattr(tokenizer, f"{attr}_id", None)
        if isinstance(token_id, int) and not 0 <= token_id < vocab_size:
            raise ValueError(f"{where['tokenizer']}: {attr} {tokenizer.special_tokens[attr]['content']!r} has id "
                             f"{token_id}, outside {where['text_encoder']}'s vocab_size {vocab_size}")
    top = getattr(tokenizer, "max_token_id", None)
    if isinstance(top, int) and top >= vocab_size:
        raise ValueError(f"{where['tokenizer']}: the vocabulary has ids up to {top}, outside "
                         f"{where['text_encoder']}'s vocab_size {vocab_size}: not this text encoder's tokenizer")
    positions = text.get("max_position_embeddings", 77)
    length = getattr(tokenizer, "max_length", None)
    if isinstance(length, int) and length > positions:
        raise ValueError(f"{where['tokenizer']}: model_max_length {length} is longer than {where['text_encoder']}'s "
                         f"max_position_embeddings {positions}")
    return tuple(pair)


def _frozen(config: dict):
    return json.dumps(config, sort_keys=True)


@lru_cache(maxsize=64)
def _setup(config_json: str, sampler: str, steps: int) -> tuple:
    """(grid, clip_x0, final_first_order) of ``scheduler.sampler_setup``, hashable and cached."""
    config = json.loads(config_json)
    try:
        setup = scheduler.sampler_setup(config, steps, sampler)
    except scheduler.SchedulerConfigError as err:
        if "no jaxdiff grid reproduces it exactly" not in str(err):
            raise
        # diffusers' DDIM steps by a fixed stride that no one grid reproduces for some spacings
        print(f"warning: {err}; using the listed timesteps, which differs from diffusers here", file=sys.stderr)
        setup = scheduler.sampler_setup(config, steps, sampler, strict=False)
    return tuple(int(t) for t in setup.timesteps), setup.clip_x0, setup.final_first_order


@lru_cache(maxsize=64)
def _walk(config_json: str, sampler: str, steps: int | None):
    return walks.make_walk(json.loads(config_json), sampler, steps)


def load(model, *, dtype=jnp.float32, attention: str | None = None, variant: str | None = None,
         offline: bool | None = None) -> StableDiffusion:
    """``model``: a diffusers Stable Diffusion folder (1.x, 2.x, or SDXL base or refiner: then a
    ``jaxdiff.pretrained.sdxl.StableDiffusionXL``), or a hub id fetched when online."""
    root = folders.resolve(model, offline=offline, variant=variant)
    from jaxdiff.pretrained import sdxl  # it builds on this module

    cls = sdxl.StableDiffusionXL if sdxl.is_sdxl(folders.read_pipeline_index(root)) else StableDiffusion
    return cls.from_folder(root, dtype=dtype, attention=attention, variant=variant)


def to_nhwc(latents) -> np.ndarray:
    """diffusers' (N, C, h, w) latents -> jaxdiff's (N, h, w, C)."""
    return np.transpose(np.asarray(latents), (0, 2, 3, 1))
