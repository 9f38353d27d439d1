"""IDX parsing and checks, the data-dir and tensorflow-datasets paths (loopback only), batching."""

import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from jaxdiff import data


def write_split(folder, split, n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    data.write_idx(os.path.join(folder, data.FILES[split][0]), images)
    data.write_idx(os.path.join(folder, data.FILES[split][1]), labels)
    return images, labels


def test_idx_round_trip_and_load_from_data_dir(tmp_path):
    images, labels = write_split(tmp_path / "mnist", "train", 30)
    x, y = data.load("mnist", "train", data_dir=str(tmp_path))  # found in the <dataset>/ subfolder
    assert x.shape == (30, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_environment_variable_names_the_folder(tmp_path, monkeypatch):
    write_split(tmp_path, "test", 12)
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path))
    assert data.load("fashion_mnist", "test")[0].shape == (12, 28, 28, 1)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    write_split(tmp_path, "train", 10)
    path = tmp_path / data.FILES["train"][0]
    import gzip

    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(ValueError, match="header says"):
        data.load("mnist", "train", data_dir=str(tmp_path))
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + raw[4:])  # float32 IDX, not bytes
    with pytest.raises(ValueError, match="unsigned bytes"):
        data.load("mnist", "train", data_dir=str(tmp_path))


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(data.DataUnavailable, match="train-images-idx3-ubyte.gz"):
        data.load("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar10")


def test_tensorflow_datasets_fetches_and_verifies_over_loopback(tmp_path):
    """TFDS's download manager against a local HTTP server, with checksums for the served files."""
    from tensorflow_datasets.core.download import checksums

    served = tmp_path / "served"
    images, _ = write_split(served, "train", 20)
    write_split(served, "test", 10)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the request log would land in pytest's output
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"

        def infos(corrupt=None):
            out = {}
            for name in os.listdir(served):
                blob = (served / name).read_bytes()
                digest = "0" * 64 if name == corrupt else hashlib.sha256(blob).hexdigest()
                out[base + name] = checksums.UrlInfo(size=len(blob), checksum=digest, filename=name)
            return out

        folder = data.fetch_with_tfds("mnist", tmp_path / "dl", url_infos=infos())
        x, _ = data.load_idx_dir(folder, "train")
        np.testing.assert_array_equal(x[..., 0], images)
        with pytest.raises(Exception, match="checksum"):
            data.fetch_with_tfds("mnist", tmp_path / "dl2", url_infos=infos(corrupt=data.FILES["test"][0]))
    finally:
        # close the listening socket too: a download thread TFDS left waiting on a queued connection
        # then fails at once, instead of blocking the interpreter's exit (it joins its pool's threads)
        server.shutdown()
        server.server_close()


def test_batches_are_a_function_of_seed_and_index():
    x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    y = np.arange(100, dtype=np.int32)
    a, b = data.Batches(x, y, 32, seed=1), data.Batches(x, y, 32, seed=1)
    first_epoch = np.concatenate([a(i)[1] for i in range(3)])
    assert len(set(first_epoch)) == 96  # no repeats within an epoch
    np.testing.assert_array_equal(a(4)[1], b(4)[1])  # random access, as a resumed run needs
    assert not np.array_equal(a(0)[1], a(3)[1])  # reshuffled next epoch
    xs, ys = a.stack(2, 3)
    assert xs.shape == (3, 32, 1, 1, 1) and np.array_equal(ys[0], a(2)[1])
    with pytest.raises(ValueError, match="batch_size"):
        data.Batches(x, y, 101, seed=0)


def test_uint8_float_conversions():
    u = np.array([0, 127, 255], np.uint8)
    f = data.to_float(u)
    np.testing.assert_allclose(f, [-1, 127 / 127.5 - 1, 1])
    np.testing.assert_array_equal(data.to_uint8(f), u)
    np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 3.0])), [0, 255])


def test_an_idx_header_whose_sizes_overflow_names_the_file(tmp_path):
    """2**31 * 2**31 * 4 = 2**64 wraps to 0 in int64, so np.prod once matched an empty file's size."""
    import gzip
    import struct

    path = tmp_path / data.FILES["train"][0]
    for dims, payload in [((2**31, 2**31, 4), b""), ((2**32 - 1, 2**32 - 1, 2**32 - 1), b"\0" * 784)]:
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">HBB3I", 0, 8, 3, *dims) + payload)
        with pytest.raises(ValueError, match=rf"^{path}: header says .* = \d+ bytes, file holds {len(payload)}$"):
            data.read_idx(path, 3)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + b"\0\0")
    with pytest.raises(ValueError, match=rf"^{path}: truncated inside its header"):
        data.read_idx(path, 3)
