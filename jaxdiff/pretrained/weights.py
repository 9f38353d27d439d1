"""safetensors checkpoints <-> flax parameter pytrees, every tensor accounted for.

``load_params(template, source)`` reads a diffusers/transformers component folder (``<sd>/unet``,
``<sd>/vae``, ``<sd>/text_encoder``) into the structure of ``template``, which may be a params
pytree or the ``jax.ShapeDtypeStruct`` pytree that ``jax.eval_shape(module.init, ...)`` gives, so
nothing is allocated twice. Keys map by ``jaxdiff.pretrained.keys``. A missing key, an unused key or
a wrong shape is never skipped: all of them are reported together in one ``CheckpointMismatch``.

Known departures from the rule, handled here and nowhere else:

- old autoencoder checkpoints name attention projections ``query``/``key``/``value``/``proj_attn``
  (-> ``to_q``/``to_k``/``to_v``/``to_out.0``), sometimes as (O, I, 1, 1) conv weights;
- transformers' CLIP may carry ``text_model.embeddings.position_ids``, a buffer, not a parameter:
  any ``*.position_ids`` key the template lacks is ignored;
- prefixes: when the keys do not fit as they are, but do once a leading part common to all
  checkpoint keys is dropped (``text_encoder.text_model....``) and/or the leading part common to
  all template paths is added (a ``CLIPTextTransformer`` saved without ``text_model.``), that
  reading is used; the alignment with the fewest problems wins, the plain one on ties, and any
  remaining problems are reported under the alignment chosen. Partial renames are never guessed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import CheckpointError  # one error class for unreadable checkpoints, ours or diffusers'
from jaxdiff.pretrained.keys import flax_path, to_flax, to_torch, torch_key

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' name, then transformers'
# safetensors dtype codes a parameter may be stored in; integer or bool weights are a damaged or quantised file
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MAX_PROBLEM_LINES = 25
# old autoencoder attention names -> the current ones (flax module names)
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


class CheckpointNotFound(CheckpointError):
    """No weights file where one was expected (or a shard the index names is absent)."""


class UnsupportedCheckpointFormat(CheckpointError):
    """Weights that exist only in a format jaxdiff does not read (PyTorch pickles)."""


class DamagedCheckpoint(CheckpointError):
    """A weights file that cannot be read whole (truncated, empty, not safetensors), or whose tensors
    are not floating point or not finite."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint's tensors and the model's parameters differ: every problem, in one error.

    ``missing``: (torch key, flax path, expected shape); ``unused``: (torch key, checkpoint shape,
    flax path tried); ``wrong_shape``: (torch key, checkpoint shape, converted shape, expected shape).
    """

    def __init__(self, message: str, *, missing=(), unused=(), wrong_shape=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unused = list(unused)
        self.wrong_shape = list(wrong_shape)


# ---------------------------------------------------------------------------------------------
# files


def _with_variant(filename: str, variant: str | None) -> str:
    """diffusers' variant naming: the variant goes before the last extension
    (``model.safetensors`` -> ``model.fp16.safetensors``, ``x.safetensors.index.json`` ->
    ``x.safetensors.index.fp16.json``)."""
    if not variant:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_files(source: str | os.PathLike, *, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding one component's weights.

    ``source``: a component folder, a ``.safetensors`` file, or a ``*.safetensors.index.json``.
    In a folder: ``diffusion_pytorch_model[.<variant>].safetensors``, then ``model[...]``, each
    either whole or sharded (``<name>.safetensors.index[.<variant>].json`` and its weight_map).
    """
    source = Path(source)
    if source.is_file():
        if source.name.endswith(".safetensors"):
            return [source]
        if source.name.endswith(".index.json"):
            return _shards(source)
        if source.name.endswith(PICKLE_SUFFIXES):
            raise _pickle_error(source.parent, [source.name])
        raise CheckpointNotFound(f"{source}: not a .safetensors file or a .safetensors.index.json")
    if not source.is_dir():
        raise CheckpointNotFound(f"{source}: no such folder (expected a component folder such as <model>/unet)")
    for base in WEIGHT_NAMES:
        single = source / _with_variant(f"{base}.safetensors", variant)
        index = source / _with_variant(f"{base}.safetensors.index.json", variant)
        if single.is_file():
            return [single]
        if index.is_file():
            return _shards(index)
    present = sorted(p.name for p in source.iterdir() if p.is_file())
    safetensors_files = [n for n in present if n.endswith((".safetensors", ".index.json"))]
    pickles = [n for n in present if n.endswith(PICKLE_SUFFIXES)]
    expected = " or ".join(_with_variant(f"{b}.safetensors", variant) for b in WEIGHT_NAMES)
    if variant and safetensors_files:
        raise CheckpointNotFound(
            f"{source}: no {variant!r} variant ({expected} or a sharded index); found {', '.join(safetensors_files)}: "
            f"pass variant=None to read those"
        )
    if safetensors_files:
        variants = _variants_present(safetensors_files)
        hint = (f"pass variant={variants[0]!r} (--variant {variants[0]}) to read that variant" if variants
                else "pass the file itself to read it")
        raise CheckpointNotFound(
            f"{source}: expected {expected} (or a sharded index), found {', '.join(safetensors_files)}: {hint}"
        )
    if pickles:
        raise _pickle_error(source, pickles)
    raise CheckpointNotFound(
        f"{source}: no weights: expected {expected} (or a sharded index); the folder holds "
        f"{', '.join(present) if present else 'no files'}"
    )


def _variants_present(names: list[str]) -> list[str]:
    """The variants ("fp16", "non_ema", ...) of files named the diffusers way, shards and indexes included."""
    shard = r"(?:-\d{5}-of-\d{5})?"
    found = []
    for n in names:
        for base in WEIGHT_NAMES:
            m = (re.fullmatch(rf"{base}{shard}\.(\w+?){shard}\.safetensors", n)
                 or re.fullmatch(rf"{base}\.safetensors\.index\.(\w+)\.json", n))
            if m:
                found.append(m.group(1))
    return list(dict.fromkeys(found))


def _pickle_error(folder: Path, names: list[str]) -> UnsupportedCheckpointFormat:
    return UnsupportedCheckpointFormat(
        f"{folder}: only PyTorch pickle weights ({', '.join(names)}); jaxdiff reads safetensors only "
        f"(unpickling can run arbitrary code). Convert once where torch and diffusers are installed: "
        f"DiffusionPipeline.from_pretrained('<model folder>').save_pretrained('<new folder>', safe_serialization=True) "
        f"(or the component's own class, e.g. UNet2DConditionModel or CLIPTextModel, the same way)"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointNotFound(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointNotFound(f"{index}: names shards that are not there: {', '.join(absent)}")
    return files


# ---------------------------------------------------------------------------------------------
# reading


class _Checkpoint:
    """Key -> (file, shape, safetensors dtype) over one or more files, tensors read on demand."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors' own error names no file and spans many lines
                raise _damaged(f, e) from None
            self._handles[f] = handle
            keys = handle.keys()  # a safe_open handle is not iterable itself
            for key in keys:
                if key in self.entries:
                    raise CheckpointError(f"{key}: in two shards, {self.entries[key][0].name} and {f.name}")
                s = handle.get_slice(key)
                self.entries[key] = (f, tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))

    def read(self, key: str) -> np.ndarray:
        f, shape, dtype = self.entries[key]
        try:
            return np.asarray(self._handles[f].get_tensor(key))
        except Exception as e:
            # safetensors builds without ml_dtypes cannot hand bfloat16 to NumPy: read the bytes
            if dtype != "BF16":
                raise _damaged(f, e, key) from None
            return _read_raw(f, key, jnp.bfloat16, shape)


def _damaged(path: Path, err: Exception, key: str | None = None) -> DamagedCheckpoint:
    size = path.stat().st_size if path.is_file() else 0
    what = "empty" if size == 0 else "damaged or truncated"
    where = f" (reading {key})" if key else ""
    reason = " ".join(str(err).split()) or type(err).__name__
    return DamagedCheckpoint(
        f"{path}: {what} safetensors file, {size} bytes{where}: {reason}; download or save it again"
    )


def _read_raw(path: Path, key: str, dtype, shape) -> np.ndarray:
    """One tensor straight from the safetensors layout: u64 header size, JSON header, data."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        start, end = header[key]["data_offsets"]
        fh.seek(8 + n + start)
        data = fh.read(end - start)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# matching


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def _common_prefix(seqs: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    seqs = list(seqs)
    if not seqs:
        return ()
    first = seqs[0]
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == first[i] for s in seqs):
        i += 1
    return first[:i]


def _converted_shape(path, shape, template_shape) -> tuple[int, ...]:
    """The shape ``to_flax`` would give, on a zero-stride view: nothing is read or allocated."""
    view = np.broadcast_to(np.zeros((), np.int8), shape)
    return tuple(to_flax(path, view, template_shape).shape)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


class _Plan:
    """One reading of the checkpoint: which key goes to which flax path, and what does not fit."""

    def __init__(self, entries, template_flat, strip: tuple[str, ...], add: tuple[str, ...]):
        self.strip, self.add = strip, add
        self.assign: dict[str, tuple[str, ...]] = {}
        self.ignored: list[str] = []
        self.unused: list[tuple[str, tuple, tuple]] = []
        self.wrong_shape: list[tuple[str, tuple, tuple, tuple]] = []
        claimed: dict[tuple[str, ...], str] = {}
        strip_dotted = ".".join(strip) + "." if strip else ""
        for key, (_, shape, _) in entries.items():
            path = self.path_for(key, strip_dotted, template_flat)
            if path is None or path not in template_flat:
                if key.rsplit(".", 1)[-1] == "position_ids":
                    self.ignored.append(key)
                else:
                    self.unused.append((key, shape, path))
                continue
            if path in claimed:
                self.unused.append((key, shape, path))
                continue
            claimed[path] = key
            want = tuple(np.shape(template_flat[path]))
            got = _converted_shape(path, shape, want)
            if got != want:
                self.wrong_shape.append((key, shape, got, want))
            self.assign[key] = path
        self.missing = [
            (self.torch_key(p, strip_dotted), p, tuple(np.shape(v)))
            for p, v in template_flat.items()
            if p not in claimed
        ]
        self.num_problems = len(self.missing) + len(self.unused) + len(self.wrong_shape)

    def path_for(self, key: str, strip_dotted: str, template_flat) -> tuple[str, ...] | None:
        if not key.startswith(strip_dotted):
            return None
        try:
            path = self.add + flax_path(key[len(strip_dotted) :], _Prefixed(template_flat, self.add))
        except ValueError:
            return None
        if path not in template_flat and len(path) > 1 and path[-2] in OLD_ATTENTION_NAMES:
            renamed = path[:-2] + (OLD_ATTENTION_NAMES[path[-2]], path[-1])
            if renamed in template_flat:
                return renamed
        return path

    def torch_key(self, path, strip_dotted) -> str:
        if self.add and path[: len(self.add)] == self.add:
            path = path[len(self.add) :]
        return strip_dotted + torch_key(path)

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"checkpoint prefix {'.'.join(self.strip) + '.'!r} dropped")
        if self.add:
            parts.append(f"model prefix {'.'.join(self.add) + '.'!r} added to every key")
        return ", ".join(parts)


class _Prefixed:
    """The template's paths as ``flax_path`` sees them once ``add`` is put in front."""

    def __init__(self, template_flat, add: tuple[str, ...]):
        self.template_flat, self.add = template_flat, add

    def __contains__(self, path) -> bool:
        return self.add + tuple(path) in self.template_flat


def _plan(entries, template_flat) -> _Plan:
    plain = _Plan(entries, template_flat, (), ())
    if plain.num_problems == 0 or not entries:
        return plain
    keys = [k for k in entries if k.rsplit(".", 1)[-1] != "position_ids"] or list(entries)
    ck = _common_prefix(tuple(k.split(".")[:-1]) for k in keys)
    tp = _common_prefix(p[:-1] for p in template_flat)
    best = plain
    for i in range(len(ck) + 1):
        for j in range(len(tp) + 1):
            if i == j == 0 or (i and ck[i - 1].isdigit()):
                continue
            candidate = _Plan(entries, template_flat, ck[:i], tp[:j])
            if candidate.num_problems < best.num_problems:
                best = candidate
    return best


def _mismatch_error(name: str, files: list[Path], plan: _Plan) -> CheckpointMismatch:
    where = str(files[0]) if len(files) == 1 else f"{len(files)} shards in {files[0].parent}"
    counts = [
        f"{len(plan.missing)} missing" if plan.missing else "",
        f"{len(plan.unused)} unused" if plan.unused else "",
        f"{len(plan.wrong_shape)} wrong shape" if plan.wrong_shape else "",
    ]
    head = f"{name}: the checkpoint {where} does not fit the model ({', '.join(c for c in counts if c)})"
    if plan.describe():
        head += f" (read with {plan.describe()})"
    if not plan.assign:
        head += "; no key matched at all: is this the component the model was built for?"
    lines = []
    for key, shape, got, want in plan.wrong_shape:
        lines.append(f"{name}: {key}: checkpoint {_fmt(shape)} -> flax {_fmt(got)}, the model expects {_fmt(want)}")
    for key, path, want in plan.missing:
        lines.append(f"{name}: {key}: missing from the checkpoint (flax {'/'.join(path)} {_fmt(want)})")
    for key, shape, path in plan.unused:
        target = f"no flax parameter {'/'.join(path)}" if path else "no flax path"
        lines.append(f"{name}: {key}: checkpoint {_fmt(shape)} is not used ({target})")
    shown = lines[:MAX_PROBLEM_LINES]
    if len(lines) > len(shown):
        shown.append(f"... and {len(lines) - len(shown)} more")
    return CheckpointMismatch(
        "\n".join([head] + ["  " + s for s in shown]),
        missing=plan.missing,
        unused=plan.unused,
        wrong_shape=plan.wrong_shape,
    )


# ---------------------------------------------------------------------------------------------
# public


def load_params(
    template: Mapping,
    source: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype=None,
    name: str | None = None,
) -> dict:
    """Read a component's safetensors weights into the structure of ``template``.

    ``template``: the model's params (or ``{"params": ...}``) as arrays or ``jax.ShapeDtypeStruct``s;
    only names and shapes are used. ``source``: a component folder (``<sd>/unet``), a
    ``.safetensors`` file or a sharded index (see ``weight_files``). ``variant``: e.g. "fp16" for
    ``diffusion_pytorch_model.fp16.safetensors``. ``dtype``: cast floating tensors to it; by default
    they stay as stored (float32, float16 or bfloat16). ``name``: how errors call the component
    (default: the folder's name).

    Returns a nested dict of ``jax.Array``s shaped like ``template``. Raises ``CheckpointMismatch``
    listing every missing key, unused key and wrong shape; ``CheckpointNotFound`` or
    ``UnsupportedCheckpointFormat`` when no safetensors weights are there; ``DamagedCheckpoint`` for a
    truncated or empty file, a tensor stored as integers or bools, or one holding NaN or inf.
    """
    if not isinstance(template, Mapping):
        raise TypeError(f"template must be a nested mapping of parameters, got {type(template).__name__}")
    wrapped = set(template) == {"params"} and isinstance(template["params"], Mapping)
    inner = template["params"] if wrapped else template
    template_flat = _flatten(inner)
    if not template_flat:
        raise ValueError("template holds no parameters")
    files = weight_files(source, variant=variant)
    if name is None:
        src = Path(source)
        name = (src if src.is_dir() else src.parent).name or str(src)
    checkpoint = _Checkpoint(files)
    plan = _plan(checkpoint.entries, template_flat)
    if plan.num_problems:
        raise _mismatch_error(name, files, plan)
    _check_float(name, checkpoint, plan)
    out, non_finite = {}, []  # one NaN or inf in a weight turns every image black: name it at load
    for key, path in plan.assign.items():
        raw = checkpoint.read(key)
        if not _finite(raw):
            non_finite.append(key)
            continue
        array = to_flax(path, raw, tuple(np.shape(template_flat[path])))
        if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(dtype)
        out[path] = jnp.asarray(array)
    if non_finite:
        raise _non_finite_error(name, checkpoint, non_finite)
    params = _unflatten(out)
    return {"params": params} if wrapped else params


def key_names(template: Mapping, source: str | os.PathLike, *, variant: str | None = None) -> dict:
    """flax path -> (torch key, shape) as the checkpoint at ``source`` stores each parameter of
    ``template``: the names ``load_params`` matched (prefixes, old autoencoder names), for writing a
    checkpoint back under them. Reads the files' headers only; a checkpoint that does not fit raises
    ``CheckpointMismatch`` as ``load_params`` would."""
    wrapped = set(template) == {"params"} and isinstance(template["params"], Mapping)
    template_flat = _flatten(template["params"] if wrapped else template)
    files = weight_files(source, variant=variant)
    checkpoint = _Checkpoint(files)
    plan = _plan(checkpoint.entries, template_flat)
    if plan.num_problems:
        raise _mismatch_error(Path(source).name, files, plan)
    return {path: (key, checkpoint.entries[key][1]) for key, path in plan.assign.items()}


def _check_float(name: str, checkpoint: _Checkpoint, plan: _Plan) -> None:
    """Integer or bool tensors would be cast silently by the first layer: refuse them, naming the first."""
    bad = [(key, checkpoint.entries[key][2]) for key in plan.assign if checkpoint.entries[key][2] not in FLOAT_DTYPES]
    if bad:
        key, code = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DamagedCheckpoint(
            f"{name}: {key} is stored as {code} in {checkpoint.entries[key][0]}{more}; parameters must be "
            f"floating point ({', '.join(FLOAT_DTYPES.values())}): quantised or damaged weights are not read"
        )


def _finite(array: np.ndarray) -> bool:
    """A float64 sum is finite exactly when every element is (float32's largest times a tensor's size stays
    far below float64's): one pass on the host, no temporaries, nothing compiled."""
    return bool(np.isfinite(np.sum(array, dtype=np.float64)))


def _non_finite_error(name: str, checkpoint: _Checkpoint, bad: list[str]) -> DamagedCheckpoint:
    values = np.asarray(checkpoint.read(bad[0]), np.float32)
    count = values.size - np.count_nonzero(np.isfinite(values))
    more = f"; {len(bad) - 1} more tensors too" if len(bad) > 1 else ""
    return DamagedCheckpoint(
        f"{name}: {bad[0]} holds {count} non-finite value(s) (NaN or inf) of {values.size} in "
        f"{checkpoint.entries[bad[0]][0]}{more}; the weights are damaged"
    )


def save_params(params: Mapping, path: str | os.PathLike, *, prefix: str = "", names: Mapping | None = None,
                dtype=None) -> Path:
    """Write flax params as a torch-layout safetensors file (``prefix`` + keys by ``torch_key``).

    The way back from ``load_params``: kernels transposed to torch's layout, dtypes as they are
    (``dtype``: cast floating tensors to it). ``names``: flax path -> (torch key, shape), as
    ``key_names`` reads them from the checkpoint the params came from, so the file uses its spelling
    (a kernel stored as a 1x1 conv is written as one); paths it lacks take the rule.
    ``path`` is the file to write (for a diffusers folder: ``<component>/diffusion_pytorch_model.safetensors``,
    or ``model.safetensors`` for a transformers text encoder; config.json is not written here).
    """
    from safetensors.numpy import save_file

    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a nested mapping, got {type(params).__name__}")
    if prefix and not prefix.endswith("."):
        raise ValueError(f"prefix must be empty or end with '.', got {prefix!r}")
    inner = params["params"] if set(params) == {"params"} and isinstance(params["params"], Mapping) else params
    names = names or {}
    tensors: dict[str, np.ndarray] = {}
    for p, leaf in _flatten(inner).items():
        key, shape = names.get(p, (prefix + torch_key(p), None))
        if key in tensors:
            raise ValueError(f"two flax parameters map to the torch key {key!r} (one is {'/'.join(p)})")
        array = to_torch(p, np.asarray(leaf))
        if shape is not None and tuple(shape) != array.shape:
            if int(np.prod(shape)) != array.size:
                raise ValueError(f"{key}: the parameter {'/'.join(p)} holds {array.shape} in torch's layout, "
                                 f"the reference checkpoint {tuple(shape)}")
            array = array.reshape(shape)  # a linear map stored as a 1x1 conv, or back
        if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(dtype)
        tensors[key] = np.ascontiguousarray(array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
