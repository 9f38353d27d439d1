"""Where a Stable Diffusion model lives: a local diffusers folder, or a Hub id fetched into the cache.

``resolve(model)`` gives a local folder; ``read_pipeline_index(folder)`` checks that it is laid out
like diffusers' StableDiffusionPipeline and says where each component is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# the folders a Stable Diffusion pipeline reads (SDXL's second encoder too, if present)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
SUPPORTED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFound(ValueError):
    """A model name that is neither a local folder nor a Hub id that could be fetched."""


class PipelineLayoutError(ValueError):
    """A folder that is not laid out like a diffusers Stable Diffusion pipeline."""


def _download_patterns(variant: str | None) -> list[str]:
    """Only what the pipeline reads: configs, tokenizer files and the weights of one variant.
    (SD repositories also hold multi-GB single-file checkpoints at the top level and .bin copies.)"""
    patterns = ["model_index.json"]
    v = f".{variant}" if variant else ""
    for c in COMPONENTS + OPTIONAL_COMPONENTS:
        patterns += [f"{c}/*.json", f"{c}/*.txt"]
        patterns += [f"{c}/diffusion_pytorch_model{v}.safetensors", f"{c}/model{v}.safetensors"]
        patterns += [f"{c}/*-of-[0-9][0-9][0-9][0-9][0-9]{v}.safetensors"]  # shards named by the index
    return patterns


def resolve(
    model: str | os.PathLike,
    *,
    offline: bool | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder for ``model``: the folder itself if it exists, else a Hub id ("org/name")
    fetched with ``huggingface_hub.snapshot_download`` (configs, tokenizer files and the
    safetensors weights only; ``variant`` such as "fp16" picks those weight files).

    ``offline``: None reads HF_HUB_OFFLINE; offline, only the local Hub cache is used. When the
    model cannot be had, raises ``ModelNotFound`` with one line naming the id and how to pass a
    local folder instead.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFound(
            f"{text}: a file, not a folder; pass the diffusers model folder (the one with model_index.json)"
        )
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFound(f"{text}: no such folder, and not a Hugging Face Hub id of the form 'org/name'")
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    hint = (
        f"download it where the Hub is reachable (e.g. `hf download {text} --local-dir DIR`) "
        f"and pass the folder instead of the id"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(
            f"{text}: no such folder, and huggingface_hub is not installed to fetch it; {hint}"
        ) from None
    try:
        local = snapshot_download(
            text,
            revision=revision,
            allow_patterns=_download_patterns(variant),
            local_files_only=offline,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
    except Exception as e:  # the Hub's many network/cache errors all mean the same thing here
        why = "offline and not in the local Hub cache" if offline else f"could not fetch it ({type(e).__name__})"
        raise ModelNotFound(f"{text}: {why}; {hint}") from e
    return Path(local)


@dataclass(frozen=True)
class PipelineIndex:
    """A checked diffusers pipeline folder: ``components`` maps each name in model_index.json
    that has a class to (library, class name); ``paths`` maps the components jaxdiff reads to
    their folders; ``settings`` holds model_index.json's other keys (SDXL's force_zeros_for_empty_prompt)."""

    folder: Path
    class_name: str
    components: dict
    paths: dict
    settings: dict = field(default_factory=dict)  # the pipeline's own settings (force_zeros_for_empty_prompt, ...)

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]


def read_json(path: str | os.PathLike, error: type[ValueError] = PipelineLayoutError) -> dict:
    """The JSON object in ``path``; ``error`` (naming the file) if it is missing, not JSON, or not an
    object. Every config file of a diffusers folder is read through here."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value


def read_pipeline_index(folder: str | os.PathLike) -> PipelineIndex:
    """Read ``model_index.json`` and check the Stable Diffusion layout: unet, vae, text_encoder,
    tokenizer and scheduler listed with supported classes, each folder present with the file
    jaxdiff reads first (config.json, scheduler_config.json, vocab.json + merges.txt or
    tokenizer.json). Errors name the missing file or folder."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PipelineLayoutError(
            f"{index_path}: missing; a diffusers pipeline folder has model_index.json next to unet/, vae/, "
            f"text_encoder/, tokenizer/ and scheduler/"
        )
    index = read_json(index_path)
    components = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            components[name] = (value[0], value[1])
    required = COMPONENTS
    if "text_encoder_2" in components and "tokenizer_2" in components:
        # SDXL's refiner lists text_encoder and tokenizer as null: it reads only the second encoder
        required = tuple(c for c in COMPONENTS if c not in ("text_encoder", "tokenizer"))
    lacking = [c for c in required if c not in components]
    if lacking:
        raise PipelineLayoutError(
            f"{index_path}: lists no {', '.join(lacking)}; a Stable Diffusion pipeline needs {', '.join(COMPONENTS)} "
            f"(found {', '.join(sorted(components)) or 'none'})"
        )
    for name, classes in SUPPORTED_CLASSES.items():
        for c in (name, name + "_2"):
            if c in components and components[c][1] not in classes:
                raise PipelineLayoutError(
                    f"{index_path}: {c} is a {components[c][1]}; jaxdiff reads {' or '.join(classes)}"
                )
    paths = {}
    for name in tuple(c for c in COMPONENTS + OPTIONAL_COMPONENTS if c in components):
        sub = folder / name
        if not sub.is_dir():
            raise PipelineLayoutError(f"{sub}: missing folder (model_index.json lists {name})")
        if name.startswith("tokenizer"):
            if (
                not ((sub / "vocab.json").is_file() and (sub / "merges.txt").is_file())
                and not (sub / "tokenizer.json").is_file()
            ):
                raise PipelineLayoutError(f"{sub}: missing vocab.json and merges.txt (or tokenizer.json)")
        else:
            needed = "scheduler_config.json" if name == "scheduler" else "config.json"
            if not (sub / needed).is_file():
                raise PipelineLayoutError(f"{sub / needed}: missing")
        paths[name] = sub
    settings = {k: v for k, v in index.items() if not k.startswith("_") and k not in components
                and not (isinstance(v, list) and len(v) == 2)}
    return PipelineIndex(
        folder=folder, class_name=str(index.get("_class_name", "")), components=components, paths=paths,
        settings=settings,
    )
