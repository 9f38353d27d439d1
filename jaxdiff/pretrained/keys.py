"""The naming rule between diffusers/transformers state-dict keys and flax parameter paths.

Flax module trees mirror the PyTorch module structure, so one rule maps keys both ways:

- split the key on "."; a purely numeric part (a ``ModuleList`` index) is joined to the part
  before it with "_": ``down_blocks.1.attentions.0.to_out.0.weight`` ->
  ``("down_blocks_1", "attentions_0", "to_out_0", <leaf>)``;
- the leaf: ``bias`` -> ``bias``; ``weight`` -> ``kernel`` (Conv: torch (O, I, kh, kw) -> flax
  (kh, kw, I, O); Dense: torch (out, in) -> flax (in, out)), ``scale`` (GroupNorm/LayerNorm) or
  ``embedding`` (Embed), whichever the flax template has for that module: the template decides.

The way back is ambiguous in one place: flax's ``linear_1`` may come from torch's ``linear.1``
or from a module that torch itself names ``linear_1`` (diffusers' ``TimestepEmbedding``). A part
in ``TORCH_NAMES_WITH_DIGITS`` keeps its underscore; every other ``name_<digits>`` becomes
``name.<digits>``. Pass ``reference=`` (the keys of a checkpoint) to settle it from real keys.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# torch module names that end in _<digits> and are not list items (diffusers' TimestepEmbedding)
TORCH_NAMES_WITH_DIGITS = frozenset({"linear_1", "linear_2"})

_INDEXED = re.compile(r"^(.+)_(\d+)$")


def module_path(key: str) -> tuple[str, ...]:
    """The flax module path of a torch key, without its leaf: ``a.0.b.weight`` -> ``("a_0", "b")``."""
    parts = key.split(".")
    if len(parts) < 2 or any(p == "" for p in parts):
        raise ValueError(f"key must look like 'module.leaf' with non-empty parts, got {key!r}")
    if parts[0].isdigit():
        raise ValueError(f"key must not start with a numeric part, got {key!r}")
    out: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flax_path(key: str, template: Collection[tuple[str, ...]] | Mapping | None = None) -> tuple[str, ...]:
    """The flax parameter path of a torch key.

    ``weight`` becomes whichever of kernel/scale/embedding ``template`` holds for the module
    (``template``: a collection of flax paths, e.g. the keys of a flattened params dict, or a
    nested params dict); without a template, or when it holds none of them, it becomes
    ``kernel``. ``bias`` stays ``bias``; any other leaf name (a buffer such as ``position_ids``)
    is kept as it is, and will find no flax parameter.
    """
    leaf = key.rsplit(".", 1)[-1]
    if leaf.isdigit():
        raise ValueError(f"key must end in a leaf name such as 'weight' or 'bias', got {key!r}")
    module = module_path(key)
    if leaf != "weight":
        return module + (leaf,)
    if template is not None:
        for name in WEIGHT_LEAVES:
            if _has_path(template, module + (name,)):
                return module + (name,)
    return module + ("kernel",)


def torch_key(path: tuple[str, ...] | list[str], reference: Collection[str] | None = None) -> str:
    """The torch state-dict key of a flax parameter path (the inverse of ``flax_path``).

    ``kernel``, ``scale`` and ``embedding`` become ``weight``. A part ``name_<digits>`` becomes
    ``name.<digits>`` unless it is in ``TORCH_NAMES_WITH_DIGITS``; with ``reference`` (torch keys
    that exist, e.g. a checkpoint's), the spelling found there wins.
    """
    path = tuple(path)
    if len(path) < 2 or not all(isinstance(p, str) and p for p in path):
        raise ValueError(f"path must hold at least a module and a leaf name, as non-empty strings, got {path!r}")
    leaf = "weight" if path[-1] in WEIGHT_LEAVES else path[-1]
    if reference is not None:
        matches = [k for k in _spellings(path[:-1], leaf) if k in reference]
        if len(matches) == 1:
            return matches[0]
    parts = []
    for part in path[:-1]:
        m = _INDEXED.match(part)
        parts.append(part if m is None or part in TORCH_NAMES_WITH_DIGITS else f"{m.group(1)}.{m.group(2)}")
    return ".".join(parts + [leaf])


def to_flax(path: tuple[str, ...], array: np.ndarray, template_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A torch tensor in the layout of the flax leaf at ``path``.

    ``kernel``: a conv weight (O, I, *window) becomes (*window, I, O); a linear weight (out, in)
    becomes (in, out). Where the template is a Dense kernel (rank 2) and the tensor a 1x1 conv
    (O, I, 1, 1), or the other way round, the 1x1 window is dropped or added: the same linear
    map (old autoencoder checkpoints store attention projections as 1x1 convs).
    ``scale``, ``embedding``, ``bias`` and anything else: unchanged.
    """
    array = np.asarray(array)
    if path[-1] != "kernel" or array.ndim < 2:
        return array
    want = None if template_shape is None else len(template_shape)
    if array.ndim > 2 and want == 2 and all(s == 1 for s in array.shape[2:]):
        array = array.reshape(array.shape[:2])
    elif array.ndim == 2 and want is not None and want > 2 and all(s == 1 for s in template_shape[:-2]):
        array = array.reshape(array.shape + (1,) * (want - 2))
    if array.ndim == 2:
        return array.T
    return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))


def to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """A flax leaf in torch's layout: the inverse of ``to_flax`` (kernels transposed back)."""
    array = np.asarray(array)
    if path[-1] != "kernel" or array.ndim < 2:
        return array
    if array.ndim == 2:
        return array.T
    n = array.ndim
    return np.transpose(array, (n - 1, n - 2) + tuple(range(n - 2)))


def _spellings(module: tuple[str, ...], leaf: str) -> list[str]:
    """Every torch key whose flax module path is ``module``: each ``name_<digits>`` either way."""
    keys = [[]]
    for part in module:
        m = _INDEXED.match(part)
        options = [part] if m is None else [part, f"{m.group(1)}.{m.group(2)}"]
        keys = [k + [o] for k in keys for o in options]
    return [".".join(k + [leaf]) for k in keys]


def _has_path(template, path: tuple[str, ...]) -> bool:
    if isinstance(template, Mapping) and not (template and isinstance(next(iter(template)), tuple)):
        node = template
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                return False
            node = node[part]
        return True
    return path in template
