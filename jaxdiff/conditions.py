"""What a pipeline is conditioned on, one class per kind: class labels, text prompts,
low-resolution images.

Each kind checks what the user passed and turns it into host arrays (``host``), names its
null condition (``null``, what training dropped conditions to), and maps the host arrays to
what the U-Net reads (``network``). ``network`` runs inside the sampler's jit, once per
call: the text encoder encodes a prompt once, not at every sampler step.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


class PromptTruncated(UserWarning):
    """A prompt longer than the text encoder reads: its end was dropped."""


def downsample(x, factor: int = 2):
    """(B, H, W, C) -> (B, H / factor, W / factor, C) by averaging factor x factor blocks."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x, size: int):
    """(B, h, w, C) -> (B, size, size, C), bilinear."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")


class Labels:
    """Class labels 0..num_classes-1; the null label is ``num_classes``."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    stage = "labels"

    def host(self, labels, role: str = "labels") -> np.ndarray:
        """One label (an integer) or a 1-D sequence of them: Python, NumPy or jax integers in
        0..num_classes-1. Nothing is flattened, rounded or wrapped around: every label the network
        will read is checked here, where its value is known (a traced one is refused)."""
        if isinstance(labels, jax.Array):
            try:
                labels = np.asarray(labels)
            except jax.errors.TracerArrayConversionError:
                raise ValueError(f"{role} must be concrete values, not traced ones (call the pipeline outside jit): "
                                 f"labels are checked on the host") from None
        if isinstance(labels, np.ndarray) and labels.ndim == 0 and labels.dtype.kind in "iu":
            labels = labels[()]
        if _is_int(labels):
            values = [labels]
        elif isinstance(labels, np.ndarray):
            if labels.ndim != 1 or (labels.size and (labels.dtype.kind not in "iu")):
                raise ValueError(f"{role} must be a 1-D sequence of integer class labels, got an array of "
                                 f"{labels.dtype} with shape {labels.shape}")
            values = labels.tolist()
        elif isinstance(labels, (list, tuple, range)):
            values = list(labels)
            bad = [v for v in values if not _is_int(v)]
            if bad:
                raise ValueError(f"{role} must be a 1-D sequence of integer class labels, got {bad[0]!r} "
                                 f"({type(bad[0]).__name__}) among them")
        else:
            raise ValueError(f"{role} must be an integer or a 1-D sequence of integers, got {type(labels).__name__}")
        if not values:
            raise ValueError(f"{role} is empty: ask for at least one image")
        lo, hi = min(int(v) for v in values), max(int(v) for v in values)
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"{role} must be in 0..{self.num_classes - 1}, got {lo}..{hi}")
        return np.asarray(values, np.int32)

    def null(self, n: int) -> np.ndarray:
        return np.full((n,), self.num_classes, np.int32)

    def network(self, params, labels):
        return labels


class Prompts:
    """Text prompts, tokenized on the host and encoded by the text encoder inside the jit;
    the null condition is the empty prompt. ``params["text"]`` holds the encoder's parameters."""

    stage = "text states"

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def host(self, prompts, role: str = "prompts"):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError(f"{role} is empty: ask for at least one image")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{role} must be strings, got {[type(p).__name__ for p in prompts]}")
        return self.tokenizer(prompts)

    def null(self, n: int):
        return self.tokenizer([""] * n)

    def network(self, params, ids_mask):
        ids, mask = ids_mask
        return self.text_encoder.apply(params["text"], ids, mask)[0], mask


class TextTokens:
    """Text prompts for a pretrained text encoder (Stable Diffusion's CLIP): tokenized on the host
    (ids padded to the encoder's length), encoded inside the jit to per-token states. The null
    condition is the empty prompt. No padding mask, as Stable Diffusion: its U-Net attends to
    every position. ``params["text"]`` holds the encoder's parameters. A prompt longer than the encoder
    reads is cut, with one ``PromptTruncated`` warning per call naming the dropped text."""

    stage = "text states"

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def host(self, prompts, role: str = "prompts") -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{role} must be a string or a non-empty list of strings, got {prompts!r}")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{role} must be strings, got {[type(p).__name__ for p in prompts]}")
        dropped = self.tokenizer.dropped(list(prompts)) if hasattr(self.tokenizer, "dropped") else []
        cut = [(i, d) for i, d in enumerate(dropped) if d]
        if cut:
            shown = "; ".join(f"#{i}: {d!r}" for i, d in cut[:3]) + (f"; {len(cut) - 3} more" if len(cut) > 3 else "")
            warnings.warn(f"{role}: the text encoder reads {self.tokenizer.max_length} tokens; the end of {len(cut)} "
                          f"prompt(s) was dropped: {shown}", PromptTruncated, stacklevel=3)
        return self.tokenizer(list(prompts))[0]

    def null(self, n: int) -> np.ndarray:
        return self.tokenizer([""] * n)[0]

    def network(self, params, ids):
        return self.text_encoder.apply(params["text"], ids).last_hidden_state


class SDXLText:
    """SDXL's condition: prompts through two text encoders and the micro-conditioning.

    Host side: token ids per encoder (``prompt_2`` for the second, default the prompt), the time ids
    (base: original size, crop top-left, target size; refiner, ``aesthetic``: original size, crop, aesthetic
    score) and a flag that zeroes a negative (``force_zeros_for_empty_prompt`` with no negative given, as
    diffusers). In the jit: the penultimate hidden state of each encoder, concatenated, the second encoder's
    projected pooled output (``text_embeds``) and the time ids, as the U-Net reads them. ``tokenizer`` and
    ``text_encoder`` are None for the refiner (second encoder only). ``params["text"]`` and ``params["text_2"]``
    hold the encoders' parameters."""

    stage = "text states"
    OPTIONS = ("prompt_2", "negative_2", "original_size", "crops_coords_top_left", "target_size",
               "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
               "aesthetic_score", "negative_aesthetic_score")

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, force_zeros_for_empty_prompt: bool,
                 aesthetic: bool):
        self.first = None if text_encoder is None else TextTokens(tokenizer, text_encoder)
        self.second = TextTokens(tokenizer_2, text_encoder_2)
        self.force_zeros, self.aesthetic = bool(force_zeros_for_empty_prompt), bool(aesthetic)

    def _ids(self, prompts, prompts_2, role):
        out = {} if self.first is None else {"ids": self.first.host(prompts, role)}
        out["ids_2"] = self.second.host(prompts if prompts_2 is None else prompts_2, f"{role} (second encoder)"
                                        if prompts_2 is None else f"{role}_2")
        return out

    def host_pair(self, prompts, negative, size: tuple[int, int], *, from_image: bool = False, **options):
        """(condition, negative condition) as host arrays for images of ``size`` (height, width). ``from_image``:
        the negative time ids of diffusers' image-to-image and inpainting pipelines (a U-Net without aesthetic
        score: each negative size defaults to its positive one, and the positive crop is used), not of its
        text-to-image pipeline."""
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)} for SDXL; expected some of "
                             f"{', '.join(self.OPTIONS)}")
        o = {k: options.get(k) for k in self.OPTIONS}
        cond = self._ids(prompts, o["prompt_2"], "prompts")
        n = 1 if isinstance(prompts, str) else len(prompts)
        cond = {k: broadcast(v, n, "prompt_2") for k, v in cond.items()}
        zero = negative is None and self.force_zeros
        if negative is None and o["negative_2"] is None:
            uncond = self._ids([""] * n, None, "negative")
        else:
            neg = [""] * n if negative is None else negative
            uncond = self._ids(neg, o["negative_2"], "negative")
            uncond = {k: broadcast(v, n, "negative") for k, v in uncond.items()}
        pair = lambda k, default: _pair(k, o[k], default)
        original, crops = pair("original_size", size), pair("crops_coords_top_left", (0, 0))
        if self.aesthetic:
            score = _score("aesthetic_score", o["aesthetic_score"], 6.0)
            time_ids = original + crops + (score,)
            neg_ids = pair("negative_original_size", original) + pair("negative_crops_coords_top_left", (0, 0)) \
                + (_score("negative_aesthetic_score", o["negative_aesthetic_score"], 2.5),)
        else:
            for k in ("aesthetic_score", "negative_aesthetic_score"):
                if o[k] is not None:
                    raise ValueError(f"{k} is for a refiner (requires_aesthetics_score in model_index.json); this "
                                     f"U-Net reads a target size instead")
            target = pair("target_size", size)
            time_ids = original + crops + target
            neg_ids = time_ids  # diffusers' text-to-image rule: the negative sizes count only when both are given
            if from_image:  # its image-to-image and inpainting rule; negative_crops_coords_top_left goes unread
                neg_ids = pair("negative_original_size", original) + crops + pair("negative_target_size", target)
            elif o["negative_original_size"] is not None and o["negative_target_size"] is not None:
                neg_ids = pair("negative_original_size", None) + pair("negative_crops_coords_top_left", (0, 0)) \
                    + pair("negative_target_size", None)
        cond["time_ids"] = np.tile(np.asarray(time_ids, np.float32), (n, 1))
        cond["zero"] = np.zeros((n,), np.float32)
        uncond["time_ids"] = np.tile(np.asarray(neg_ids, np.float32), (n, 1))
        uncond["zero"] = np.full((n,), float(zero), np.float32)
        return cond, uncond

    def network(self, params, c):
        states = []
        if "ids" in c:
            out = self.first.text_encoder.apply(params["text"], c["ids"], output_hidden_states=True)
            states.append(out.hidden_states[-2].astype(jnp.float32))
        out = self.second.text_encoder.apply(params["text_2"], c["ids_2"], output_hidden_states=True)
        states.append(out.hidden_states[-2].astype(jnp.float32))
        keep = 1.0 - c["zero"]
        return {"states": jnp.concatenate(states, axis=-1) * keep[:, None, None],
                "text_embeds": out.text_embeds.astype(jnp.float32) * keep[:, None], "time_ids": c["time_ids"]}


def _pair(name, value, default):
    value = default if value is None else value
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
            for v in value)):
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), got {value!r}")
    return tuple(float(v) for v in value)


def _score(name, value, default):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class LowRes:
    """Low-resolution uint8 images (B, low, low, C), upsampled bilinearly to the output size
    for the U-Net to read beside x_t. The null condition is an all-zero (mid-grey) image."""

    stage = "upsampled low-resolution images"

    def __init__(self, low: int, size: int, channels: int = 1):
        self.low, self.size, self.channels = low, size, channels

    def host(self, images, role: str = "low-resolution images") -> np.ndarray:
        arr = np.asarray(images)
        want = (self.low, self.low, self.channels)
        if arr.shape in (want, want[:2]):  # one image, with or without its channel axis
            arr = arr.reshape(1, *want)
        elif arr.ndim == 3 and arr.shape[-1] != self.channels:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[1:] != want or arr.shape[0] == 0:
            raise ValueError(f"{role} must be uint8 arrays of shape (N, {self.low}, {self.low}, {self.channels}), "
                             f"got shape {np.shape(images)}")
        if arr.dtype != np.uint8:
            raise ValueError(f"{role} must be uint8 (0..255), got {arr.dtype}")
        return arr.astype(np.float32) / 127.5 - 1.0

    def null(self, n: int) -> np.ndarray:
        return np.zeros((n, self.low, self.low, self.channels), np.float32)

    def network(self, params, low):
        return upsample(jnp.asarray(low), self.size)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def batch_size(host_condition) -> int:
    return jax.tree.leaves(host_condition)[0].shape[0]


def broadcast(host_condition, n: int, role: str):
    """A condition of batch 1 repeated to n; any other batch must be n already."""
    m = batch_size(host_condition)
    if m == n:
        return host_condition
    if m == 1:
        return jax.tree.map(lambda a: np.repeat(a, n, axis=0), host_condition)
    raise ValueError(f"{role} has {m} entries for {n} images: give one or {n}")
