"""A single-file Stable Diffusion 1.x / 2.x / SDXL checkpoint (the original LDM / SGM layout, as A1111 and
ComfyUI load it) -> a ``StableDiffusion`` (SDXL: ``StableDiffusionXL``, base or refiner).

The file's names go through ``ldm_layout``'s tables; every tensor is used, listed as known and unused
(``ldm_layout.IGNORED``), or an error names it. float16 and bfloat16 files are read into float32
parameters. What a file does not hold is taken as follows:

- configs: from ``config=`` (a diffusers folder of the same architecture, as diffusers' ``config=``),
  else inferred from the tensors' shapes: levels, channels, layers, attention per level, cross-attention
  width, in/out channels, linear or 1x1-conv projections; heads by the convention of each version
  (SD 1.x: 8 heads per block; SD 2.x: heads 64 wide); the text encoder's sizes, activation (1.x:
  quick_gelu, OpenAI's CLIP; 2.x: gelu, OpenCLIP's) and depth (2.x: one block less than stored, the
  penultimate layer); the rest as SD-1.5's / SD-2.1's folders have them;
- SDXL: heads 64 wide, the add-embedding's time-id width from label_emb's input minus the OpenCLIP
  projection (6 ids for the base, 5 with the refiner's aesthetic score), the VAE's scaling 0.13025 with
  force_upcast, 1024 x 1024 by default, both text encoders with every block they hold; model_index.json's
  settings as SDXL's folders have them (base: force_zeros_for_empty_prompt; refiner: not, and the aesthetic
  score);
- the scheduler: SD-1.5's PNDM config, SD-2.1's DDIM config or SDXL's EulerDiscrete one (``config=``: the
  folder's);
- what the U-Net predicts cannot be read from weights: ``prediction_type``, by default "epsilon" for
  1.x and "v_prediction" for 2.x (diffusers' default for a 2.x file; SD-2.x 512-base and other
  epsilon models need ``prediction_type="epsilon"``);
- the tokenizer(s): CLIP's, from the BPE merges shipped with jaxdiff (``clip_bpe``), padding as each
  version's folders do (SDXL's second: as SD 2.x's) (``config=``: the folder's tokenizers);
- EMA: a file with a whole ``model_ema.*`` copy of the U-Net is read from it (``ema=None``: when
  present, which diffusers does with ``extract_ema=True``; its default reads the training weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import specs
from jaxdiff.pretrained import clip_bpe, ldm_layout, scheduler, weights
from jaxdiff.pretrained import folder as folders
from jaxdiff.pretrained import tokenizer as tokenizers
from jaxdiff.pretrained.keys import flax_path, to_flax
from jaxdiff.pretrained.ldm_layout import UNET, VAE, NotStableDiffusion, Split, Transposed

PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                set_alpha_to_one=False, steps_offset=1, trained_betas=None, clip_sample=False)
_XL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **SCHEDULE, "skip_prk_steps": True,
                 "interpolation_type": "linear", "sample_max_value": 1.0, "timestep_spacing": "leading",
                 "use_karras_sigmas": False}
# the scheduler configs of SD-1.5's, SD-2.1's and SDXL 1.0's folders
SCHEDULERS = {"sd1": {"_class_name": "PNDMScheduler", **SCHEDULE, "skip_prk_steps": True},
              "sd2": {"_class_name": "DDIMScheduler", **SCHEDULE},
              "sdxl": _XL_SCHEDULER, "sdxl_refiner": _XL_SCHEDULER}
DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sdxl_refiner": "epsilon"}
# model_index.json's settings of SDXL 1.0's base and refiner folders
XL_SETTINGS = {"sdxl": {"force_zeros_for_empty_prompt": True},
               "sdxl_refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}
VERSIONS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner"}
TEXT = {"sd1": dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "sd2": dict(hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)}
HEAD_WIDTH_SD2, HEADS_SD1 = 64, 8
XL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}  # original size, crop, target size (refiner: aesthetic score)
PARTS = {"unet": "unet", "vae": "vae", "text": "text_encoder", "text_2": "text_encoder_2"}


class UnknownKeys(weights.CheckpointMismatch):
    """Tensors of a single file that no table maps (and that are not listed as known and unused)."""


def _shape(entries, key):
    if key not in entries:
        raise NotStableDiffusion(f"{key}: missing; the file lacks a tensor every SD 1.x / 2.x checkpoint has")
    return entries[key][1]


def infer_configs(entries: dict, model_type: str, prediction_type: str | None = None) -> dict:
    """diffusers-style config dicts {"unet", "vae", "text_encoder"} (SDXL: and "text_encoder_2"; the refiner:
    without "text_encoder") from the tensors' shapes (``entries``: key -> (file, shape, dtype), the U-Net's
    training keys). The default image size (the U-Net's sample_size) is 768 for a 2.x v-prediction model
    (SD-2.x 768-v), 1024 for SDXL, 512 otherwise."""
    xl = model_type.startswith("sdxl")
    unet_keys = [k[len(UNET):] for k in entries if k.startswith(UNET)]
    lay = ldm_layout.UNetLayout.from_keys(unet_keys)
    s = lambda k: _shape(entries, UNET + k)
    chans = [s(f"input_blocks.{1 + b * (lay.layers + 1)}.0.out_layers.3.weight")[0] for b in range(lay.levels)]
    firsts = [f"input_blocks.{1 + b * (lay.layers + 1)}.1" if lay.down_attention[b] else None
              for b in range(lay.levels)]
    first_attn = next(f for f in firsts if f is not None)
    count = lambda block: len({k[len(block):].split(".")[2] for k in unet_keys
                               if k.startswith(block + ".transformer_blocks.")})
    depth = count(first_attn)
    if xl:  # SDXL's depth differs by level (1, 2, 10): a list, whose last entry diffusers gives the mid block
        mid, depths = count("middle_block.1"), [count(f) if f else 1 for f in firsts]
        if firsts[-1] is None:
            depths[-1] = mid
        attn_depths = {count(f) for f in firsts if f}
        depth = mid if attn_depths == {mid} else depths  # one depth throughout (the refiner's 4): a number
    heads = HEADS_SD1 if model_type == "sd1" else [c // HEAD_WIDTH_SD2 for c in chans]
    unet = dict(
        in_channels=s("input_blocks.0.0.weight")[1], out_channels=s("out.2.weight")[0], block_out_channels=chans,
        layers_per_block=lay.layers, transformer_layers_per_block=depth,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.down_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in lay.up_attention],
        mid_block_type="UNetMidBlock2DCrossAttn" if lay.mid_attention else None,
        cross_attention_dim=s(f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_projection=len(s(f"{first_attn}.proj_in.weight")) == 2, attention_head_dim=heads,
        upcast_attention=model_type == "sd2",
        sample_size=96 if model_type == "sd2" and prediction_type == "v_prediction" else 128 if xl else 64)
    v = lambda k: _shape(entries, VAE + k)
    vae_keys = [k[len(VAE):] for k in entries if k.startswith(VAE)]
    levels = sorted({int(k.split(".")[2]) for k in vae_keys if k.startswith("encoder.down.")})
    vae = dict(
        in_channels=v("encoder.conv_in.weight")[1], out_channels=v("decoder.conv_out.weight")[0],
        block_out_channels=[v(f"encoder.down.{b}.block.0.conv1.weight")[0] for b in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len({k.split(".")[4] for k in vae_keys if k.startswith("encoder.down.0.block.")}),
        latent_channels=v("post_quant_conv.weight")[0], scaling_factor=0.13025 if xl else 0.18215)
    out = {"unet": unet, "vae": vae}
    if not xl:
        prefix = ldm_layout.OPEN_CLIP if model_type == "sd2" else ldm_layout.CLIP
        out["text_encoder"] = _text_config(entries, prefix, model_type == "sd2", penultimate=True)
        return out
    vae["force_upcast"] = True  # SDXL 1.0's VAE overflows in float16
    text_2 = _text_config(entries, {"sdxl": ldm_layout.XL_OPEN_CLIP, "sdxl_refiner": ldm_layout.XL_REFINER_CLIP}[
        model_type], True, penultimate=False)
    out["text_encoder_2"] = text_2
    if model_type == "sdxl":
        out["text_encoder"] = _text_config(entries, ldm_layout.XL_CLIP, False, penultimate=False)
    added = s("label_emb.0.0.weight")[1]
    ids = XL_TIME_IDS[model_type]
    unet.update(addition_embed_type="text_time", addition_embed_type_num_heads=64,
                addition_time_embed_dim=(added - text_2["projection_dim"]) // ids,
                projection_class_embeddings_input_dim=added)
    return out


def _text_config(entries, prefix: str, open_clip: bool, penultimate: bool) -> dict:
    """A CLIP text config from the shapes under ``prefix``: OpenAI's CLIP layout (quick_gelu) or OpenCLIP's
    (gelu; ``penultimate``: SD 2.x's one block less than stored; with a text_projection, its width)."""
    if open_clip:
        t = lambda k: _shape(entries, prefix + k)
        vocab, hidden = t("token_embedding.weight")
        positions = t("positional_embedding")[0]
        layers = ldm_layout.open_clip_blocks([k[len(prefix):] for k in entries if k.startswith(prefix)])
        layers -= 1 if penultimate else 0
        intermediate = t("transformer.resblocks.0.mlp.c_fc.weight")[0]
    else:
        prefix = _clip_prefix(entries, prefix)
        t = lambda k: _shape(entries, prefix + k)
        vocab, hidden = t("embeddings.token_embedding.weight")
        positions = t("embeddings.position_embedding.weight")[0]
        layers = len({k.split(".")[-4] for k in entries if k.startswith(prefix) and ".encoder.layers." in k
                      and k.endswith("fc1.weight")})
        intermediate = t("encoder.layers.0.mlp.fc1.weight")[0]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, max_position_embeddings=positions, layer_norm_eps=1e-5,
                **TEXT["sd2" if open_clip else "sd1"])
    if open_clip and not penultimate:  # CLIPTextModelWithProjection (SDXL)
        text["projection_dim"] = t("text_projection")[1]
    return text


def _clip_prefix(entries, prefix: str = ldm_layout.CLIP) -> str:
    wrapped = prefix + "text_model."
    return wrapped if any(k.startswith(wrapped) for k in entries) else prefix


def _open(path: Path):
    if not path.exists():
        raise weights.CheckpointNotFound(f"{path}: no such file")
    if path.is_dir():
        raise weights.CheckpointNotFound(f"{path}: a folder; from_single_file reads one .safetensors file "
                                         f"(a diffusers folder: Pipeline.from_pretrained)")
    if path.name.endswith(weights.PICKLE_SUFFIXES):
        raise weights.UnsupportedCheckpointFormat(
            f"{path}: a PyTorch pickle; jaxdiff reads safetensors only (unpickling can run arbitrary code). Convert "
            f"it once where torch is installed: safetensors.torch.save_file(torch.load(path, weights_only=True)"
            f"['state_dict'], 'model.safetensors')")
    if not path.name.endswith(".safetensors"):
        raise weights.CheckpointNotFound(f"{path}: not a .safetensors file")
    return weights._Checkpoint([path])


def load(path, *, config=None, prediction_type: str | None = None, ema: bool | None = None, dtype=jnp.float32,
         attention: str | None = None, quiet: bool = False):
    """``path``: a .safetensors file in the original layout. ``config``: a diffusers folder whose unet/,
    vae/, text_encoder(_2)/ configs, tokenizer(s) and scheduler/ describe the same model (else inferred, see
    the module doc). ``prediction_type``: "epsilon" or "v_prediction" (None: the folder's, else 1.x and
    SDXL epsilon, 2.x v_prediction). ``ema``: True / False / None (the EMA copy when the file has one).
    A one-line note on stderr says what was chosen unless ``quiet``."""
    from jaxdiff.pretrained.sdxl import check_added_width
    from jaxdiff.pretrained.stable_diffusion import StableDiffusion, check_parts, compute_settings

    dtype, attention = compute_settings(dtype, attention)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))} or None, "
                         f"got {prediction_type!r}")
    if ema not in (None, True, False):
        raise ValueError(f"ema must be True, False or None (the EMA weights when present), got {ema!r}")
    path = Path(os.fspath(path)).expanduser()
    checkpoint = _open(path)
    entries = checkpoint.entries
    model_type = ldm_layout.detect(entries)
    xl = model_type.startswith("sdxl")
    components = [c for _, _, c in _parts(model_type)]
    settings = dict(XL_SETTINGS.get(model_type, {}))
    if config is not None:
        index = folders.read_pipeline_index(config)
        wanted = components + [c.replace("text_encoder", "tokenizer") for c in components if c.startswith("text")]
        missing = [c for c in wanted + ["scheduler"] if c not in index.paths]
        if missing:
            raise folders.PipelineLayoutError(f"config={config}: lists no {', '.join(missing)}; an "
                                              f"{VERSIONS[model_type]} file needs a config folder of the same kind")
        configs = {c: folders.read_json(index[c] / "config.json") for c in components}
        tokenizers_ = {c: tokenizers.load_tokenizer(index[c.replace("text_encoder", "tokenizer")])
                       for c in components if c.startswith("text")}
        sched = scheduler.read_scheduler_config(index["scheduler"])
        settings.update(index.settings)
        where = {c: str(index[c] / "config.json") for c in configs}
    else:
        configs = infer_configs(entries, model_type, prediction_type or DEFAULT_PREDICTION[model_type])
        # SDXL's second tokenizer pads as SD 2.x's (OpenCLIP's convention)
        tokenizers_ = {c: clip_bpe.bundled_tokenizer("sd2" if c == "text_encoder_2" or model_type == "sd2" else "sd1")
                       for c in components if c.startswith("text")}
        sched = dict(SCHEDULERS[model_type])
        sched["prediction_type"] = DEFAULT_PREDICTION[model_type]
        where = {c: f"{path} ({c} config inferred from its shapes)" for c in configs}
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    part_specs = {"unet": specs.StableDiffusionUNet.from_config(configs["unet"]),
                  "vae": specs.StableDiffusionAutoencoder.from_config(configs["vae"])}
    if "text_encoder" in configs:
        part_specs["text"] = specs.CLIPText.from_config(configs["text_encoder"])
    if xl:
        part_specs["text_2"] = specs.CLIPTextWithProjection.from_config(configs["text_encoder_2"])
        check_added_width(part_specs["unet"].config_dict(), part_specs["text_2"].config_dict(),
                          bool(settings.get("requires_aesthetics_score", False)))
    else:
        tokenizer_where = str(index["tokenizer"]) if config is not None else "jaxdiff's CLIP tokenizer"
        check_parts(*(s.config_dict() for s in part_specs.values()), tokenizers_["text_encoder"],
                    {**where, "tokenizer": tokenizer_where})
    open_clip = "text_encoder_2" if xl else "text_encoder"
    layers = configs[open_clip].get("num_hidden_layers", 12)
    mapping, unknown, used_ema = ldm_layout.plan(entries, model_type, text_layers=layers, ema=ema)
    if unknown:
        raise _unknown_error(path, unknown, entries)
    params = {part: _load_part(part, spec.template(), mapping, checkpoint, path)
              for part, spec in part_specs.items()}
    if not quiet:
        how = "config folder " + str(config) if config is not None else "configs inferred from the shapes"
        print(f"note: {path.name}: {VERSIONS[model_type]}, {how}, U-Net from the "
              f"{'EMA (model_ema.*)' if used_ema else 'training (model.diffusion_model.*)'} weights, prediction_type "
              f"{sched['prediction_type']}", file=sys.stderr)
    if xl:
        from jaxdiff.pretrained.sdxl import StableDiffusionXL

        return StableDiffusionXL(part_specs["unet"], part_specs["vae"], part_specs.get("text"), part_specs["text_2"],
                                 params, tokenizers_.get("text_encoder"), tokenizers_["text_encoder_2"], sched,
                                 settings, dtype=dtype, attention=attention)
    return StableDiffusion(part_specs["unet"], part_specs["vae"], part_specs["text"], params,
                           tokenizers_["text_encoder"], sched, dtype=dtype, attention=attention)


def _parts(model_type: str):
    """(jaxdiff part, prefix, diffusers component) of each part of a model type."""
    return [(part, prefix, PARTS[part]) for part, prefix, _ in ldm_layout.PARTS[model_type]]


def _unknown_error(path: Path, unknown: list[str], entries) -> UnknownKeys:
    lines = [f"  {k} {weights._fmt(entries[k][1])}" for k in unknown[: weights.MAX_PROBLEM_LINES]]
    if len(unknown) > len(lines):
        lines.append(f"  ... and {len(unknown) - len(lines)} more")
    return UnknownKeys("\n".join([f"{path}: {len(unknown)} tensor(s) that no Stable Diffusion 1.x / 2.x / SDXL "
                                  f"layout rule maps (a fine-tune's extra modules, or another architecture):"] + lines),
                       unused=[(k, entries[k][1], None) for k in unknown])


def match(part: str, flat: dict, mapping: dict, shapes: dict, where) -> dict:
    """flax path -> (file key, Split, Transposed or None) for one part's template leaves (``flat``), every leaf
    filled from exactly one tensor or slice whose shape fits; else one ``CheckpointMismatch`` listing every problem.
    ``shapes``: file key -> shape. Reads no tensor."""
    targets = {}
    unused, wrong, name = [], [], PARTS[part]
    for key, (p, target) in mapping.items():
        if p != part:
            continue
        for t in (target if isinstance(target, tuple) else (target,)):
            split = t if isinstance(t, Split) else None
            fp = flax_path(t if isinstance(t, str) else t.key, flat)
            if fp not in flat or fp in targets:
                unused.append((key, shapes[key], fp))
                continue
            shape, want = tuple(shapes[key]), tuple(np.shape(flat[fp]))
            if isinstance(t, Transposed):
                shape = shape[::-1]
            if split:
                if not shape or shape[0] % split.parts:
                    wrong.append((key, shape, shape, want))
                    continue
                shape = (shape[0] // split.parts, *shape[1:])
            got = weights._converted_shape(fp, shape, want)
            if got != want:
                wrong.append((key, shape, got, want))
            targets[fp] = (key, t if isinstance(t, (Split, Transposed)) else None)
    missing = [("/".join(fp), fp, tuple(np.shape(v))) for fp, v in flat.items() if fp not in targets]
    if missing or unused or wrong:
        lines = [f"{name}: {k}: file {weights._fmt(s)} -> flax {weights._fmt(g)}, the model expects {weights._fmt(w)}"
                 for k, s, g, w in wrong]
        lines += [f"{name}: flax {p} {weights._fmt(w)}: no tensor of the file maps to it" for p, _, w in missing]
        lines += [f"{name}: {k}: maps to flax {'/'.join(fp)}, which the model lacks" for k, _, fp in unused]
        shown = lines[: weights.MAX_PROBLEM_LINES] + ([f"... and {len(lines) - weights.MAX_PROBLEM_LINES} more"]
                                                      if len(lines) > weights.MAX_PROBLEM_LINES else [])
        raise weights.CheckpointMismatch(
            "\n".join([f"{where}: the {name} tensors do not fit the model its config describes ({len(missing)} "
                       f"missing, {len(unused)} unused, {len(wrong)} wrong shape)"] + ["  " + s for s in shown]),
            missing=missing, unused=unused, wrong_shape=wrong)
    return targets


def _load_part(part: str, template: dict, mapping: dict, checkpoint, path: Path) -> dict:
    """One part's parameters in float32 (see ``match``)."""
    wrapped = set(template) == {"params"}
    flat = weights._flatten(template["params"] if wrapped else template)
    name = PARTS[part]
    targets = match(part, flat, mapping, {k: v[1] for k, v in checkpoint.entries.items()}, path)
    weights._check_float(name, checkpoint, _Assigned({k for k, _ in targets.values()}))
    out, bad, by_key = {}, [], {}
    for fp, (key, split) in targets.items():
        by_key.setdefault(key, []).append((fp, split))
    for key, uses in by_key.items():  # one read per tensor; a fused one serves its slices
        raw = checkpoint.read(key)
        if not weights._finite(raw):
            bad.append(key)
            continue
        array = np.asarray(raw, np.float32)  # float16 / bfloat16 files: float32 parameters
        for fp, split in uses:
            part_array = array
            if isinstance(split, Transposed):
                part_array = array.T
            elif split:
                n = array.shape[0] // split.parts
                part_array = array[split.index * n:(split.index + 1) * n]
            # device_put, not jnp.asarray, which compiles a small program for every new shape (seconds in all)
            out[fp] = jax.device_put(np.ascontiguousarray(to_flax(fp, part_array, tuple(np.shape(flat[fp])))))
    if bad:
        raise weights._non_finite_error(name, checkpoint, bad)
    params = weights._unflatten(out)
    return {"params": params} if wrapped else params


class _Assigned:
    """What ``weights._check_float`` reads of a plan: the keys assigned."""

    def __init__(self, keys):
        self.assign = dict.fromkeys(keys)
