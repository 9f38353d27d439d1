"""Captioned image folders: both layouts (metadata.jsonl, .txt captions with kohya's repeat folders), errors
that name the file, resize/crop/flip against slices of the original pixels, a per-epoch order that is a
function of (seed, batch), each process decoding only its rows, and the latent cache equal to encoding
the batches it replaces. Images are made here with NumPy and Pillow (PNG, so pixels survive exactly)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff import captioned, distributed
from jaxdiff.captioned import CachedBatches, CaptionedBatches, CaptionFolderError, LatentCache


def png(path, w, h, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(x, mode).save(path)
    return x


def caption_folder(root, n=6, size=(16, 16)):
    for i in range(n):
        png(root / f"img{i}.png", *size, seed=i)
        (root / f"img{i}.txt").write_text(f" caption {i}\n")
    return root


def fake_tokenize(captions):
    """ids: the caption's number and its length, padded to 4 (a CLIPTokenizer-like (ids, mask) pair)."""
    ids = np.array([[int(c.split()[-1]) if c.split()[-1].isdigit() else -1, len(c), 0, 0] for c in captions])
    return ids, np.ones_like(ids)


def test_imagefolder_metadata_jsonl(tmp_path):
    png(tmp_path / "train" / "b.png", 8, 8, 1)
    png(tmp_path / "train" / "a.png", 8, 8, 2)
    rows = [{"file_name": "train/b.png", "text": "a cat"}, {"file_name": "train/a.png", "text": "a dog", "x": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    found = captioned.scan(tmp_path)
    assert [e.path.name for e in found.examples] == ["a.png", "b.png"]  # sorted, whatever the file's order
    assert found.captions == ["a dog", "a cat"] and list(found.rows()) == [0, 1]
    # an image the metadata does not list has no caption: named
    png(tmp_path / "train" / "c.png", 8, 8, 3)
    with pytest.raises(CaptionFolderError, match=r"train/c.png: without a caption: not listed in metadata.jsonl"):
        captioned.scan(tmp_path)
    # another caption column, and a listed file that is not there
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "train/gone.png", "prompt": "x"}) + "\n" +
                                             json.dumps({"file_name": "train/c.png", "prompt": "a bird"}) + "\n")
    found = captioned.scan(tmp_path, caption_column="prompt", on_error="skip")
    assert found.captions == ["a bird"]
    assert {p.name: why for p, why in found.skipped} == {
        "gone.png": "unreadable: listed in metadata.jsonl line 1, but there is no such file",
        "a.png": "without a caption: not listed in metadata.jsonl",
        "b.png": "without a caption: not listed in metadata.jsonl"}


def test_caption_files_and_kohya_repeat_folders(tmp_path):
    png(tmp_path / "plain.png", 8, 8)
    (tmp_path / "plain.txt").write_text("a plain photo\n")
    png(tmp_path / "10_sks dog" / "x.jpg", 8, 8)  # no caption file: the folder's class words
    png(tmp_path / "3_cat" / "deep" / "y.png", 8, 8)
    (tmp_path / "3_cat" / "deep" / "y.txt").write_text("a cat on a mat")
    png(tmp_path / "2024_photos" / "z.png", 8, 8)  # looks like a repeat folder: kohya's rule applies to it too
    (tmp_path / "2024_photos" / "z.txt").write_text("z")
    found = captioned.scan(tmp_path)
    got = {e.path.name: (e.caption, e.repeats) for e in found.examples}
    assert got == {"plain.png": ("a plain photo", 1), "x.jpg": ("sks dog", 10), "y.png": ("a cat on a mat", 3),
                   "z.png": ("z", 2024)}
    assert np.bincount(found.rows()).tolist() == [e.repeats for e in found.examples]


def test_a_folder_of_imagefolder_splits_asks_for_one_split(tmp_path):
    png(tmp_path / "train" / "a.png", 8, 8)
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    with pytest.raises(CaptionFolderError, match=r"no metadata.jsonl at the top, but .*train/metadata.jsonl below"):
        captioned.scan(tmp_path)
    assert captioned.scan(tmp_path / "train").captions == ["a"]


def test_missing_captions_and_unreadable_images_are_named_or_skipped(tmp_path, capsys):
    caption_folder(tmp_path, n=3)
    png(tmp_path / "sub" / "nocap.png", 8, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.txt").write_text("broken")
    with pytest.raises(CaptionFolderError) as err:
        captioned.scan(tmp_path)
    assert "broken.png: unreadable" in str(err.value) and "(and 1 more)" in str(err.value)
    found = captioned.scan(tmp_path, on_error="skip")
    assert len(found) == 3 and {p.name for p, _ in found.skipped} == {"broken.png", "nocap.png"}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "skipped 2 of 5 images (1 unreadable, 1 without a caption)" in lines[0]
    # a body that is damaged past a good header passes the header check and fails "full", named either way
    x = png(tmp_path / "cut" / "t.png", 64, 64)
    (tmp_path / "cut" / "t.txt").write_text("t")
    data = (tmp_path / "cut" / "t.png").read_bytes()
    (tmp_path / "cut" / "t.png").write_bytes(data[: len(data) // 2])
    assert "t.png" in {e.path.name for e in captioned.scan(tmp_path / "cut", check="header").examples}
    with pytest.raises(CaptionFolderError, match=r"cut/t.png: unreadable"):
        captioned.scan(tmp_path / "cut", check="full")
    with pytest.raises(CaptionFolderError, match=r"t.png: unreadable image"):
        captioned.load_image(tmp_path / "cut" / "t.png", 16)
    assert x.shape == (64, 64, 3)
    with pytest.raises(CaptionFolderError, match="no captioned images"):
        captioned.scan(tmp_path / "sub", on_error="skip")
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'skip'"):
        captioned.scan(tmp_path, on_error="ignore")


def test_resize_crop_and_flip_are_slices_of_the_original(tmp_path):
    x = png(tmp_path / "wide.png", 24, 16)  # shorter side already 16: no resampling, the crop is a slice
    np.testing.assert_array_equal(captioned.load_image(tmp_path / "wide.png", 16), x[:, 4:20])
    np.testing.assert_array_equal(captioned.load_image(tmp_path / "wide.png", 16, flip=True), x[:, 4:20][:, ::-1])
    lefts = set()
    for seed in range(40):
        got = captioned.load_image(tmp_path / "wide.png", 16, crop="random", rng=np.random.default_rng(seed))
        left = next(i for i in range(9) if np.array_equal(got, x[:, i : i + 16]))
        lefts.add(left)
    assert lefts == set(range(9))  # every offset 0..8 is reachable
    # a resize keeps the aspect ratio (30x50 -> 16x27 before the crop) and a flat colour stays flat
    Image.new("RGB", (30, 50), (200, 10, 99)).save(tmp_path / "tall.png")
    got = captioned.load_image(tmp_path / "tall.png", 16)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8 and (got == [200, 10, 99]).all()
    # grey -> three equal channels; transparent -> white; EXIF orientation 3 (upside down) is applied
    g = png(tmp_path / "grey.png", 16, 16, mode="L")
    np.testing.assert_array_equal(captioned.load_image(tmp_path / "grey.png", 16), np.repeat(g[..., None], 3, -1))
    rgba = np.zeros((16, 16, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (captioned.load_image(tmp_path / "clear.png", 16) == 255).all()
    deep = np.random.default_rng(1).integers(0, 65536, (16, 16), dtype=np.uint16)  # a 16-bit greyscale PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    want = np.round(deep / 257).astype(np.uint8)
    np.testing.assert_array_equal(captioned.load_image(tmp_path / "deep.png", 16), np.repeat(want[..., None], 3, -1))
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(x[:, :16]).save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(captioned.load_image(tmp_path / "rot.png", 16), x[::-1, 15::-1])


def test_batches_follow_a_seeded_order_per_epoch(tmp_path):
    found = captioned.scan(caption_folder(tmp_path, n=7))
    b = CaptionedBatches(found, 3, seed=5, resolution=16, flip=True, crop="random", tokenize=fake_tokenize, workers=2)
    assert b.per_epoch == 2  # 7 rows: two batches of 3, the last row waits for the next epoch's order
    x, y = b(0)
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.uint8 and y.shape == (3, 4) and y.dtype == np.int32
    for k in range(3):  # each row's image is its caption's image
        i = int(y[k, 0])
        assert found.captions[i] == f"caption {i}"
    # an epoch visits distinct rows; the next epoch draws another order; a fresh object gives the same batches
    epoch0 = np.concatenate([b(i)[1][:, 0] for i in range(2)])
    assert len(set(epoch0.tolist())) == 6
    again = CaptionedBatches(found, 3, seed=5, resolution=16, flip=True, crop="random", tokenize=fake_tokenize)
    for i in (3, 0, 2):  # any order of calls, as a resumed run makes them
        np.testing.assert_array_equal(again(i)[0], b(i)[0])
        np.testing.assert_array_equal(again(i)[1], b(i)[1])
    other = CaptionedBatches(found, 3, seed=6, resolution=16)
    assert any(not np.array_equal(other(i)[1], b(i)[1][:, 0]) for i in range(4))  # another seed, another order
    xs, ys = b.stack(1, 2)
    assert xs.shape == (2, 3, 16, 16, 3) and ys.shape == (2, 3, 4)
    np.testing.assert_array_equal(xs[1], b(2)[0])
    # without a tokenizer, y is each row's example index
    plain = CaptionedBatches(found, 3, seed=5, resolution=16)
    np.testing.assert_array_equal(plain(0)[1], b(0)[1][:, 0])
    with pytest.raises(ValueError, match=r"batch_size must be in 1..7"):
        CaptionedBatches(found, 8, resolution=16)
    with pytest.raises(ValueError, match="crop must be one of"):
        CaptionedBatches(found, 2, resolution=16, crop="top")


def test_each_process_decodes_only_its_rows(tmp_path, monkeypatch):
    found = captioned.scan(caption_folder(tmp_path, n=8))
    whole = CaptionedBatches(found, 4, seed=1, resolution=16, flip=True, crop="random", workers=1)
    opened = []
    real = captioned.load_image
    monkeypatch.setattr(captioned, "load_image", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    monkeypatch.setattr(distributed, "local_rows", lambda batch: slice(2, 4))  # process 1 of 2
    half = CaptionedBatches(found, 4, seed=1, resolution=16, flip=True, crop="random", workers=1)
    for i in (0, 1, 5):
        wx, wy = whole(i)
        x, y = half(i)
        np.testing.assert_array_equal(x, wx[2:4])  # the same crops and flips as in the whole batch's rows 2, 3
        np.testing.assert_array_equal(y, wy[2:4])
    opened.clear()
    half(3)
    assert len(opened) == 2


def pool4(images_uint8):
    """A stand-in encoder: 4x4 average pooling of the image in [-1, 1] (float32 NumPy)."""
    x = images_uint8.astype(np.float32) / 127.5 - 1
    n, h, w, c = x.shape
    return x.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))


def test_the_latent_cache_equals_encoding_the_batches(tmp_path, capsys):
    found = captioned.scan(caption_folder(tmp_path / "data", n=5, size=(20, 16)))
    calls = []

    def encode(x):
        calls.append(len(x))
        return pool4(x)

    def text_states(ids):
        return np.repeat(ids[..., None].astype(np.float32), 2, axis=-1)

    cache = LatentCache.build(found, tmp_path / "run" / "cache", encode, resolution=16, tokenize=fake_tokenize,
                              encode_text=text_states, batch_size=2, key="stand-in")
    assert calls == [2] * 6  # 3 batches (the last padded to 2), each also mirrored
    assert cache.latents.shape == (5, 2, 4, 4, 3) and cache.flips
    images = CaptionedBatches(found, 2, seed=3, resolution=16, flip=True, tokenize=fake_tokenize)
    latents = CachedBatches(found, cache, 2, seed=3, flip=True)
    states = CachedBatches(found, cache, 2, seed=3, flip=True, text=True)
    flipped = 0
    for i in range(5):
        x, y = images(i)
        z, ids = latents(i)
        np.testing.assert_allclose(z, pool4(x), rtol=0, atol=1e-6)  # the same rows, crops and flips
        np.testing.assert_array_equal(ids, y)
        np.testing.assert_array_equal(states(i)[1], text_states(y))
        flipped += sum(not np.array_equal(z[k], cache.latents[int(y[k, 0]), 0]) for k in range(2))
    assert 0 < flipped < 10
    assert latents.stack(0, 3)[0].shape == (3, 2, 4, 4, 3)
    # built once: the next run reuses it; a changed caption or setting rebuilds it, saying why
    calls.clear()
    LatentCache.build(found, tmp_path / "run" / "cache", encode, resolution=16, tokenize=fake_tokenize,
                      encode_text=text_states, batch_size=2, key="stand-in")
    assert calls == []
    (tmp_path / "data" / "img0.txt").write_text("caption 9")
    found = captioned.scan(tmp_path / "data")
    capsys.readouterr()
    cache = LatentCache.build(found, tmp_path / "run" / "cache", encode, resolution=16, flips=False, batch_size=8)
    assert calls == [8] and not cache.flips and "made from other images or captions" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "run")) == ["cache"]
    with pytest.raises(ValueError, match="built without mirror images"):
        CachedBatches(found, cache, 2, flip=True)
    with pytest.raises(ValueError, match="holds no token ids: build it with tokenize"):
        CachedBatches(found, cache, 2)


def test_trainer_fit_takes_both_batch_sources(tmp_path):
    """trainer.fit runs on images (uint8) and on cached latents (float), with the ids beside them."""
    import jax.numpy as jnp

    from jaxdiff import trainer

    found = captioned.scan(caption_folder(tmp_path / "data", n=4))
    cache = LatentCache.build(found, tmp_path / "cache", pool4, resolution=16, tokenize=fake_tokenize, batch_size=4)
    config = trainer.TrainConfig(steps=4, batch_size=2, steps_per_dispatch=2, warmup_steps=0, learning_rate=0.1)

    def loss_fn(params, x, y, key, shard):  # fit w to the mean colour; the ids must arrive as int32 (B, 4)
        assert y.dtype == jnp.int32 and y.shape[1:] == (4,)
        colour = x.astype(jnp.float32).mean(axis=(1, 2))
        return jnp.mean((colour - params["w"]) ** 2)

    for batches in (CaptionedBatches(found, 2, resolution=16, tokenize=fake_tokenize), CachedBatches(found, cache, 2)):
        result = trainer.fit(None, loss_fn, batches, config, params={"w": jnp.zeros(3)}, progress=False)
        assert result.trained_steps == 4 and float(jnp.abs(result.state.params["w"]).max()) > 0
