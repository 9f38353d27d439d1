"""Datasets as uint8 arrays: MNIST and Fashion-MNIST from IDX files or through tensorflow-datasets.

Where the files come from, in order:
1. ``data_dir`` (a CLI's ``--data-dir``), or the ``JAXDIFF_DATA_DIR`` environment variable:
   a directory holding the original IDX ``.gz`` files (directly, or in a ``<dataset>/`` subfolder);
2. tensorflow-datasets' download manager, which fetches the URLs registered for the dataset
   and verifies their sizes and SHA-256 checksums (no TensorFlow needed), cached in
   ``~/tensorflow_datasets/downloads`` or ``TFDS_DATA_DIR``.
Offline with no files, ``DataUnavailable`` says which files to put where.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

DATASETS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist"}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10}
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ENV_DIR = "JAXDIFF_DATA_DIR"


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says what to do."""


def read_idx(path: str | os.PathLike, expect_ndim: int) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes, checking its header against its size. A damaged
    file is a ValueError naming it and what is wrong."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except EOFError:
        raise ValueError(f"{path}: truncated (the gzip stream ends early): download it again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err}): download it again") from None
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    if ndim != expect_ndim:
        raise ValueError(f"{path}: expected {expect_ndim} dimensions, the header says {ndim}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: truncated inside its header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    size = math.prod(dims)  # exact: np.prod wraps around in int64 and could match a wrong header
    if len(data) - offset != size:
        raise ValueError(f"{path}: header says {dims} = {size} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (for tests and for exporting subsets)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _find_dir(dataset: str, split: str, data_dir) -> Path | None:
    for root in [data_dir, os.environ.get(ENV_DIR)]:
        if not root:
            continue
        for cand in (Path(root) / dataset, Path(root)):
            if all((cand / name).exists() for name in FILES[split]):
                return cand
    return None


def load_idx_dir(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (Path(directory) / n for n in FILES[split])
    images = read_idx(images_file, 3)
    labels = read_idx(labels_file, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_file}: expected 28x28 images, got {images.shape[1:]}")
    if labels.max(initial=0) >= 10:
        raise ValueError(f"{labels_file}: labels must be 0..9, found {labels.max()}")
    return images[..., None], labels.astype(np.int32)


def fetch_with_tfds(dataset: str, download_dir: str | os.PathLike | None = None, url_infos=None) -> Path:
    """Download (or find cached) the dataset's IDX files through tensorflow-datasets, with the
    sizes and checksums it registers for them; returns the folder holding them.

    ``url_infos`` overrides the registered URLs and checksums (tests use a loopback server).
    """
    from tensorflow_datasets.core.download import checksums, download_manager

    if url_infos is None:
        import tensorflow_datasets

        path = Path(tensorflow_datasets.__file__).parent / "url_checksums" / f"{DATASETS[dataset]}.txt"
        url_infos = checksums.load_url_infos(path)
    _check_hosts_resolve(str(u) for u in url_infos)
    if download_dir is None:
        base = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
        download_dir = os.path.join(base, "downloads", "jaxdiff")
    manager = download_manager.DownloadManager(
        download_dir=download_dir, url_infos=url_infos, force_checksums_validation=True
    )
    urls = {Path(str(u)).name: str(u) for u in url_infos}
    paths = manager.download(urls)
    folder = Path(download_dir) / f"{dataset}_idx"
    folder.mkdir(parents=True, exist_ok=True)
    for name, p in paths.items():
        link = folder / name
        if not link.exists():
            os.symlink(os.path.abspath(str(p)), link)
    return folder


def _check_hosts_resolve(urls) -> None:
    """Fail at once when a download host has no address (offline), rather than after
    tensorflow-datasets' minutes of retries."""
    import socket
    from urllib.parse import urlparse

    for host in {urlparse(u).hostname for u in urls}:
        try:
            socket.getaddrinfo(host, None)
        except OSError as err:
            raise DataUnavailable(f"cannot resolve {host} (offline?): {err}") from err


def load(dataset: str, split: str = "train", data_dir=None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8 and labels (N,) int32 of ``dataset`` ('mnist' or 'fashion_mnist')."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    found = _find_dir(dataset, split, data_dir)
    if found is not None:
        return load_idx_dir(found, split)
    if data_dir is not None:
        raise DataUnavailable(_missing_message(dataset, split, data_dir))
    if download:
        try:
            print(f"fetching {dataset} through tensorflow-datasets ...", file=sys.stderr)
            return load_idx_dir(fetch_with_tfds(dataset), split)
        except Exception as err:  # offline, blocked, or a checksum that did not match
            why = "its checksum did not match the one tensorflow-datasets registers" if "checksum" in str(err).lower() \
                else "it failed"
            raise DataUnavailable(_missing_message(dataset, split, None) + f" (the download: {why}: "
                                  f"{' '.join(str(err).split())[:300]})") from err
    raise DataUnavailable(_missing_message(dataset, split, None))


def _missing_message(dataset: str, split: str, data_dir) -> str:
    where = (f"in {data_dir} (or {Path(data_dir) / dataset})" if data_dir
             else f"in a folder named by --data-dir or ${ENV_DIR}")
    return (
        f"{dataset} {split} split not found: put {' and '.join(FILES[split])} (the original IDX .gz files) "
        f"{where}; with a network, leave --data-dir unset and tensorflow-datasets downloads and verifies them."
    )


def to_float(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1], the library's image convention (works on jax and numpy arrays)."""
    return images_uint8.astype("float32") / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clipping."""
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


class Batches:
    """Deterministic shuffled batches: batch ``i`` of the run is a function of (seed, i) alone,
    so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        if batch_size < 1 or batch_size > len(images):
            raise ValueError(f"batch_size must be in 1..{len(images)} (the dataset size), got {batch_size}")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, index: int) -> np.ndarray:
        """The dataset rows of batch ``index``."""
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
            self._epoch = epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(index)
        return self.images[idx], self.labels[idx]

    def stack(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` consecutive batches stacked on a leading axis, for several steps per dispatch."""
        xs, ys = zip(*(self(start + k) for k in range(count)), strict=True)
        return np.stack(xs), np.stack(ys)
