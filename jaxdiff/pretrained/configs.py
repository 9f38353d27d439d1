"""A component's config.json (parsed, as diffusers / transformers write it) -> the flax module it describes.

``unet_from_config`` (UNet2DConditionModel), ``autoencoder_from_config`` (AutoencoderKL) and
``clip_text_from_config`` (CLIPTextModel, CLIPTextModelWithProjection). Keys starting with "_" and keys that do
not change the computation (sizes of samples, dropout, token ids the network never reads, generation settings) are
ignored. A key we do not support, or a supported key with a value we do not implement, raises a
ValueError naming the key and the value: a checkpoint is refused rather than computed wrongly.
Absent keys take the library's defaults, as diffusers / transformers do.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.nets.autoencoder import AutoencoderKL
from jaxdiff.nets.clip import ACTIVATIONS, CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.nets.unet import UNet

_MISSING = object()

# UNet2DConditionModel ------------------------------------------------------------------------------------

UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, use_linear_projection=False, num_class_embeds=None, upcast_attention=False,
    time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3, addition_embed_type=None,
    addition_time_embed_dim=None, projection_class_embeddings_input_dim=None,
)
# keys whose only supported value is diffusers' default (what Stable Diffusion 1.x / 2.x use)
UNET_FIXED = dict(
    act_fn=("silu", "swish"), only_cross_attention=(False,), dual_cross_attention=(False,),
    class_embed_type=(None,),
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), num_attention_heads=(None,),
    resnet_time_scale_shift=("default",), time_embedding_type=("positional",), time_embedding_act_fn=(None,),
    timestep_post_act=(None,), time_cond_proj_dim=(None,),
    attention_type=("default",), class_embeddings_concat=(False,), reverse_transformer_layers_per_block=(None,),
)
# no effect on the computation of the blocks we build (dropout: inference; the rest: other block types)
UNET_IGNORED = ("sample_size", "dropout", "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
                "mid_block_only_cross_attention", "addition_embed_type_num_heads")
DOWN_BLOCKS = {"CrossAttnDownBlock2D": "transformer", "DownBlock2D": ""}
UP_BLOCKS = {"CrossAttnUpBlock2D": "transformer", "UpBlock2D": ""}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


def _refuse(component: str, key: str, value, expected) -> ValueError:
    return ValueError(f"{component} config: {key}={value!r} is not supported; expected {expected}")


def _read(cfg: dict, component: str, defaults: dict, fixed: dict, ignored) -> dict:
    """The config's values over ``defaults``, after refusing unknown keys and unsupported fixed values."""
    known = set(defaults) | set(fixed) | set(ignored)
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key not in known:
            raise ValueError(f"{component} config: unknown key {key!r} (value {value!r}); jaxdiff knows "
                             f"{sorted(known)}")
        if key in fixed:
            allowed = fixed[key]
            ok = value in allowed or (isinstance(value, (list, tuple)) and len(allowed) == 1
                                      and all(v == allowed[0] for v in value))
            if not ok:
                raise _refuse(component, key, value, " or ".join(repr(a) for a in allowed))
    return {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}


def _per_level(c: dict, key: str, n: int, component: str) -> tuple[int, ...]:
    value = c[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise _refuse(component, key, value, f"an int or a list of {n} ints (one per block)")


def unet_from_config(cfg: dict, dtype=jnp.float32, attention: str | None = None, remat: bool = False) -> UNet:
    """diffusers' UNet2DConditionModel config.json -> ``UNet`` with diffusers' parameter names.

    SD 1.x: attention_head_dim 8 is the number of HEADS per block (diffusers' legacy naming), each
    channels // 8 wide; SD 2.x: a list of heads per block ([5, 10, 20, 20]: 64 wide). ``dtype`` is the
    compute dtype; ``attention`` the implementation handed to jax.nn.dot_product_attention ("cudnn", "xla"
    or None). SDXL: ``transformer_layers_per_block`` per level, no attention at the first level
    (DownBlock2D), addition_embed_type "text_time" (the U-Net then reads text_embeds and time_ids).
    ``upcast_attention`` is honoured by construction: logits and softmax are always float32.
    ``remat``: gradient checkpointing of every block (training)."""
    comp = "UNet2DConditionModel"
    c = _read(cfg, comp, UNET_DEFAULTS, UNET_FIXED, UNET_IGNORED)
    chans = tuple(c["block_out_channels"])
    n = len(chans)
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ValueError(f"{comp} config: down_block_types {down} and up_block_types {up} need one entry per "
                         f"block_out_channels {chans}")
    for key, types, table in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
        for t in types:
            if t not in table:
                raise _refuse(comp, key, t, f"entries from {sorted(table)}")
    if c["mid_block_type"] not in MID_BLOCKS:
        raise _refuse(comp, "mid_block_type", c["mid_block_type"], " or ".join(map(repr, MID_BLOCKS)))
    if not isinstance(c["norm_num_groups"], int):
        raise _refuse(comp, "norm_num_groups", c["norm_num_groups"], "an int")
    layers = _per_level(c, "layers_per_block", n, comp)
    heads = _per_level(c, "attention_head_dim", n, comp)
    depth = _per_level(c, "transformer_layers_per_block", n, comp)
    cross = c["cross_attention_dim"]
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise _refuse(comp, "cross_attention_dim", cross, "one width for every block")
        cross = cross[0]
    for i, (ch, h) in enumerate(zip(chans, heads, strict=True)):
        if ch % h:
            raise ValueError(f"{comp} config: block {i} has {ch} channels, not divisible into attention_head_dim "
                             f"(= heads) {h}")
        if ch % c["norm_num_groups"]:
            raise ValueError(f"{comp} config: block {i} has {ch} channels, not divisible into norm_num_groups "
                             f"{c['norm_num_groups']}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if c[key] % 2 != 1:
            raise _refuse(comp, key, c[key], "an odd kernel size")
    added = _added_embedding(c, comp)
    return UNet(
        block_out_channels=chans, layers_per_block=layers,
        down_attention=tuple(DOWN_BLOCKS[t] for t in down), up_attention=tuple(UP_BLOCKS[t] for t in up),
        mid_block=c["mid_block_type"] is not None, num_heads=heads, transformer_layers=depth,
        cross_attention_dim=cross, use_linear_projection=bool(c["use_linear_projection"]),
        resnet="resnet", downsample="conv", downsample_padding=int(c["downsample_padding"]),
        upsample="nearest_conv", skips="per_layer", norm_num_groups=c["norm_num_groups"],
        norm_eps=float(c["norm_eps"]), mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        conv_in_kernel=c["conv_in_kernel"], conv_out_kernel=c["conv_out_kernel"], conv_norm_out=True,
        out_channels=c["out_channels"], time_proj_dim=chans[0], flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]), time_embed_dim=c["time_embedding_dim"] or 4 * chans[0],
        num_class_embeds=c["num_class_embeds"], null_label=None, addition_time_embed_dim=added[0],
        addition_embed_input_dim=added[1], center_input_sample=bool(c["center_input_sample"]), dtype=dtype,
        attention_implementation=attention,
        remat=remat)


def _added_embedding(c: dict, comp: str) -> tuple[int | None, int | None]:
    """(addition_time_embed_dim, projection_class_embeddings_input_dim) of SDXL's "text_time" embedding, or
    (None, None) without an added embedding."""
    kind = c["addition_embed_type"]
    if kind is None:
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if c[key] is not None:
                raise _refuse(comp, key, c[key], "null without addition_embed_type")
        return None, None
    if kind != "text_time":
        raise _refuse(comp, "addition_embed_type", kind, "None or 'text_time' (SDXL)")
    dims = []
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _refuse(comp, key, v, "a positive int with addition_embed_type 'text_time'")
        dims.append(v)
    if dims[1] <= dims[0]:
        raise ValueError(f"{comp} config: projection_class_embeddings_input_dim {dims[1]} leaves no room for the "
                         f"pooled text embedding beside time ids of addition_time_embed_dim {dims[0]}")
    return dims[0], dims[1]


# AutoencoderKL -------------------------------------------------------------------------------------------

VAE_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
    shift_factor=None, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
VAE_FIXED = dict(act_fn=("silu", "swish"))
# sample_size: tiling only; force_upcast and latents_mean / latents_std: the pipeline's business
VAE_IGNORED = ("sample_size", "force_upcast", "latents_mean", "latents_std")


def autoencoder_from_config(cfg: dict, dtype=jnp.float32, attention: str | None = None) -> AutoencoderKL:
    """diffusers' AutoencoderKL config.json -> ``AutoencoderKL``. ``scaling_factor`` (and ``shift_factor``)
    ride along on the module for the pipeline; encode/decode do not apply them."""
    comp = "AutoencoderKL"
    c = _read(cfg, comp, VAE_DEFAULTS, VAE_FIXED, VAE_IGNORED)
    chans = tuple(c["block_out_channels"])
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(c[key])
        if len(types) != len(chans) or any(t != want for t in types):
            raise _refuse(comp, key, list(types), f"{len(chans)} x {want!r} (one per block_out_channels)")
    if not isinstance(c["layers_per_block"], int):
        raise _refuse(comp, "layers_per_block", c["layers_per_block"], "an int")
    for i, ch in enumerate(chans):
        if ch % c["norm_num_groups"]:
            raise ValueError(f"{comp} config: block {i} has {ch} channels, not divisible into norm_num_groups "
                             f"{c['norm_num_groups']}")
    return AutoencoderKL(
        block_out_channels=chans, layers_per_block=c["layers_per_block"], in_channels=c["in_channels"],
        out_channels=c["out_channels"], latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
        use_quant_conv=bool(c["use_quant_conv"]), use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]), scaling_factor=float(c["scaling_factor"]),
        shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]), dtype=dtype,
        attention_implementation=attention)


# CLIPTextModel -------------------------------------------------------------------------------------------

CLIP_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407,
)
CLIP_FIXED = dict(model_type=("clip_text_model",), pruned_heads=({},))
# transformers' generic config keys (generation, heads, bookkeeping) and CLIP's that the text
# transformer never reads: training-only dropout and initialisation, the projection (CLIPTextModel
# has none), token ids other than the end token, output switches
CLIP_IGNORED = (
    "architectures", "attention_dropout", "dropout", "initializer_range", "initializer_factor", "projection_dim",
    "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "torch_dtype", "dtype",
    "transformers_version", "name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "chunk_size_feed_forward", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing",
)


def clip_text_from_config(cfg: dict, dtype=jnp.float32, attention: str | None = None,
                          with_projection: bool = False) -> CLIPTextModel:
    """transformers' CLIPTextConfig config.json (a text_encoder folder's) -> ``CLIPTextModel``, or with
    ``with_projection`` ``CLIPTextModelWithProjection`` (SDXL's text_encoder_2: ``projection_dim`` wide,
    512 when the config omits it, as transformers)."""
    comp = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    c = _read(cfg, comp, CLIP_DEFAULTS, CLIP_FIXED, CLIP_IGNORED)
    if c["hidden_act"] not in ACTIVATIONS:
        raise _refuse(comp, "hidden_act", c["hidden_act"], " or ".join(map(repr, sorted(ACTIVATIONS))))
    if not isinstance(c["eos_token_id"], int) or isinstance(c["eos_token_id"], bool):
        raise _refuse(comp, "eos_token_id", c["eos_token_id"], "one int")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"{comp} config: hidden_size {c['hidden_size']} is not divisible into "
                         f"num_attention_heads {c['num_attention_heads']}")
    extra = {}
    if with_projection:
        dim = cfg.get("projection_dim", 512)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise _refuse(comp, "projection_dim", dim, "a positive int")
        extra["projection_dim"] = dim
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(
        **extra, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        max_position_embeddings=c["max_position_embeddings"], hidden_act=c["hidden_act"],
        layer_norm_eps=float(c["layer_norm_eps"]), eos_token_id=c["eos_token_id"], dtype=dtype,
        attention_implementation=attention)
