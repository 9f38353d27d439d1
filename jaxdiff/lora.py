"""LoRA: low-rank adapters on a network's linear projections, as data beside the base parameters.

For a Dense layer with kernel W (in, out) an adapter holds A (in, r) and B (r, out) and the layer computes
with W + scale * (alpha / r) * A @ B: peft's LoRA (its lora_A.weight is A transposed, lora_B.weight is B
transposed; delta W = (alpha / r) B A in torch's (out, in) layout). For a convolution with kernel W
(kh, kw, in, out) A is a convolution kernel (kh, kw, in, r) and B the 1x1 convolution after it, held as (r, out):
the same A @ B (contracting r) is the merged kernel, exact for any stride and padding since B is 1x1 (peft's and
kohya's LoCon). ``init`` draws A as peft does (uniform in +-1/sqrt(in), torch's Linear default) and sets B to
zero, so a fresh LoRA changes nothing.

A ``LoRA`` is ``weights`` -- a pytree {component: nested dicts mirroring the component's module path ->
{"A", "B"}}, e.g. weights["unet"]["down_blocks_0"]["attentions_0"]...["to_q"] -- and ``alphas``
{component: {diffusers module name: alpha}}. ``merge(params, lora, scale)`` is pure: inside a jitted loss
only the LoRA's weights get gradients (``apply_with``); outside, it fuses a LoRA into a copy for inference.

Files: ``save`` writes one .safetensors in the layout diffusers' ``StableDiffusionPipeline.save_lora_weights``
writes from peft's state dict (``unet.<module>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), the
text encoder under ``text_encoder.``; ``lora_adapter_metadata`` holding ``unet.r``, ``unet.lora_alpha``,
``unet.target_modules``), which diffusers' ``load_lora_weights`` reads. ``load`` reads that layout (jaxdiff's
or diffusers'/peft's, with or without the component prefix, alpha and rank patterns, rsLoRA) and diffusers'
older ``lora.down`` / ``lora.up`` keys with ``.alpha`` tensors. It also reads the kohya / A1111 layout
(``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, ``lora_te_<module>...``; see
``_load_kohya``), with the U-Net's modules named as diffusers names them or as the original LDM U-Net does
(``lora_unet_input_blocks_1_1_...``, SDXL's files among them), and SDXL's two text encoders as ``lora_te1_`` /
``lora_te2_`` (diffusers' layout: ``text_encoder.`` / ``text_encoder_2.``). DoRA and LyCORIS' other adapters (LoHa,
LoKr) are refused with one clear line.

    lora = lora.init(sd.params, rank=4, alpha=4, key=jax.random.key(0))        # U-Net attention projections
    loss = lambda base: sd_train.sd_loss(lora.apply_with(sd_train.unet_apply(sd.unet), base, lora), sd.schedule,
                                         sd.prediction, empty_context=...)
    result = trainer.fit(None, loss, batches, config, params=lora.weights, frozen=sd.params["unet"])
    lora.save("my_lora.safetensors", lora.replace(result.state.ema_params))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pretrained.keys import module_path, torch_key

# peft's target_modules as diffusers' SD LoRA scripts set them
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# component (the key in a pipeline's params) -> its prefix in diffusers' LoRA files
PREFIXES = {"unet": "unet", "text": "text_encoder", "text_2": "text_encoder_2"}
METADATA_KEY = "lora_adapter_metadata"


class LoRAFileError(ValueError):
    """A LoRA file that cannot be read, or whose adapters do not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapters: ``weights`` {component: nested {..., module: {"A": (in, r) or (kh, kw, in, r), "B": (r, out)}}}
    (a pytree, the part that trains) and ``alphas`` {component: {diffusers module name: alpha}}."""

    weights: dict
    alphas: dict

    def replace(self, weights) -> LoRA:
        """The same adapters with other weights (e.g. the trained or EMA ones from ``trainer.fit``)."""
        return LoRA(weights, self.alphas)

    def modules(self) -> dict:
        """{component: {diffusers module name: (A, B)}}."""
        out = {}
        for comp, tree in self.weights.items():
            out[comp] = {_module_name(path): (leaf["A"], leaf["B"]) for path, leaf in _adapters(tree)}
        return out


def _adapters(tree, prefix=()):
    """(module path, {"A", "B"}) for every adapter in a nested weights dict."""
    if isinstance(tree, dict) and set(tree) == {"A", "B"}:
        yield prefix, tree
        return
    for k in sorted(tree):
        yield from _adapters(tree[k], prefix + (k,))


def _module_name(path: tuple) -> str:
    return torch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target_modules entry: the module's full name, or its name after a dot."""
    return name == target or name.endswith("." + target)


def find_targets(component_params, targets) -> list[str]:
    """Diffusers module names of the Dense layers in ``component_params`` (``{"params": ...}``) that ``targets``
    name (peft's matching: a whole name or a dotted suffix)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(component_params["params"])[0]:
        names = tuple(k.key for k in path)
        if names[-1] != "kernel" or np.ndim(leaf) != 2:
            continue
        name = _module_name(names[:-1])
        if any(_matches(name, t) for t in targets):
            found.append(name)
    return sorted(found)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _kernel(params, comp, name, dense_only: bool = True):
    try:
        kernel = _get(params[comp]["params"], module_path(name + ".weight"))["kernel"]
    except (KeyError, TypeError):
        kernel = None
    if kernel is None or np.ndim(kernel) not in ((2,) if dense_only else (2, 4)):
        layers = "Dense layer" if dense_only else "Dense or Conv layer"
        raise LoRAFileError(f"the LoRA adapts {PREFIXES.get(comp, comp)}.{name}, which this model has no {layers} "
                            f"for")
    return kernel


def _adapter(down, up, kernel_shape, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in jaxdiff's layout from torch's down (r, in[, kh, kw]) and up (out, r[, 1, 1]) for a layer whose flax
    kernel has ``kernel_shape``; a 1x1 convolution and a Dense layer take each other's adapters (the same map)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    window, (n_in, n_out) = tuple(kernel_shape[:-2]), kernel_shape[-2:]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim == 4 and not window and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if down.ndim == 2 and window == (1, 1):
        down = down[:, :, None, None]
    if down.ndim != 2 + len(window) or up.ndim != 2 or down.shape[0] != up.shape[1]:
        kind, dims = ((f"a {window[0]}x{window[1]} convolution", "r, in, kh, kw") if window
                      else ("a Dense layer", "r, in"))
        raise LoRAFileError(f"{where}: down {down.shape} and up {up.shape} are not ({dims}) and (out, r) for {kind}")
    if (down.shape[1], up.shape[0]) != (n_in, n_out):
        raise LoRAFileError(f"{where} maps {down.shape[1]} -> {up.shape[0]}; the model's layer maps {n_in} -> {n_out}")
    if tuple(down.shape[2:]) != window:
        raise LoRAFileError(f"{where}: a {down.shape[2]}x{down.shape[3]} down kernel for the model's "
                            f"{window[0]}x{window[1]} convolution")
    return np.transpose(down, tuple(range(2, down.ndim)) + (1, 0)), np.ascontiguousarray(up.T)


def init(params, *, rank: int, alpha: float | None = None, key, targets=UNET_TARGETS, component: str = "unet") -> LoRA:
    """A fresh LoRA of rank ``rank`` on the Dense layers of ``params[component]`` that ``targets`` name: A drawn
    as peft draws it (uniform in +-1/sqrt(in)), B zero. ``alpha`` defaults to ``rank`` (scale 1, as diffusers'
    LoRA training scripts set it)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if component not in params:
        raise ValueError(f"component {component!r} is not in the parameters (they hold {sorted(params)})")
    names = find_targets(params[component], targets)
    if not names:
        raise ValueError(f"no Dense layer of {component!r} matches targets {tuple(targets)}")
    tree: dict = {}
    for i, name in enumerate(names):
        w = _kernel(params, component, name)
        bound = 1.0 / math.sqrt(w.shape[0])
        a = jax.random.uniform(jax.random.fold_in(key, i), (w.shape[0], rank), jnp.float32, -bound, bound)
        node = tree
        for p in module_path(name + ".weight"):
            node = node.setdefault(p, {})
        node.update(A=a, B=jnp.zeros((rank, w.shape[1]), jnp.float32))
    return LoRA({component: tree}, {component: {n: alpha for n in names}})


def merge(params, lora: LoRA, scale=1.0):
    """``params`` (a dict of components, each ``{"params": ...}``) with every adapter folded in:
    W + scale * (alpha / r) * A @ B, in the kernel's dtype. Pure; the input is not changed."""
    out = dict(params)
    for comp, tree in lora.weights.items():
        if comp not in params:
            raise LoRAFileError(f"the LoRA adapts {comp!r}, which the parameters lack (they hold {sorted(params)})")
        inner = params[comp]["params"]
        for path, leaf in _adapters(tree):
            a, b = leaf["A"], leaf["B"]
            name = _module_name(path)
            factor = lora.alphas[comp][name] / a.shape[-1]
            w = _get(inner, path)["kernel"]
            if w.shape != (*a.shape[:-1], b.shape[1]):
                raise LoRAFileError(f"the LoRA for {PREFIXES.get(comp, comp)}.{name} is {(*a.shape[:-1], b.shape[1])}; "
                                    f"the layer's kernel is {tuple(w.shape)}")
            # a convolution's A (kh, kw, in, r) @ B (r, out) is its merged (kh, kw, in, out) kernel
            delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * (scale * factor)
            inner = _set(inner, path + ("kernel",), (w.astype(jnp.float32) + delta).astype(w.dtype))
        out[comp] = {**params[comp], "params": inner}
    return out


def _set(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def apply_with(apply_fn, base_params, lora: LoRA, component: str = "unet", scale: float = 1.0):
    """``apply(weights, *args)``: ``apply_fn(merge(base, lora with these weights), *args)`` for component
    ``component``: a LoRA's loss differentiates only ``weights`` (``lora.weights`` is the starting point).

    ``base_params`` are closed over: called inside a traced function with traced base parameters, they are
    data; closed over concrete arrays, a jitted step would hold them as constants of its program. So train
    with ``trainer.fit(..., frozen=base)`` and a loss built from the frozen parameters it is handed::

        loss = lambda base: sd_train.sd_loss(lora.apply_with(apply, base, adapters), ...)
        trainer.fit(None, loss, batches, config, params=adapters.weights, frozen=sd.params["unet"])"""
    def apply(weights, *args):
        merged = merge({component: base_params}, lora.replace(weights), scale)
        return apply_fn(merged[component], *args)

    return apply


# files ------------------------------------------------------------------------------------------------------


def _target_of(name: str) -> str:
    """peft's target_modules entry for a module name: its last part (two when the last is a list index)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def save(path, lora: LoRA) -> None:
    """One .safetensors in diffusers' LoRA layout (see the module docstring) that diffusers' load_lora_weights
    reads: peft's keys with the component prefix, float32, and rank and alpha in the metadata (a
    rank_pattern / alpha_pattern where modules differ)."""
    from safetensors.numpy import save_file

    tensors, meta = {}, {}
    for comp, mods in lora.modules().items():
        prefix = PREFIXES.get(comp)
        if prefix is None:
            raise ValueError(f"cannot save a LoRA of component {comp!r}; diffusers' layout has {sorted(PREFIXES)}")
        ranks, alphas = {}, {}
        for name, (a, b) in mods.items():
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            conv = a.ndim == 4  # torch's conv layout: lora_A (r, in, kh, kw), lora_B (out, r, 1, 1)
            tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1)) if conv
                                                                             else a.T)
            tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None] if conv else b.T)
            ranks[name], alphas[name] = int(a.shape[-1]), float(lora.alphas[comp][name])
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        meta[f"{prefix}.r"] = r
        meta[f"{prefix}.lora_alpha"] = int(alpha) if alpha == int(alpha) else alpha
        meta[f"{prefix}.target_modules"] = sorted({_target_of(n) for n in mods})
        # peft matches a pattern against a module's name whole or after a dot: full names pick one module
        rank_pattern = {re.escape(n): v for n, v in ranks.items() if v != r}
        alpha_pattern = {re.escape(n): v for n, v in alphas.items() if v != alpha}
        if rank_pattern:
            meta[f"{prefix}.rank_pattern"] = rank_pattern
        if alpha_pattern:
            meta[f"{prefix}.alpha_pattern"] = alpha_pattern
    save_file(tensors, os.fspath(path), metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})


_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_OLD = re.compile(r"^(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")


def _pattern_value(patterns: dict, name: str):
    """peft's rule: a pattern applies to a module whose name it matches whole or after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def load(path, params, *, strict: bool = True) -> LoRA:
    """A LoRA file (see the module docstring) checked against ``params`` (a dict of components: "unet", "text"):
    every adapter must name a Dense or Conv layer of the model with fitting shapes; anything else is one
    ``LoRAFileError`` naming the file and the keys. ``strict=False`` skips keys that map to no layer of the model
    instead, and lists them in a warning."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoRAFileError(f"{path}: no such LoRA file (expected a .safetensors)")
    try:
        with safe_open(path, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LoRAFileError(f"{path}: not a readable .safetensors file ({e})") from None
    if any(k.startswith(KOHYA_PREFIXES) for k in tensors):
        lora, skipped = _load_kohya(path, tensors, params, strict)
    else:
        lora, skipped = _load_peft(path, tensors, metadata, params, strict)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} keys that map to no layer of the model (strict=False): "
                      f"{', '.join(sorted(skipped))}", stacklevel=2)
    return lora


def _unmapped(path, keys: list, strict: bool, what: str) -> list:
    if keys and strict:
        raise LoRAFileError(f"{path}: {len(keys)} keys {what}: {', '.join(sorted(keys)[:5])}"
                            f"{' ...' if len(keys) > 5 else ''} (strict=False skips them)")
    return keys


def _add(weights: dict, alphas: dict, comp: str, flax_module: tuple, a, b, alpha: float) -> None:
    node = weights.setdefault(comp, {})
    for q in flax_module:
        node = node.setdefault(q, {})
    node.update(A=jnp.asarray(a), B=jnp.asarray(b))
    alphas.setdefault(comp, {})[_module_name(flax_module)] = float(alpha)


def _load_peft(path, tensors: dict, metadata: dict, params, strict: bool) -> tuple[LoRA, list]:
    try:
        meta = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        raise LoRAFileError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None
    by_prefix = {v: k for k, v in PREFIXES.items()}
    prefixed = any(k.split(".", 1)[0] in by_prefix for k in tensors)
    parts: dict = {}  # (component, module) -> {"A": (r, in) torch layout, "B": ..., "alpha": ...}
    unknown = []
    for key, value in tensors.items():
        head, rest = key.split(".", 1) if "." in key else ("", key)
        if prefixed:
            if head not in by_prefix:
                unknown.append(key)
                continue
            comp = by_prefix[head]
        else:  # a peft adapter saved from the U-Net alone (save_lora_adapter): no prefix
            comp, rest = "unet", key
        if m := _PEFT.match(rest):
            parts.setdefault((comp, m["module"]), {})[m["part"]] = value
        elif m := _OLD.match(rest):
            parts.setdefault((comp, m["module"]), {})["A" if m["part"] == "down" else "B"] = value
        elif m := _ALPHA.match(rest):
            parts.setdefault((comp, m["module"]), {})["alpha"] = float(np.asarray(value).reshape(()))
        else:
            unknown.append(key)
    skipped = _unmapped(path, unknown, strict, "are not LoRA weights in diffusers' layout")
    if not parts:
        raise LoRAFileError(f"{path}: holds no LoRA weights")
    weights: dict = {}
    alphas: dict = {}
    for (comp, name), p in sorted(parts.items()):
        prefix = PREFIXES[comp]
        if "A" not in p or "B" not in p:
            raise LoRAFileError(f"{path}: {prefix}.{name} has {'lora_A' if 'A' in p else 'lora_B'} without its pair")
        if meta.get(f"{prefix}.use_dora"):
            raise LoRAFileError(f"{path}: a DoRA adapter (use_dora); jaxdiff reads plain LoRA")
        if comp not in params:
            raise LoRAFileError(f"{path}: adapts {prefix}, which the model's parameters lack")
        module = name
        if comp in ("text", "text_2"):  # diffusers writes transformers 5's CLIPTextModel without its text_model level
            try:
                _kernel(params, comp, name, dense_only=False)
            except LoRAFileError:
                module = f"text_model.{name}"
        try:
            w = _kernel(params, comp, module, dense_only=False)
        except LoRAFileError:
            if strict:
                raise LoRAFileError(f"the LoRA adapts {prefix}.{name}, which this model has no Dense or Conv layer "
                                    f"for") from None
            skipped += [f"{prefix}.{name}.{part}" for part in sorted(p)]
            continue
        a, b = _adapter(p["A"], p["B"], w.shape, f"{path}: {prefix}.{name}")
        rank = a.shape[-1]
        alpha = _pattern_value(meta.get(f"{prefix}.alpha_pattern") or {}, name)
        if alpha is None:
            alpha = meta.get(f"{prefix}.lora_alpha", p.get("alpha", rank))
        alpha = float(alpha)
        if meta.get(f"{prefix}.use_rslora"):  # scale alpha / sqrt(r): the same as alpha * sqrt(r) over r
            alpha *= math.sqrt(rank)
        _add(weights, alphas, comp, module_path(module + ".weight"), a, b, alpha)
    if not weights:
        raise LoRAFileError(f"{path}: none of its adapters fits a layer of the model")
    return LoRA(weights, alphas), skipped


# kohya / A1111 ---------------------------------------------------------------------------------------------

# the component each prefix adapts: SDXL's files name its two text encoders lora_te1_ (CLIP ViT-L) and lora_te2_
# (OpenCLIP bigG)
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text", "lora_te1": "text", "lora_te2": "text_2"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA = re.compile(r"^(?P<prefix>lora_unet|lora_te[12]?)_(?P<module>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight"
                    r"|alpha)$")
# the original LDM U-Net's module names, which some trainers (and A1111's own converter) write instead of diffusers'
_LDM_UNET = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_2")
_LDM_IO = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_LDM_MID = re.compile(r"^middle_block_(\d+)_(.+)$")
_LDM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_LDM_DIRECT = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
               "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
               "label_emb_0_2": "add_embedding_linear_2"}
# parts of LyCORIS' other adapters and of DoRA, named in the refusal
_NOT_LORA = re.compile(r"\.(hada_|lokr_|dora_scale|lora_mid|diff|on_input|weight_decompose)")


def _kohya_names(component_params) -> dict:
    """{kohya's module name: flax module path} for every layer with a kernel; kohya's name is the diffusers module
    name with dots as underscores, which is the flax path joined with "_" (flax already joins list indices so).
    A name two modules would share maps to None: it is refused, never guessed."""
    index: dict = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(component_params["params"])[0]:
        names = tuple(k.key for k in path)
        if names[-1] != "kernel":
            continue
        name = "_".join(names[:-1])
        index[name] = names[:-1] if index.get(name, names[:-1]) == names[:-1] else None
    return index


def _ldm_name(name: str, index: dict) -> str:
    """diffusers' module name (underscored) for a module of the original LDM U-Net, read off the model: its
    levels hold ``layers`` resnets (down) or ``layers + 1`` (up), counted in ``index``. LDM numbers the input
    blocks 1.. through each level's (resnet, attention) pairs and then its downsampler, and the output blocks
    through each level's (resnet, attention[, upsampler]) triples; the middle block is resnet, attention, resnet.
    SDXL's layout reads the same: a level without attention (its first) holds no ``_1`` attention, and a deeper
    transformer only adds ``transformer_blocks_<n>`` inside the attention's name.
    Anything that does not parse comes back unchanged, to be reported as naming no module."""
    if name in _LDM_DIRECT:
        return _LDM_DIRECT[name]
    if m := _LDM_MID.match(name):
        i, rest = int(m[1]), m[2]
        return {0: f"mid_block_resnets_0_{_LDM_RESNET.get(rest, rest)}", 1: f"mid_block_attentions_0_{rest}",
                2: f"mid_block_resnets_1_{_LDM_RESNET.get(rest, rest)}"}.get(i, name)
    if (m := _LDM_IO.match(name)) is None:
        return name
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
    layers = len({k.split("_")[4] for k in index if k.startswith("down_blocks_0_resnets_")})
    if kind == "input_blocks":
        level, k = divmod(i - 1, layers + 1)
        if i >= 1 and k == layers and j == 0 and rest == "op":
            return f"down_blocks_{level}_downsamplers_0_conv"
        if i >= 1 and k < layers and j in (0, 1):
            return (f"down_blocks_{level}_resnets_{k}_{_LDM_RESNET.get(rest, rest)}" if j == 0
                    else f"down_blocks_{level}_attentions_{k}_{rest}")
        return name
    level, k = divmod(i, layers + 1)
    if j == 0:
        return f"up_blocks_{level}_resnets_{k}_{_LDM_RESNET.get(rest, rest)}"
    if j == 1 and any(key.startswith(f"up_blocks_{level}_attentions_") for key in index):
        return f"up_blocks_{level}_attentions_{k}_{rest}"
    if j in (1, 2):  # a level without attention holds its upsampler second, one with attention third
        return f"up_blocks_{level}_upsamplers_0_{rest}"
    return name


def _load_kohya(path, tensors: dict, params, strict: bool) -> tuple[LoRA, list]:
    """kohya's layout (sd-scripts' networks/lora.py, and A1111's reader): ``lora_unet_<module>`` for the U-Net and
    ``lora_te_<module>`` for the text encoder (SDXL: ``lora_te1_`` and ``lora_te2_`` for its two), each with
    ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and optionally ``.alpha``
    (default r); delta W = (alpha / r) up @ down.
    Module names are diffusers' with dots as underscores, matched against the model's own module paths; U-Net
    names in the original LDM layout are first renamed to diffusers' (``_ldm_name``)."""
    if "text_2" not in params and (sdxl := sorted(k for k in tensors if k.startswith(("lora_te1_", "lora_te2_")))):
        raise LoRAFileError(f"{path}: an SDXL LoRA ({sdxl[0]}: lora_te1_ / lora_te2_ name SDXL's two text encoders) "
                            f"for a model without SDXL's second text encoder")
    parts: dict = {}
    unknown = []
    for key, value in tensors.items():
        if m := _KOHYA.match(key):
            parts.setdefault((m["prefix"], m["module"]), {})[m["part"]] = value
        else:
            unknown.append(key)
    if other := sorted(k for k in unknown if _NOT_LORA.search(k)):
        raise LoRAFileError(f"{path}: {other[0]} is part of an adapter other than plain LoRA / LoCon (LyCORIS' LoHa, "
                            f"LoKr or Tucker, DoRA); jaxdiff reads lora_down / lora_up / alpha")
    skipped = _unmapped(path, unknown, strict, "are not kohya LoRA weights (lora_down / lora_up / alpha)")
    indexes: dict = {}
    weights: dict = {}
    alphas: dict = {}
    unmapped = []
    seen: dict = {}
    for (prefix, name), p in sorted(parts.items()):
        key = f"{prefix}_{name}"
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            have = "lora_down" if "lora_down.weight" in p else "lora_up" if "lora_up.weight" in p else "alpha"
            raise LoRAFileError(f"{path}: {key} has {have} without {'lora_up' if have == 'lora_down' else 'lora_down'}")
        comp = KOHYA_COMPONENTS[prefix]
        if comp not in params:
            raise LoRAFileError(f"{path}: {key} adapts the {comp} component, which the model's parameters lack")
        index = indexes.setdefault(comp, _kohya_names(params[comp]))
        if comp == "unet" and name.startswith(_LDM_UNET):
            name = _ldm_name(name, index)
        if comp in ("text", "text_2") and name not in index:  # written from transformers 5's CLIP: no text_model level
            name = f"text_model_{name}" if f"text_model_{name}" in index else name
        if name not in index:
            unmapped += [f"{key}.{part}" for part in sorted(p)]
            continue
        if index[name] is None:
            raise LoRAFileError(f"{path}: {key} could name more than one module of the model")
        module = index[name]
        if (comp, module) in seen:
            raise LoRAFileError(f"{path}: {seen[comp, module]} and {key} adapt the same module")
        seen[comp, module] = key
        kernel = _get(params[comp]["params"], module)["kernel"]
        a, b = _adapter(p["lora_down.weight"], p["lora_up.weight"], kernel.shape, f"{path}: {key}")
        alpha = a.shape[-1]
        if "alpha" in p:
            value = np.asarray(p["alpha"], np.float64)
            if value.size != 1 or not np.isfinite(value).all():
                raise LoRAFileError(f"{path}: {key}.alpha must be one finite number, got {value.tolist()}")
            alpha = float(value.reshape(()))
        _add(weights, alphas, comp, module, a, b, alpha)
    skipped += _unmapped(path, unmapped, strict, "name no layer of the model")
    if not weights:
        raise LoRAFileError(f"{path}: none of its keys adapts a layer of the model")
    return LoRA(weights, alphas), skipped
