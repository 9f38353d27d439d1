"""A diffusers SDXL folder (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline: the refiner, or
StableDiffusionXLInpaintPipeline: a U-Net of 9 input channels) -> the parts a jaxdiff ``Pipeline`` runs.

The base has two text encoders (CLIP ViT-L as ``CLIPTextModel``, OpenCLIP bigG as ``CLIPTextModelWithProjection``)
whose penultimate hidden states are concatenated, the second's projected pooled output feeding the U-Net's
"text_time" embedding with the micro-conditioning (``jaxdiff.conditions.SDXLText``). The refiner lists
text_encoder and tokenizer as null and reads the second encoder only, with an aesthetic score in its time ids
(``requires_aesthetics_score``). An inpainting U-Net reads the mask and the masked image's latents after the
noisy latents (``jaxdiff.inpainting``), as SD 1.x/2.x's; diffusers' SDXL inpainting defaults to strength 0.9999
(``inpaint_strength``). The rest (scheduler grids, t - 1 for the U-Net, image-to-image) is ``StableDiffusion``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import conditions, inpainting, specs
from jaxdiff.pretrained import folder as folders
from jaxdiff.pretrained import scheduler, weights
from jaxdiff.pretrained import tokenizer as tokenizers
from jaxdiff.pretrained.stable_diffusion import StableDiffusion, check_parts, compute_settings

SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_sdxl(index: folders.PipelineIndex) -> bool:
    """An SDXL folder: so named in model_index.json, or listing a second text encoder."""
    return index.class_name in SDXL_CLASSES or "text_encoder_2" in index.paths


def check_added_width(unet_cfg: dict, text_2_cfg: dict, aesthetic: bool) -> None:
    """The U-Net's add_embedding input = the pooled embedding + 5 (refiner: with the aesthetic score) or 6 time
    ids of addition_time_embed_dim each; a wrong requires_aesthetics_score is named before any weight is read."""
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise ValueError(f"unet config: addition_embed_type {unet_cfg.get('addition_embed_type')!r}; an SDXL "
                         f"U-Net has 'text_time'")
    ids = 5 if aesthetic else 6
    width = unet_cfg["addition_time_embed_dim"] * ids + text_2_cfg.get("projection_dim", 512)
    if width != unet_cfg["projection_class_embeddings_input_dim"]:
        other = "without" if aesthetic else "with"
        raise ValueError(f"unet config: projection_class_embeddings_input_dim "
                         f"{unet_cfg['projection_class_embeddings_input_dim']} is not text_encoder_2's "
                         f"projection_dim + {ids} time ids x addition_time_embed_dim ({width}); is "
                         f"model_index.json's requires_aesthetics_score right? (try {other} it)")


class StableDiffusionXL(StableDiffusion):
    """The parts of one SDXL base or refiner: specs, parameters {"unet", "vae", "text" (base only), "text_2"},
    tokenizers, scheduler config and model_index.json's settings (``force_zeros_for_empty_prompt``: a missing
    negative prompt gives zero states, not the empty prompt's; ``requires_aesthetics_score``: the refiner's
    time ids). The default guidance scale is 5, diffusers' for SDXL.

    The VAE decodes and encodes in float32 whatever the compute dtype when its config says ``force_upcast``
    (SDXL's VAE overflows in float16): its parameters are cast to float32 inside the compiled call."""

    default_gamma = 5.0
    inpaint_strength = 0.9999  # StableDiffusionXLInpaintPipeline's default: the grid's first step is skipped

    def __init__(self, unet_spec, vae_spec, text_spec, text_2_spec, params: dict, tokenizer, tokenizer_2,
                 scheduler_config: dict, settings: dict | None = None, *, dtype=jnp.float32,
                 attention: str | None = None, key_names: dict | None = None):
        dtype, attention = compute_settings(dtype, attention)
        settings = dict(settings or {})
        unet_cfg, vae_cfg = unet_spec.config_dict(), vae_spec.config_dict()
        where = {"unet": "unet config", "vae": "vae config", "text_encoder": "text_encoder_2 config",
                 "tokenizer": "tokenizer_2"}
        self.default_size = check_parts(unet_cfg, vae_cfg, text_2_spec.config_dict(), tokenizer_2, where)
        if text_spec is not None:
            check_parts(unet_cfg, vae_cfg, text_spec.config_dict(), tokenizer,
                        {**where, "text_encoder": "text_encoder config", "tokenizer": "tokenizer"})
        self.unet_spec, self.vae_spec, self.text_spec, self.text_2_spec = unet_spec, vae_spec, text_spec, text_2_spec
        self.unet = unet_spec.module(dtype, attention)
        self.force_upcast = bool(vae_cfg.get("force_upcast", True))
        self.vae = vae_spec.module(jnp.float32 if self.force_upcast else dtype, attention)
        self.text = None if text_spec is None else text_spec.module(dtype, attention)
        self.text_2 = text_2_spec.module(dtype, attention)
        self.params, self.tokenizer, self.tokenizer_2 = params, tokenizer, tokenizer_2
        self.scheduler_config, self.settings, self.key_names = scheduler_config, settings, key_names
        self.schedule = scheduler.schedule_from_config(scheduler_config)
        self.prediction = scheduler.prediction_type(scheduler_config)
        self.latent_factor = 2 ** (len(self.vae.block_out_channels) - 1)
        self.latent_channels = self.vae.latent_channels
        self.inpainting = unet_cfg.get("in_channels", 4) == 2 * self.latent_channels + 1
        self.default_size = tuple(s * self.latent_factor for s in self.default_size)
        self.latents_mean, self.latents_std = vae_cfg.get("latents_mean"), vae_cfg.get("latents_std")
        self.force_zeros = bool(settings.get("force_zeros_for_empty_prompt", True))
        self.aesthetic = bool(settings.get("requires_aesthetics_score", False))
        check_added_width(unet_cfg, text_2_spec.config_dict(), self.aesthetic)

    @classmethod
    def from_folder(cls, root, *, dtype=jnp.float32, attention: str | None = None, variant: str | None = None):
        dtype, attention = compute_settings(dtype, attention)
        index = folders.read_pipeline_index(root)
        if "text_encoder_2" not in index.paths or "tokenizer_2" not in index.paths:
            raise folders.PipelineLayoutError(f"{index.folder / 'model_index.json'}: an SDXL pipeline lists "
                                              f"text_encoder_2 and tokenizer_2")
        base = "text_encoder" in index.paths
        parts = ("unet", "vae", "text_encoder_2") + (("text_encoder",) if base else ())
        configs = {c: folders.read_json(index[c] / "config.json") for c in parts}
        unet = specs.StableDiffusionUNet.from_config(configs["unet"])
        vae = specs.StableDiffusionAutoencoder.from_config(configs["vae"])
        text_2 = specs.CLIPTextWithProjection.from_config(configs["text_encoder_2"])
        text = specs.CLIPText.from_config(configs["text_encoder"]) if base else None
        tokenizer_2 = tokenizers.load_tokenizer(index["tokenizer_2"])
        tokenizer = tokenizers.load_tokenizer(index["tokenizer"]) if base else None
        # every config is checked before minutes of reading weights
        check_added_width(unet.config_dict(), text_2.config_dict(),
                          bool(index.settings.get("requires_aesthetics_score", False)))
        fields = {"unet": (unet, "unet"), "vae": (vae, "vae"), "text_2": (text_2, "text_encoder_2")}
        if base:
            fields["text"] = (text, "text_encoder")
        params, names = {}, {}
        for key, (spec, sub) in fields.items():
            template = spec.template()
            params[key] = weights.load_params(template, index[sub], variant=variant, name=sub)
            names[key] = weights.key_names(template, index[sub], variant=variant)
        return cls(unet, vae, text, text_2, params, tokenizer, tokenizer_2,
                   scheduler.read_scheduler_config(index["scheduler"]), index.settings, dtype=dtype,
                   attention=attention, key_names=names)

    def save_pretrained(self, folder, params: dict | None = None, *, dtype=None):
        raise NotImplementedError("save_pretrained does not write SDXL folders yet")

    def model_output(self, params, z, t, c, extra=None):
        """The U-Net's raw output at jaxdiff's t (``eps_model`` converts v to eps; the sigma walks read this);
        ``c`` is ``SDXLText.network``'s dict (states, text_embeds, time_ids), ``extra`` an inpainting U-Net's
        mask and masked-image channels, read after z."""
        x = z if extra is None else inpainting.unet_input(z, extra)
        return self.unet.apply(params["unet"], x, t - 1, None, c["states"], None, c["text_embeds"], c["time_ids"])

    def _vae_params(self, params):
        if not self.force_upcast:
            return params["vae"]
        return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                            params["vae"])

    def decode(self, params, z):
        """Latents -> images in [-1, 1]; in float32 when the VAE config says force_upcast (SDXL's does)."""
        z = z.astype(jnp.float32) if self.force_upcast else z
        if self.latents_mean is not None and self.latents_std is not None:
            z = z * jnp.asarray(self.latents_std) / self.vae.scaling_factor + jnp.asarray(self.latents_mean)
        else:
            z = z / self.vae.scaling_factor + (self.vae.shift_factor or 0.0)
        return self.vae.apply(self._vae_params(params), z, method="decode").astype(jnp.float32)

    def encode(self, params, images, keys):
        """Images in [-1, 1] -> scaled latents (a posterior draw per image), in float32 under force_upcast."""
        mean, logvar = self.vae.apply(self._vae_params(params), images, method="encode")
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        z = mean + jnp.exp(0.5 * logvar) * noise
        if self.latents_mean is not None and self.latents_std is not None:
            return (z - jnp.asarray(self.latents_mean)) * self.vae.scaling_factor / jnp.asarray(self.latents_std)
        return (z - (self.vae.shift_factor or 0.0)) * self.vae.scaling_factor

    def condition(self):
        return conditions.SDXLText(self.tokenizer, self.text, self.tokenizer_2, self.text_2,
                                   force_zeros_for_empty_prompt=self.force_zeros, aesthetic=self.aesthetic)
