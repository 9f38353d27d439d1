"""A Stable Diffusion's parts -> a diffusers folder that jaxdiff's and diffusers' ``from_pretrained`` read.

    sd = stable_diffusion.load("path/to/sd-1-5")
    ...  # train sd.params["unet"]
    save_pretrained(sd, "runs/mine/pipeline", params={"unet": trained_unet})

Written: ``model_index.json``; ``unet/`` and ``vae/`` (``diffusion_pytorch_model.safetensors`` +
``config.json``), ``text_encoder/`` (``model.safetensors`` + ``config.json``), ``tokenizer/`` (vocab,
merges, config) and ``scheduler/scheduler_config.json``. Tensors keep the names, shapes and dtypes
of the folder the parts were loaded from (``StableDiffusion.key_names``); parts built from configs
take diffusers' and transformers' own names.

The folder is written whole into a hidden sibling, then put in place by one rename (an existing
folder is swapped with it in one step where Linux's ``renameat2`` allows, else moved aside first),
so a save killed at any point leaves the old folder or the new one, never a mixture of the two.
One save of a folder at a time; in a run of several processes every process calls it (sharded
parameters are gathered) and process 0 writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxdiff.pretrained import weights

# the diffusers release whose folder layout the fixture check (tests/fixtures/check_sd_save_with_diffusers.py)
# loaded; written where the parts carry no version of their own
LAYOUT_VERSION = "0.42.1"
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
PARAM_KEYS = {"unet": "unet", "vae": "vae", "text_encoder": "text"}  # folder -> key of StableDiffusion.params


class SaveError(ValueError):
    """The target cannot take a saved pipeline (a file, or a folder that is not one)."""


def save_pretrained(sd, folder: str | os.PathLike, *, params: dict | None = None, dtype=None) -> Path:
    """Write ``sd`` (a ``jaxdiff.pretrained.stable_diffusion.StableDiffusion``) as a diffusers folder.

    ``params``: parameters to write instead of ``sd.params``, whole or by part ({"unet": ...}; the
    parts not given are ``sd``'s). ``dtype``: cast floating tensors (e.g. ``jnp.float16``); by
    default they keep their dtype. An existing ``folder`` is replaced only if it is a diffusers
    pipeline folder (has model_index.json) or empty. Returns the folder.
    """
    target = Path(folder).absolute()
    _check_target(target)
    parts = {**sd.params, **(params or {})}
    if set(parts) != {"unet", "vae", "text"}:
        raise ValueError(f"params: expected the parts 'unet', 'vae', 'text', got {sorted(parts)}")
    parts = {k: _on_host(v) for k, v in parts.items()}  # every process takes part in gathering
    if jax.process_index() == 0:
        write_folder_atomically(target, lambda root: _write(sd, parts, root, dtype))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdiff: save_pretrained written")
    return target


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(root)`` fills a new folder ``root`` (a hidden sibling of ``target``), which then becomes
    ``target`` in one rename; what a killed earlier call left beside ``target`` is removed first."""
    _remove_leftovers(target)
    tmp = target.parent / f".{target.name}.saving-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_tree(tmp)
        _put_in_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise SaveError(f"{target}: a file, not a folder; save_pretrained writes a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise SaveError(f"{target}: a folder that holds other files and no model_index.json; save_pretrained "
                        f"replaces only a diffusers pipeline folder (or an empty one): choose another folder")


def _on_host(tree):
    """NumPy leaves; a leaf sharded over several processes is gathered whole first."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, tree)


def _write(sd, parts: dict, root: Path, dtype) -> None:
    version = sd.scheduler_config.get("_diffusers_version", LAYOUT_VERSION)
    names = getattr(sd, "key_names", None) or {}
    for sub, key in PARAM_KEYS.items():
        weights.save_params(parts[key], root / sub / WEIGHT_FILES[sub], names=names.get(key), dtype=dtype)
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **sd.unet_spec.config_dict()}
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": version, **sd.vae_spec.config_dict()}
    text = sd.text_spec.config_dict()
    text.setdefault("architectures", ["CLIPTextModel"])
    text.setdefault("model_type", "clip_text_model")
    scheduler = {"_class_name": "PNDMScheduler", "_diffusers_version": version, **sd.scheduler_config}
    _write_json(root / "unet" / "config.json", unet)
    _write_json(root / "vae" / "config.json", vae)
    _write_json(root / "text_encoder" / "config.json", text)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    sd.tokenizer.save(root / "tokenizer")
    _write_json(root / "model_index.json", {
        # diffusers picks the pipeline class from this name: an inpainting U-Net needs the inpainting pipeline
        "_class_name": f"StableDiffusion{'Inpaint' if getattr(sd, 'inpainting', False) else ''}Pipeline",
        "_diffusers_version": version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", text["architectures"][0]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder to disk before the rename makes them the folder (a rename can
    reach the disk before the data it names after a power cut)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):  # tmp now holds the old folder, removed by the caller
        pass
    else:  # no atomic swap here: move the old folder aside, then the new one in
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(os, "fsencode"):
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_leftovers(target: Path) -> None:
    """Hidden folders a killed save left beside ``target`` (its partial copy, or the old folder moved aside)."""
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():  # not glob: a name may hold [ or *
        if p.name.startswith(f".{target.name}.saving-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{target.name}.old-") and target.exists():
            shutil.rmtree(p, ignore_errors=True)  # (without the target it is the only copy left: kept)
