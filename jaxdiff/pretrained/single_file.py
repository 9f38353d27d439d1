"""A single-file Stable Diffusion 1.x / 2.x checkpoint (the original LDM layout, as A1111 and ComfyUI load
it) -> a ``StableDiffusion``.

The file's names go through ``ldm_layout``'s tables; every tensor is used, listed as known and unused
(``ldm_layout.IGNORED``), or an error names it. float16 and bfloat16 files are read into float32
parameters. What a file does not hold is taken as follows:

- configs: from ``config=`` (a diffusers folder of the same architecture, as diffusers' ``config=``),
  else inferred from the tensors' shapes: levels, channels, layers, attention per level, cross-attention
  width, in/out channels, linear or 1x1-conv projections; heads by the convention of each version
  (SD 1.x: 8 heads per block; SD 2.x: heads 64 wide); the text encoder's sizes, activation (1.x:
  quick_gelu, OpenAI's CLIP; 2.x: gelu, OpenCLIP's) and depth (2.x: one block less than stored, the
  penultimate layer); the rest as SD-1.5's / SD-2.1's folders have them;
- the scheduler: SD-1.5's PNDM config or SD-2.1's DDIM config (``config=``: the folder's);
- what the U-Net predicts cannot be read from weights: ``prediction_type``, by default "epsilon" for
  1.x and "v_prediction" for 2.x (diffusers' default for a 2.x file; SD-2.x 512-base and other
  epsilon models need ``prediction_type="epsilon"``);
- the tokenizer: CLIP's, from the BPE merges shipped with jaxdiff (``clip_bpe``), padding as each
  version's folders do (``config=``: the folder's tokenizer);
- EMA: a file with a whole ``model_ema.*`` copy of the U-Net is read from it (``ema=None``: when
  present, which diffusers does with ``extract_ema=True``; its default reads the training weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff import specs
from jaxdiff.pretrained import clip_bpe, ldm_layout, scheduler, weights
from jaxdiff.pretrained import folder as folders
from jaxdiff.pretrained import tokenizer as tokenizers
from jaxdiff.pretrained.keys import flax_path, to_flax
from jaxdiff.pretrained.ldm_layout import UNET, VAE, NotStableDiffusion, Split

PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                set_alpha_to_one=False, steps_offset=1, trained_betas=None, clip_sample=False)
# the scheduler configs of SD-1.5's and SD-2.1's folders
SCHEDULERS = {"sd1": {"_class_name": "PNDMScheduler", **SCHEDULE, "skip_prk_steps": True},
              "sd2": {"_class_name": "DDIMScheduler", **SCHEDULE}}
DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}
TEXT = {"sd1": dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "sd2": dict(hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)}
HEAD_WIDTH_SD2, HEADS_SD1 = 64, 8
PARTS = {"unet": "unet", "vae": "vae", "text": "text_encoder"}


class UnknownKeys(weights.CheckpointMismatch):
    """Tensors of a single file that no table maps (and that are not listed as known and unused)."""


def _shape(entries, key):
    if key not in entries:
        raise NotStableDiffusion(f"{key}: missing; the file lacks a tensor every SD 1.x / 2.x checkpoint has")
    return entries[key][1]


def infer_configs(entries: dict, model_type: str, prediction_type: str | None = None) -> dict:
    """diffusers-style config dicts {"unet", "vae", "text_encoder"} from the tensors' shapes
    (``entries``: key -> (file, shape, dtype), the U-Net's training keys). The default image size (the
    U-Net's sample_size) is 768 for a 2.x v-prediction model (SD-2.x 768-v), 512 otherwise."""
    unet_keys = [k[len(UNET):] for k in entries if k.startswith(UNET)]
    lay = ldm_layout.UNetLayout.from_keys(unet_keys)
    s = lambda k: _shape(entries, UNET + k)
    chans = [s(f"input_blocks.{1 + b * (lay.layers + 1)}.0.out_layers.3.weight")[0] for b in range(lay.levels)]
    first_attn = next(f"input_blocks.{1 + b * (lay.layers + 1)}.1" for b in range(lay.levels) if lay.down_attention[b])
    depth = len({k.split(".")[4] for k in unet_keys if k.startswith(first_attn + ".transformer_blocks.")})
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
        sample_size=96 if model_type == "sd2" and prediction_type == "v_prediction" else 64)
    v = lambda k: _shape(entries, VAE + k)
    vae_keys = [k[len(VAE):] for k in entries if k.startswith(VAE)]
    levels = sorted({int(k.split(".")[2]) for k in vae_keys if k.startswith("encoder.down.")})
    vae = dict(
        in_channels=v("encoder.conv_in.weight")[1], out_channels=v("decoder.conv_out.weight")[0],
        block_out_channels=[v(f"encoder.down.{b}.block.0.conv1.weight")[0] for b in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len({k.split(".")[4] for k in vae_keys if k.startswith("encoder.down.0.block.")}),
        latent_channels=v("post_quant_conv.weight")[0], scaling_factor=0.18215)
    if model_type == "sd1":
        t = lambda k: _shape(entries, _clip_prefix(entries) + k)
        vocab, hidden = t("embeddings.token_embedding.weight")
        positions = t("embeddings.position_embedding.weight")[0]
        layers = len({k.split(".")[-4] for k in entries if ".encoder.layers." in k and k.endswith("fc1.weight")})
        intermediate = t("encoder.layers.0.mlp.fc1.weight")[0]
    else:
        t = lambda k: _shape(entries, ldm_layout.OPEN_CLIP + k)
        vocab, hidden = t("token_embedding.weight")
        positions = t("positional_embedding")[0]
        text_keys = [k[len(ldm_layout.OPEN_CLIP):] for k in entries if k.startswith(ldm_layout.OPEN_CLIP)]
        layers = ldm_layout.open_clip_blocks(text_keys) - 1
        intermediate = t("transformer.resblocks.0.mlp.c_fc.weight")[0]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, max_position_embeddings=positions, layer_norm_eps=1e-5,
                **TEXT[model_type])
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _clip_prefix(entries) -> str:
    wrapped = ldm_layout.CLIP + "text_model."
    return wrapped if any(k.startswith(wrapped) for k in entries) else ldm_layout.CLIP


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
    vae/, text_encoder/ configs, tokenizer/ and scheduler/ describe the same model (else inferred, see
    the module doc). ``prediction_type``: "epsilon" or "v_prediction" (None: the folder's, else 1.x
    epsilon, 2.x v_prediction). ``ema``: True / False / None (the EMA copy when the file has one).
    A one-line note on stderr says what was chosen unless ``quiet``."""
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
    if config is not None:
        index = folders.read_pipeline_index(config)
        configs = {c: folders.read_json(index[c] / "config.json") for c in ("unet", "vae", "text_encoder")}
        tokenizer = tokenizers.load_tokenizer(index["tokenizer"])
        sched = scheduler.read_scheduler_config(index["scheduler"])
        where = {c: str(index[c] / "config.json") for c in configs} | {"tokenizer": str(index["tokenizer"])}
    else:
        configs = infer_configs(entries, model_type, prediction_type or DEFAULT_PREDICTION[model_type])
        tokenizer = clip_bpe.bundled_tokenizer(model_type)
        sched = dict(SCHEDULERS[model_type])
        sched["prediction_type"] = DEFAULT_PREDICTION[model_type]
        where = {c: f"{path} ({c} config inferred from its shapes)" for c in configs}
        where["tokenizer"] = "jaxdiff's CLIP tokenizer"
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    part_specs = {"unet": specs.StableDiffusionUNet.from_config(configs["unet"]),
                  "vae": specs.StableDiffusionAutoencoder.from_config(configs["vae"]),
                  "text": specs.CLIPText.from_config(configs["text_encoder"])}
    check_parts(*(s.config_dict() for s in part_specs.values()), tokenizer, where)
    layers = configs["text_encoder"].get("num_hidden_layers", 12)
    mapping, unknown, used_ema = ldm_layout.plan(entries, model_type, text_layers=layers, ema=ema)
    if unknown:
        raise _unknown_error(path, unknown, entries)
    params = {part: _load_part(part, spec.template(), mapping, checkpoint, path)
              for part, spec in part_specs.items()}
    if not quiet:
        version = {"sd1": "SD 1.x", "sd2": "SD 2.x"}[model_type]
        how = "config folder " + str(config) if config is not None else "configs inferred from the shapes"
        print(f"note: {path.name}: {version}, {how}, U-Net from the "
              f"{'EMA (model_ema.*)' if used_ema else 'training (model.diffusion_model.*)'} weights, prediction_type "
              f"{sched['prediction_type']}", file=sys.stderr)
    return StableDiffusion(part_specs["unet"], part_specs["vae"], part_specs["text"], params, tokenizer, sched,
                           dtype=dtype, attention=attention)


def _unknown_error(path: Path, unknown: list[str], entries) -> UnknownKeys:
    lines = [f"  {k} {weights._fmt(entries[k][1])}" for k in unknown[: weights.MAX_PROBLEM_LINES]]
    if len(unknown) > len(lines):
        lines.append(f"  ... and {len(unknown) - len(lines)} more")
    return UnknownKeys("\n".join([f"{path}: {len(unknown)} tensor(s) that no Stable Diffusion 1.x / 2.x layout rule "
                                  f"maps (a fine-tune's extra modules, or another architecture):"] + lines),
                       unused=[(k, entries[k][1], None) for k in unknown])


def match(part: str, flat: dict, mapping: dict, shapes: dict, where) -> dict:
    """flax path -> (file key, Split or None) for one part's template leaves (``flat``), every leaf filled from
    exactly one tensor or slice whose shape fits; else one ``CheckpointMismatch`` listing every problem.
    ``shapes``: file key -> shape. Reads no tensor."""
    targets = {}
    unused, wrong, name = [], [], PARTS[part]
    for key, (p, target) in mapping.items():
        if p != part:
            continue
        for t in (target if isinstance(target, tuple) else (target,)):
            split = t if isinstance(t, Split) else None
            fp = flax_path(split.key if split else t, flat)
            if fp not in flat or fp in targets:
                unused.append((key, shapes[key], fp))
                continue
            shape, want = tuple(shapes[key]), tuple(np.shape(flat[fp]))
            if split:
                if not shape or shape[0] % split.parts:
                    wrong.append((key, shape, shape, want))
                    continue
                shape = (shape[0] // split.parts, *shape[1:])
            got = weights._converted_shape(fp, shape, want)
            if got != want:
                wrong.append((key, shape, got, want))
            targets[fp] = (key, split)
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
            if split:
                n = array.shape[0] // split.parts
                part_array = array[split.index * n:(split.index + 1) * n]
            out[fp] = jnp.asarray(to_flax(fp, part_array, tuple(np.shape(flat[fp]))))
    if bad:
        raise weights._non_finite_error(name, checkpoint, bad)
    params = weights._unflatten(out)
    return {"params": params} if wrapped else params


class _Assigned:
    """What ``weights._check_float`` reads of a plan: the keys assigned."""

    def __init__(self, keys):
        self.assign = dict.fromkeys(keys)
