"""The original (CompVis LDM / A1111) layout of a single-file Stable Diffusion checkpoint, as names.

One file holds every part under a prefix (``PARTS``); inside each part the names differ from diffusers'.
This module turns one checkpoint key into the diffusers key(s) of the same tensor, by tables:

- the U-Net (``model.diffusion_model.``): ``input_blocks.i.j`` / ``middle_block.j`` / ``output_blocks.i.j``
  are numbered through the whole network; with L layers per level and n levels, input block
  ``1 + b (L + 1) + j`` is level b's layer j (j = L: its downsampler) and output block ``b (L + 1) + j`` is
  up level b's layer j, whose last element is the upsampler. ResNet blocks rename their inner layers
  (``RESNET``); transformer blocks keep diffusers' names.
- the autoencoder (``first_stage_model.``): ``down.b.block.j`` -> ``down_blocks.b.resnets.j``; the decoder's
  ``up.k`` counts from the lowest resolution, diffusers' ``up_blocks`` from the highest (k -> n - 1 - k);
  the mid attention's ``q``/``k``/``v``/``proj_out`` are 1x1 convolutions (the loader reshapes them).
- SDXL (SGM's layout): the same U-Net numbering plus ``label_emb.0.0`` / ``label_emb.0.2`` (the "text_time"
  add-embedding); its text encoders are ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, the SD 1.x layout)
  and ``conditioner.embedders.1.model.`` (OpenCLIP bigG, the SD 2.x layout, every block used, and its
  ``text_projection`` used as CLIPTextModelWithProjection's: OpenCLIP multiplies x @ P, a Linear stores P.T,
  hence ``Transposed``); the refiner has the OpenCLIP one only, as ``conditioner.embedders.0.model.``.
- the text encoder: SD 1.x's ``cond_stage_model.transformer.`` is transformers' CLIPTextModel already;
  SD 2.x's ``cond_stage_model.model.`` is OpenCLIP's, whose fused ``in_proj`` holds q, k and v stacked
  (``Split``), and whose last residual block SD 2.x never runs (it reads the penultimate layer's states,
  as diffusers' 23-layer text encoder does): blocks past the text config's depth are dropped, listed.

A key maps to ``str`` (one diffusers key), ``Split`` (a slice of a fused tensor), ``Transposed``,
``DROPPED`` (a known tensor jaxdiff does not use, say why in ``IGNORED``) or ``None`` (unknown: the loader names
it in an error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPEN_CLIP, XL_REFINER_CLIP = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
                                          "conditioner.embedders.0.model.")
# model type -> (jaxdiff part, prefix, layout); what ``detect`` recognises
PARTS = {
    "sd1": (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text", CLIP, "clip")),
    "sd2": (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text", OPEN_CLIP, "open_clip")),
    "sdxl": (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text", XL_CLIP, "clip"),
             ("text_2", XL_OPEN_CLIP, "open_clip_projected")),
    "sdxl_refiner": (("unet", UNET, "unet"), ("vae", VAE, "vae"), ("text_2", XL_REFINER_CLIP, "open_clip_projected")),
}
# SDXL's "text_time" add-embedding (LDM's label_emb: Linear, SiLU, Linear)
SDXL_UNET = {"label_emb.0.0": ("add_embedding.linear_1", False), "label_emb.0.2": ("add_embedding.linear_2", False)}
EMA_PREFIX = "model_ema."

# tensors a single file may hold that no jaxdiff parameter takes, and why
IGNORED = {
    # the training schedule as LDM buffers (the scheduler config holds it)
    **{name: "the training noise schedule (a buffer)" for name in (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")},
    "logvar": "LDM's learned loss weights (training only)",
    "model_ema.decay": "the EMA's settings",
    "model_ema.num_updates": "the EMA's settings",
    CLIP + "text_model.embeddings.position_ids": "a buffer of 0..76",
    CLIP + "embeddings.position_ids": "a buffer of 0..76",
    OPEN_CLIP + "text_projection": "the contrastive projection: SD uses the text states before it",
    OPEN_CLIP + "logit_scale": "the contrastive temperature",
    OPEN_CLIP + "attn_mask": "the causal mask (a buffer)",
    "denoiser.sigmas": "SGM's sampling sigmas (a buffer; the scheduler config holds them)",
    XL_CLIP + "text_model.embeddings.position_ids": "a buffer of 0..76",
    **{prefix + name: why for prefix in (XL_OPEN_CLIP, XL_REFINER_CLIP) for name, why in (
        ("logit_scale", "the contrastive temperature"), ("attn_mask", "the causal mask (a buffer)"))},
}
IGNORED_PREFIXES = {"first_stage_model.loss.": "the autoencoder's training loss (LPIPS, discriminator)"}
DROPPED = "dropped"


@dataclass(frozen=True)
class Transposed:
    """The transpose of a file tensor (OpenCLIP's text_projection P, used as x @ P; a Linear holds P.T)."""

    key: str


@dataclass(frozen=True)
class Split:
    """Part ``index`` of ``parts`` equal slices along axis 0 of a fused tensor (OpenCLIP's q, k, v)."""

    key: str
    index: int
    parts: int


# ---------------------------------------------------------------------------------------------------------
# model type


class NotStableDiffusion(ValueError):
    """A safetensors file that is not a Stable Diffusion 1.x / 2.x / SDXL checkpoint in the original layout."""


def detect(keys) -> str:
    """"sd1", "sd2", "sdxl" or "sdxl_refiner" from the keys alone (the text encoders' layout tells them apart)."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("conditioner.embedders."):
        return _detect_sdxl(has, keys)
    if not has(UNET):
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        diffusers_part = any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys)
        hint = ("; it looks like one component of a diffusers folder: pass the folder (the one with "
                "model_index.json) to Pipeline.from_pretrained" if diffusers_part else "")
        raise NotStableDiffusion(f"not a Stable Diffusion single-file checkpoint: no {UNET}* keys (found {sample}, "
                                 f"...){hint}")
    for prefix in (VAE, "cond_stage_model."):
        if not has(prefix):
            raise NotStableDiffusion(f"a U-Net without {prefix}* keys: jaxdiff reads whole-pipeline files "
                                     f"(U-Net, autoencoder and text encoder)")
    if has(OPEN_CLIP):
        return "sd2"
    if has(CLIP):
        return "sd1"
    other = sorted({".".join(k.split(".")[:2]) for k in keys if k.startswith("cond_stage_model.")})
    raise NotStableDiffusion(f"unknown text encoder layout {', '.join(other)}: expected {CLIP}* (SD 1.x) or "
                             f"{OPEN_CLIP}* (SD 2.x)")


def _detect_sdxl(has, keys) -> str:
    for prefix in (UNET, VAE):
        if not has(prefix):
            raise NotStableDiffusion(f"an SDXL checkpoint (conditioner.embedders.*) without {prefix}* keys: jaxdiff "
                                     f"reads whole-pipeline files (U-Net, autoencoder and text encoders)")
    if not has(UNET + "label_emb.0.0."):
        raise NotStableDiffusion(f"conditioner.embedders.* but no {UNET}label_emb.0.0.*: not an SDXL U-Net (SDXL's "
                                 f"takes the pooled text and sizes through label_emb)")
    if has(XL_CLIP) and has(XL_OPEN_CLIP):
        return "sdxl"
    if has(XL_REFINER_CLIP) and not has("conditioner.embedders.1."):
        return "sdxl_refiner"
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.embedders.")})
    raise NotStableDiffusion(f"unknown SDXL text encoder layout {', '.join(found)}: expected {XL_CLIP}* and "
                             f"{XL_OPEN_CLIP}* (base) or {XL_REFINER_CLIP}* alone (refiner)")


# ---------------------------------------------------------------------------------------------------------
# U-Net

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_FIXED = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
              "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


@dataclass(frozen=True)
class UNetLayout:
    """The block structure the numbering depends on: levels, layers per level, attention per level."""

    levels: int
    layers: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    @classmethod
    def from_keys(cls, keys) -> UNetLayout:
        """Read from the U-Net's keys (without the prefix): the downsamplers count the levels, the input
        blocks the layers, a block's second element being a transformer says where attention is."""
        inputs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        downs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
        if not inputs or 0 not in inputs:
            raise NotStableDiffusion(f"{UNET}input_blocks.0.*: missing; not an LDM U-Net")
        levels = len(downs) + 1
        layers, rest = divmod(len(inputs) - levels, levels)
        if rest or layers < 1:
            raise NotStableDiffusion(f"{UNET}input_blocks: {len(inputs)} blocks with {len(downs)} downsamplers do not "
                                     f"make whole levels")
        is_attn = lambda prefix: any(k.startswith(prefix + ".norm.") or k.startswith(prefix + ".proj_in.")
                                     for k in keys)
        down = tuple(is_attn(f"input_blocks.{1 + b * (layers + 1)}.1") for b in range(levels))
        up = tuple(is_attn(f"output_blocks.{b * (layers + 1)}.1") for b in range(levels))
        return cls(levels, layers, down, up, is_attn("middle_block.1"))

    def modules(self) -> dict[str, tuple[str, bool]]:
        """LDM module prefix -> (diffusers module prefix, is a ResNet block)."""
        out = {k: (v, False) for k, v in UNET_FIXED.items()}
        n, L = self.levels, self.layers
        for b in range(n):
            for j in range(L):
                i = 1 + b * (L + 1) + j
                out[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", True)
                if self.down_attention[b]:
                    out[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", False)
            if b < n - 1:
                out[f"input_blocks.{1 + b * (L + 1) + L}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", False)
        out["middle_block.0"] = ("mid_block.resnets.0", True)
        if self.mid_attention:
            out["middle_block.1"] = ("mid_block.attentions.0", False)
        out[f"middle_block.{2 if self.mid_attention else 1}"] = ("mid_block.resnets.1", True)
        for b in range(n):
            for j in range(L + 1):
                i = b * (L + 1) + j
                out[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", True)
                if self.up_attention[b]:
                    out[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", False)
                if b < n - 1 and j == L:
                    out[f"output_blocks.{i}.{2 if self.up_attention[b] else 1}.conv"] = (
                        f"up_blocks.{b}.upsamplers.0.conv", False)
        return out


def _by_prefix(key: str, modules: dict) -> tuple[str, str] | None:
    """(module prefix, the rest) for the longest prefix in ``modules`` that ``key`` starts with."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in modules:
            return head, ".".join(parts[cut:])
    return None


def unet_key(key: str, modules: dict) -> str | None:
    """diffusers' key of an LDM U-Net key (without ``model.diffusion_model.``), or None."""
    found = _by_prefix(key, modules)
    if found is None:
        return None
    head, rest = found
    target, resnet = modules[head]
    if resnet:
        inner = _by_prefix(rest, RESNET)
        if inner is None:
            return None
        rest = f"{RESNET[inner[0]]}.{inner[1]}"
    return f"{target}.{rest}"


# ---------------------------------------------------------------------------------------------------------
# autoencoder

VAE_INNER = {
    "resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"},
    "attention": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}


def vae_modules(keys) -> dict[str, tuple[str, str | None]]:
    """LDM module prefix -> (diffusers module prefix, inner table name or None), from the autoencoder's keys
    (without the prefix): which levels and blocks exist is read from them."""
    out = {"quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    levels = {side: sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{side}\.{d}\.(\d+)\.", k))})
              for side, d in (("encoder", "down"), ("decoder", "up"))}
    n_up = len(levels["decoder"])
    for side, kind, blocks in (("encoder", "down", "down_blocks"), ("decoder", "up", "up_blocks")):
        out[f"{side}.conv_in"] = (f"{side}.conv_in", None)
        out[f"{side}.conv_out"] = (f"{side}.conv_out", None)
        out[f"{side}.norm_out"] = (f"{side}.conv_norm_out", None)
        out[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", "resnet")
        out[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", "attention")
        out[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", "resnet")
        for level in levels[side]:
            b = level if kind == "down" else n_up - 1 - level  # the decoder counts from the lowest resolution
            js = {int(m.group(1)) for k in keys if (m := re.match(rf"{side}\.{kind}\.{level}\.block\.(\d+)\.", k))}
            for j in js:
                out[f"{side}.{kind}.{level}.block.{j}"] = (f"{side}.{blocks}.{b}.resnets.{j}", "resnet")
            sampler = "downsample" if kind == "down" else "upsample"
            out[f"{side}.{kind}.{level}.{sampler}.conv"] = (f"{side}.{blocks}.{b}.{sampler}rs.0.conv", None)
    return out


def vae_key(key: str, modules: dict) -> str | None:
    """diffusers' key of an LDM autoencoder key (without ``first_stage_model.``), or None."""
    found = _by_prefix(key, modules)
    if found is None:
        return None
    head, rest = found
    target, inner = modules[head]
    if inner is not None:
        layer, _, leaf = rest.partition(".")
        if layer not in VAE_INNER[inner] or leaf not in ("weight", "bias"):
            return None
        rest = f"{VAE_INNER[inner][layer]}.{leaf}"
    elif rest not in ("weight", "bias"):
        return None
    return f"{target}.{rest}"


# ---------------------------------------------------------------------------------------------------------
# text encoders

OPEN_CLIP_FIXED = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                   "positional_embedding": "text_model.embeddings.position_embedding.weight",
                   "ln_final.weight": "text_model.final_layer_norm.weight",
                   "ln_final.bias": "text_model.final_layer_norm.bias"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")


def clip_key(key: str) -> str | None:
    """transformers' CLIPTextModel key of an SD 1.x text key (without its prefix): the same names, under
    ``text_model.`` (older transformers saved them without it)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def open_clip_key(key: str, layers: int, projected: bool = False):
    """The CLIPTextModel key(s) of an OpenCLIP text key (without its prefix): a str, a tuple of three
    ``Split`` (in_proj), ``DROPPED`` for blocks at or past ``layers`` (the penultimate-layer rule), or None.
    ``projected``: CLIPTextModelWithProjection's, whose text_projection is OpenCLIP's, transposed (SDXL)."""
    if projected and key == "text_projection":
        return Transposed("text_projection.weight")
    if key in OPEN_CLIP_FIXED:
        return OPEN_CLIP_FIXED[key]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    m = m or re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn)\.in_proj_(weight|bias)", key)
    if m is None:
        return None
    i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
    if i >= layers:
        return DROPPED
    base = f"text_model.encoder.layers.{i}"
    if key.endswith(("in_proj_weight", "in_proj_bias")):
        return tuple(Split(f"{base}.self_attn.{name}.{leaf}", n, 3) for n, name in enumerate(QKV))
    if module not in OPEN_CLIP_BLOCK:
        return None
    return f"{base}.{OPEN_CLIP_BLOCK[module]}.{leaf}"


def open_clip_blocks(keys) -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})


# ---------------------------------------------------------------------------------------------------------
# the whole file


def ema_name(key: str) -> str:
    """LDM's EMA copy of a U-Net key: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``
    (LitEma stores its shadow parameters under the module name with the dots removed)."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def plan(keys, model_type: str, *, text_layers: int | None = None, ema: bool | None = None):
    """Every key of the file -> (part, target) with target as ``unet_key`` etc. give it, and the keys that
    map nowhere. ``text_layers``: the OpenCLIP encoder's depth (its config's num_hidden_layers). ``ema``: read
    the U-Net from ``model_ema.*`` (None: when the file has them).
    Returns (mapping, unknown, used_ema)."""
    keys = list(keys)
    unet_keys = [k for k in keys if k.startswith(UNET)]
    ema_keys = {ema_name(k): k for k in unet_keys}
    has_ema = sum(k in ema_keys for k in keys) == len(unet_keys) > 0
    if ema and not has_ema:
        raise ValueError("ema=True, but the file holds no complete model_ema.* copy of the U-Net")
    use_ema = has_ema if ema is None else bool(ema)
    layout = UNetLayout.from_keys([k[len(UNET):] for k in unet_keys]).modules()
    if model_type.startswith("sdxl"):
        layout.update(SDXL_UNET)
    vae_table = vae_modules([k[len(VAE):] for k in keys if k.startswith(VAE)])
    rules = {"unet": lambda k: unet_key(k, layout), "vae": lambda k: vae_key(k, vae_table), "clip": clip_key}
    for _, prefix, name in PARTS[model_type]:
        if name.startswith("open_clip"):
            blocks = open_clip_blocks([k[len(prefix):] for k in keys if k.startswith(prefix)])
            projected = name == "open_clip_projected"
            # SD 2.x reads the penultimate block's states: its text config has one layer less than stored (SDXL
            # takes the penultimate hidden states from a model that keeps every block)
            depth = (blocks if projected else blocks - 1) if text_layers is None else text_layers
            rules[name] = lambda k, depth=depth, projected=projected: open_clip_key(k, depth, projected)
    mapping, unknown = {}, []
    for key in keys:
        if key in IGNORED or any(key.startswith(p) for p in IGNORED_PREFIXES):
            mapping[key] = (None, DROPPED)
            continue
        source = ema_keys.get(key, key)  # an EMA copy goes where the U-Net key it shadows goes
        found = next(((part, prefix, name) for part, prefix, name in PARTS[model_type] if source.startswith(prefix)),
                     None)
        target = None if found is None else rules[found[2]](source[len(found[1]):])
        if target is None:
            unknown.append(key)
        elif target == DROPPED or (found[0] == "unet" and use_ema != (key in ema_keys)):
            mapping[key] = (None, DROPPED)  # a dropped block, or the U-Net copy not chosen
        else:
            mapping[key] = (found[0], target)
    return mapping, unknown, use_ema
