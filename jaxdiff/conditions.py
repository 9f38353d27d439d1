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
