"""PNG output without an imaging dependency: uint8 arrays to files, and image grids."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from etils import epath


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
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


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
