"""PNG output without an imaging dependency: uint8 arrays to files, and image grids."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np


def write_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W), (H, W, 1) or (H, W, 3) uint8 array as a PNG, atomically."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        color_type, rows = 0, image
    elif image.ndim == 3 and image.shape[2] == 3:
        color_type, rows = 2, image.reshape(image.shape[0], -1)
    else:
        raise ValueError(f"write_png needs (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def grid(images: np.ndarray, pad: int = 2, value: int = 255) -> np.ndarray:
    """Tile (rows, cols, H, W[, C]) images into one picture with ``pad`` pixels between them."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., None]
    r, c, h, w, ch = images.shape
    out = np.full((r * (h + pad) + pad, c * (w + pad) + pad, ch), value, images.dtype)
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = images[i, j]
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small pictures stay sharp in a viewer."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def line_plot(values, width: int = 480, height: int = 240, log: bool = True) -> np.ndarray:
    """A bare line plot (no text) of a series, on a log scale by default, as a grayscale image."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    img = np.full((height, width), 255, np.uint8)
    img[[0, -1], :] = img[:, [0, -1]] = 160
    if v.size < 2:
        return img
    if log:
        v = np.log(np.maximum(v, 1e-12))
    lo, hi = v.min(), v.max()
    xs = np.linspace(4, width - 5, v.size)
    ys = (height - 5) - (v - lo) / max(hi - lo, 1e-12) * (height - 10)
    for i in range(v.size - 1):  # connect consecutive points
        n = int(max(abs(xs[i + 1] - xs[i]), abs(ys[i + 1] - ys[i]), 1)) + 1
        px = np.linspace(xs[i], xs[i + 1], n).round().astype(int)
        py = np.linspace(ys[i], ys[i + 1], n).round().astype(int)
        img[py, px] = 0
    return img
