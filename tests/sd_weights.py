"""A minimal reader of diffusers / transformers safetensors into flax parameter trees, for the network
parity tests only (the checked loader is jaxdiff/pretrained/weights.py). It applies the contract's rule:
split the key on ".", join a numeric part to the part before it with "_"; the leaf "weight" becomes the
template's kernel (Conv (O, I, kh, kw) -> (kh, kw, I, O), Dense (out, in) -> (in, out)), scale or embedding.
"""

from __future__ import annotations

import json
import struct

import jax
import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """safetensors.numpy.load_file where the package is installed; otherwise the format read directly:
    an 8-byte little-endian header length, a JSON header of name -> dtype, shape, byte offsets, the bytes."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        with open(path, "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header, body = json.loads(data[8:8 + n]), memoryview(data)[8 + n:]
        tensors = {}
        for k, v in header.items():
            if k != "__metadata__":
                start, end = v["data_offsets"]
                tensors[k] = np.frombuffer(body[start:end], DTYPES[v["dtype"]]).reshape(v["shape"])
        return tensors
    return load_file(path)


def flax_path(key: str) -> tuple[str, ...]:
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit():
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def to_flax(state: dict[str, np.ndarray], template) -> dict:
    """``state`` (a torch state dict as numpy) -> a tree shaped like ``template`` (e.g. jax.eval_shape of init).
    Every template leaf must be filled and every tensor used, with equal shapes. transformers 5 writes CLIP
    text keys without the "text_model." that transformers 4 (the hub's SD checkpoints) put first."""
    tree = template["params"] if "params" in template else template
    out: dict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer transformers may write, not a parameter
            continue
        if set(tree) == {"text_model"} and not key.startswith("text_model."):
            key = "text_model." + key
        *path, leaf = flax_path(key)
        node = tree
        for p in path:
            node = node[p]
        if leaf == "weight":
            leaf = next(k for k in ("kernel", "scale", "embedding") if k in node)
            if leaf == "kernel":
                value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        want = node[leaf].shape
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{key}: shape {value.shape}, the network wants {want}")
        target = out
        for p in path:
            target = target.setdefault(p, {})
        target[leaf] = np.ascontiguousarray(value)
    missing = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]} - \
        {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]}
    if missing:
        raise ValueError(f"no tensor for {sorted(missing)}")
    return {"params": out}
