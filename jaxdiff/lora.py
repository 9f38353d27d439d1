"""LoRA: low-rank adapters on a network's linear projections, as data beside the base parameters.

For a Dense layer with kernel W (in, out) an adapter holds A (in, r) and B (r, out) and the layer computes
with W + scale * (alpha / r) * A @ B: peft's LoRA (its lora_A.weight is A transposed, lora_B.weight is B
transposed; delta W = (alpha / r) B A in torch's (out, in) layout). ``init`` draws A as peft does
(uniform in +-1/sqrt(in), torch's Linear default) and sets B to zero, so a fresh LoRA changes nothing.

A ``LoRA`` is ``weights`` -- a pytree {component: nested dicts mirroring the component's module path ->
{"A", "B"}}, e.g. weights["unet"]["down_blocks_0"]["attentions_0"]...["to_q"] -- and ``alphas``
{component: {diffusers module name: alpha}}. ``merge(params, lora, scale)`` is pure: inside a jitted loss
only the LoRA's weights get gradients (``apply_with``); outside, it fuses a LoRA into a copy for inference.

Files: ``save`` writes one .safetensors in the layout diffusers' ``StableDiffusionPipeline.save_lora_weights``
writes from peft's state dict (``unet.<module>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), the
text encoder under ``text_encoder.``; ``lora_adapter_metadata`` holding ``unet.r``, ``unet.lora_alpha``,
``unet.target_modules``), which diffusers' ``load_lora_weights`` reads. ``load`` reads that layout (jaxdiff's
or diffusers'/peft's, with or without the component prefix, alpha and rank patterns, rsLoRA) and diffusers'
older ``lora.down`` / ``lora.up`` keys with ``.alpha`` tensors. Kohya's ``lora_unet_...`` keys and DoRA are
refused with one clear line.

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

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pretrained.keys import module_path, torch_key

# peft's target_modules as diffusers' SD LoRA scripts set them
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# component (the key in a pipeline's params) -> its prefix in diffusers' LoRA files
PREFIXES = {"unet": "unet", "text": "text_encoder"}
METADATA_KEY = "lora_adapter_metadata"


class LoRAFileError(ValueError):
    """A LoRA file that cannot be read, or whose adapters do not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapters: ``weights`` {component: nested {..., module: {"A": (in, r), "B": (r, out)}}} (a pytree, the
    part that trains) and ``alphas`` {component: {diffusers module name: alpha}}."""

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


def _kernel(params, comp, name):
    try:
        kernel = _get(params[comp]["params"], module_path(name + ".weight"))["kernel"]
    except (KeyError, TypeError):
        kernel = None
    if kernel is None or np.ndim(kernel) != 2:  # a convolution's kernel is 4-D: LoRA on convolutions is not read
        raise LoRAFileError(f"the LoRA adapts {PREFIXES.get(comp, comp)}.{name}, which this model has no Dense "
                            f"layer for")
    return kernel


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
            factor = lora.alphas[comp][name] / a.shape[1]
            w = _get(inner, path)["kernel"]
            if w.shape != (a.shape[0], b.shape[1]):
                raise LoRAFileError(f"the LoRA for {PREFIXES.get(comp, comp)}.{name} is ({a.shape[0]}, {b.shape[1]}); "
                                    f"the layer's kernel is {tuple(w.shape)}")
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
            tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
            tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
            ranks[name], alphas[name] = int(a.shape[1]), float(lora.alphas[comp][name])
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


def load(path, params) -> LoRA:
    """A LoRA file (see the module docstring) checked against ``params`` (a dict of components: "unet", "text"):
    every adapter must name a Dense layer of the model with matching shapes; anything else is one
    ``LoRAFileError`` naming the file and the keys."""
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
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in tensors):
        raise LoRAFileError(f"{path}: kohya-style keys (lora_unet_...) are not read; convert the file to diffusers' "
                            f"layout (diffusers' load_lora_weights + save_lora_weights does)")
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
    if unknown:
        raise LoRAFileError(f"{path}: keys that are not LoRA weights in diffusers' layout: {sorted(unknown)[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}")
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
        a, b = np.asarray(p["A"], np.float32), np.asarray(p["B"], np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFileError(f"{path}: {prefix}.{name}: lora_A {a.shape} and lora_B {b.shape} are not (r, in) "
                                f"and (out, r)")
        rank = a.shape[0]
        alpha = _pattern_value(meta.get(f"{prefix}.alpha_pattern") or {}, name)
        if alpha is None:
            alpha = meta.get(f"{prefix}.lora_alpha", p.get("alpha", rank))
        alpha = float(alpha)
        if meta.get(f"{prefix}.use_rslora"):  # scale alpha / sqrt(r): the same as alpha * sqrt(r) over r
            alpha *= math.sqrt(rank)
        w = _kernel(params, comp, name)
        if tuple(w.shape) != (a.shape[1], b.shape[0]):
            raise LoRAFileError(f"{path}: {prefix}.{name} maps {a.shape[1]} -> {b.shape[0]}; the model's layer maps "
                                f"{w.shape[0]} -> {w.shape[1]}")
        node = weights.setdefault(comp, {})
        for q in module_path(name + ".weight"):
            node = node.setdefault(q, {})
        node.update(A=jnp.asarray(a.T), B=jnp.asarray(b.T))
        alphas.setdefault(comp, {})[name] = alpha
    return LoRA(weights, alphas)
