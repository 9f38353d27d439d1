"""Folders of captioned images as training batches for text-to-image models (Stable Diffusion fine-tuning).

Two layouts, as users have them:

- Hugging Face ImageFolder: ``metadata.jsonl`` (or ``metadata.csv``) at the top of the folder, one row per
  image with ``file_name`` (relative to the folder) and the caption (column ``text`` unless told otherwise);
- caption files: ``photo.jpg`` with ``photo.txt`` beside it, in any sub-folders (kohya-style). A top-level
  sub-folder named ``N_name`` (``20_sks dog``) repeats its images N times per epoch, and an image in it
  without a caption file takes ``name`` as its caption, as kohya's trainers do.

Images are decoded with Pillow (EXIF orientation applied, transparency over white, RGB), the shorter side
resized to ``resolution`` (bicubic, antialiased), cropped to a square at the centre or at random, and
optionally flipped left-right at random: uint8 NHWC, the library's convention at its edges.

Order and randomness: epoch e visits the rows in a permutation drawn from (seed, e); the crop and flip of
the example in row j of global batch i are drawn from (seed, i, j). So batch i is a function of (seed, i)
alone (a resumed run sees what the uninterrupted one would have) and does not depend on how many processes
share the run; each process reads and decodes only its rows of the global batch.

The latent cache (``LatentCache.build``) encodes every image once with a given function (the VAE's
encoder; its flipped twin too, unless flips are off) at the centre crop, and stores the latents, with the
captions' token ids or text-encoder states if asked, as .npy files in a folder of the run; batches then
read only their rows from disk. Random crops need the images: with a cache the crop is the centre one.

An unreadable image or an image without a caption is named in the error; ``on_error="skip"`` leaves such
images out instead and prints one summary line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxdiff import distributed

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
REPEAT_FOLDER = re.compile(r"^([1-9][0-9]*)_(.+)$")  # kohya's "<repeats>_<class words>"
CROPS = ("center", "random")


class CaptionFolderError(ValueError):
    """A folder of captioned images that cannot be read as asked: the message names the file."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    repeats: int = 1


@dataclass
class CaptionedImages:
    """The captioned images of one folder (sorted by path) and what was left out of it."""

    folder: Path
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.examples]

    def rows(self) -> np.ndarray:
        """The example behind each row of an epoch: example k appears ``repeats`` times."""
        return np.repeat(np.arange(len(self.examples)), [e.repeats for e in self.examples])

    def fingerprint(self) -> str:
        """Changes when any image (path, size, modification time), caption or repeat count does."""
        h = hashlib.sha256()
        for e in self.examples:
            st = e.path.stat()
            h.update(json.dumps([str(e.path.relative_to(self.folder)), st.st_size, st.st_mtime_ns, e.caption,
                                 e.repeats]).encode())
        return h.hexdigest()


def scan(folder: str | os.PathLike, *, caption_column: str = "text", caption_extension: str = ".txt",
         on_error: str = "fail", check: str | None = "header") -> CaptionedImages:
    """The captioned images of ``folder`` (see the module's docstring for the layouts).

    ``on_error``: "fail" raises ``CaptionFolderError`` naming the first image that is unreadable or has no
    caption (and how many more there are); "skip" leaves them out and prints one line counting them.
    ``check``: "header" opens every image's header here (fast: catches non-images and broken headers),
    "full" decodes every image, None trusts the files (an image that fails later raises, naming it).
    """
    folder = Path(folder)
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if check not in ("header", "full", None):
        raise ValueError(f"check must be 'header', 'full' or None, got {check!r}")
    if not folder.is_dir():
        raise CaptionFolderError(f"{folder}: no such folder (expected images with metadata.jsonl or .txt captions)")
    problems: list[tuple[Path, str]] = []
    meta = next((folder / m for m in METADATA_FILES if (folder / m).is_file()), None)
    if meta is not None:
        examples = _from_metadata(folder, meta, caption_column, problems)
    else:
        if not caption_extension.startswith(".") or caption_extension in IMAGE_EXTENSIONS:
            raise ValueError(f"caption_extension must be a file extension such as '.txt', got {caption_extension!r}")
        examples = _from_caption_files(folder, caption_extension, problems)
    if check is not None:
        readable = []
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # file reads and decoding release the GIL
            verdicts = list(pool.map(lambda e: _unreadable(e.path, full=check == "full"), examples))
        for e, why in zip(examples, verdicts, strict=True):
            if why is None:
                readable.append(e)
            else:
                problems.append((e.path, why))
        examples = readable
    if problems:
        problems.sort(key=lambda pw: str(pw[0]))
        first, why = problems[0]
        if on_error == "fail":
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CaptionFolderError(f"{first}: {why}{more}; fix it, or pass on_error='skip' to leave such "
                                     f"images out")
        kinds = {}
        for _, reason in problems:
            kind = "unreadable" if reason.startswith("unreadable") else "without a caption"
            kinds[kind] = kinds.get(kind, 0) + 1
        counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        print(f"{folder}: skipped {len(problems)} of {len(problems) + len(examples)} images ({counts}); "
              f"the first: {first}: {why}", file=sys.stderr)
    if not examples:
        raise CaptionFolderError(f"{folder}: no captioned images (expected images with a metadata.jsonl listing "
                                 f"file_name and {caption_column}, or a {caption_extension} caption beside each)")
    return CaptionedImages(folder, examples, problems)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _walk_images(folder: Path, metadata_below: list | None = None) -> list[Path]:
    """Every image under ``folder`` (hidden files and folders left out), sorted by path; metadata files
    found in sub-folders are appended to ``metadata_below``."""
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(files) if _is_image(Path(f))]
        if metadata_below is not None and Path(dirpath) != folder:
            metadata_below += [Path(dirpath) / f for f in files if f in METADATA_FILES]
    return sorted(out, key=lambda p: p.relative_to(folder).parts)


def _metadata_rows(meta: Path, problems):
    """(line number, row dict) of a metadata.jsonl or metadata.csv; a line that is not an object is a problem."""
    text = meta.read_text(encoding="utf-8")
    if meta.suffix == ".csv":
        for n, row in enumerate(csv.DictReader(text.splitlines()), 2):
            yield n, row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append((meta, f"without a caption: line {n} is not JSON ({e})"))
            continue
        if not isinstance(row, dict):
            problems.append((meta, f"without a caption: line {n} is not a JSON object"))
            continue
        yield n, row


def _from_metadata(folder: Path, meta: Path, column: str, problems) -> list[Example]:
    listed: dict[Path, Example] = {}
    for n, row in _metadata_rows(meta, problems):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append((meta, f"without a caption: line {n} has no file_name"))
            continue
        path = folder / name
        caption = row.get(column)
        if not path.is_file():
            problems.append((path, f"unreadable: listed in {meta.name} line {n}, but there is no such file"))
        elif not isinstance(caption, str):
            problems.append((path, f"without a caption: {meta.name} line {n} has no {column!r} string"))
        else:
            listed[path.resolve()] = Example(path, caption)
    for p in _walk_images(folder):
        if p.resolve() not in listed:
            problems.append((p, f"without a caption: not listed in {meta.name}"))
    return sorted(listed.values(), key=lambda e: e.path.relative_to(folder).parts)


def _from_caption_files(folder: Path, extension: str, problems) -> list[Example]:
    examples, metadata_below = [], []
    images = _walk_images(folder, metadata_below)
    if metadata_below:  # an ImageFolder of splits (train/metadata.jsonl, ...): one split is one folder
        raise CaptionFolderError(f"{folder}: no metadata.jsonl at the top, but {metadata_below[0]} below it: pass "
                                 f"the folder that holds the metadata file (one split)")
    for p in images:
        top = p.relative_to(folder).parts
        repeat = REPEAT_FOLDER.match(top[0]) if len(top) > 1 else None
        caption_file = p.with_suffix(extension)
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                problems.append((p, f"without a caption: {caption_file.name} cannot be read as UTF-8 text ({e})"))
                continue
        elif repeat is not None:
            caption = repeat.group(2)  # kohya: the folder's class words caption its uncaptioned images
        else:
            problems.append((p, f"without a caption: no {caption_file.name} beside it"))
            continue
        examples.append(Example(p, caption, int(repeat.group(1)) if repeat else 1))
    return examples


def _unreadable(path: Path, full: bool) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if full:
                im.load()
            elif im.width < 1 or im.height < 1:
                return "unreadable: an empty image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------------------
# one image


def load_image(path: str | os.PathLike, resolution: int, *, crop: str = "center", flip: bool = False,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """One image as uint8 (resolution, resolution, 3): shorter side resized to ``resolution``, cropped to a
    square at the centre or (``crop="random"``, drawn from ``rng``) anywhere, mirrored if ``flip``.
    Raises ``CaptionFolderError`` naming the file if Pillow cannot decode it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16-bit greyscale (PNG): to 8 bits, not clipped at 255
                im = Image.fromarray(np.round(np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            if size != (w, h):
                im = im.resize(size, Image.Resampling.BICUBIC)
            x = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CaptionFolderError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    h, w = x.shape[:2]
    if crop == "random":
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    x = x[top : top + resolution, left : left + resolution]
    return np.ascontiguousarray(x[:, ::-1] if flip else x)


# ---------------------------------------------------------------------------------------------------------
# batches


def _captions_to_y(captions: Sequence[str], tokenize: Callable | None) -> np.ndarray:
    """Token ids (N, L) int32 from ``tokenize`` (a CLIPTokenizer's (ids, mask) gives its ids); without
    one, each example's index, for a loss that looks its caption up itself."""
    if tokenize is None:
        return np.arange(len(captions), dtype=np.int32)
    out = tokenize(list(captions))
    ids = np.asarray(out[0] if isinstance(out, tuple) else out)
    if ids.ndim != 2 or ids.shape[0] != len(captions) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokenize must give integer ids of shape ({len(captions)}, length), got {ids.dtype} "
                         f"{ids.shape}")
    return ids.astype(np.int32)


class _Order:
    """Which example fills each of this process's rows of global batch ``index``, and the random draws
    for it: the permutation of epoch e from (seed, e), an example's draws from (seed, index, row)."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
                not 1 <= batch_size <= len(rows):
            raise ValueError(f"batch_size must be in 1..{len(rows)} (the rows of an epoch, repeats counted), "
                             f"got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
        self.epoch_rows, self.batch_size, self.seed = rows, int(batch_size), int(seed)
        self.per_epoch = len(rows) // self.batch_size
        self.local = distributed.local_rows(self.batch_size)
        self._epoch, self._perm = -1, None

    def examples(self, index: int) -> tuple[np.ndarray, range]:
        """(example per local row, the rows' places in the global batch)."""
        epoch, i = divmod(int(index), self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.epoch_rows))
            self._epoch = epoch
        batch = self.epoch_rows[self._perm[i * self.batch_size : (i + 1) * self.batch_size]]
        return batch[self.local], range(self.local.start, self.local.stop)

    def rng(self, index: int, row: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), row])


class CaptionedBatches:
    """Batches of decoded images and their captions' token ids, for ``trainer.fit``.

    ``batches(i)`` -> (images uint8 (rows, resolution, resolution, 3), ids int32 (rows, L)) for this
    process's rows of global batch i; ``stack(start, k)`` stacks k consecutive batches. ``tokenize``:
    captions -> ids (e.g. the pipeline's CLIPTokenizer), run once over every caption here; None gives
    each row's example index instead. ``workers``: threads decoding a batch (Pillow releases the GIL).
    """

    def __init__(self, images: CaptionedImages, batch_size: int, seed: int = 0, *, resolution: int = 512,
                 crop: str = "center", flip: bool = False, tokenize: Callable | None = None,
                 workers: int | None = None):
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.images, self.resolution, self.crop, self.flip = images, int(resolution), crop, bool(flip)
        self.order = _Order(images.rows(), batch_size, seed)
        self.batch_size, self.per_epoch = self.order.batch_size, self.order.per_epoch
        self.y = _captions_to_y(images.captions, tokenize)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def _one(self, example: int, index: int, row: int) -> np.ndarray:
        rng = self.order.rng(index, row)
        flip = self.flip and bool(rng.random() < 0.5)
        return load_image(self.images.examples[example].path, self.resolution, crop=self.crop, flip=flip, rng=rng)

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        examples, rows = self.order.examples(index)
        jobs = [(int(e), index, r) for e, r in zip(examples, rows, strict=True)]
        pixels = list(self._pool.map(lambda a: self._one(*a), jobs)) if self._pool else [self._one(*a) for a in jobs]
        return np.stack(pixels), self.y[examples]

    def stack(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self(start + k) for k in range(count)), strict=True)
        return np.stack(xs), np.stack(ys)


# ---------------------------------------------------------------------------------------------------------
# the latent cache


class LatentCache:
    """Latents of every image (and its mirror) at the centre crop, with the captions' ids or text states,
    in a folder: ``latents.npy`` (N, 2 or 1, h, w, c), ``ids.npy`` (N, L) int32 and/or ``text.npy``
    (N, L, D), ``cache.json`` (what they were made from). Read with memory maps: a batch reads its rows."""

    FILES = ("latents.npy", "ids.npy", "text.npy")

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "cache.json").read_text())
        self.latents = np.load(self.folder / "latents.npy", mmap_mode="r")
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r") if (self.folder / "ids.npy").exists() else None
        self.text = np.load(self.folder / "text.npy", mmap_mode="r") if (self.folder / "text.npy").exists() else None

    @property
    def flips(self) -> bool:
        return self.latents.shape[1] == 2

    @classmethod
    def build(cls, images: CaptionedImages, folder: str | os.PathLike, encode: Callable, *, resolution: int,
              flips: bool = True, tokenize: Callable | None = None, encode_text: Callable | None = None,
              batch_size: int = 16, key: str = "", dtype=np.float32) -> LatentCache:
        """The cache for ``images`` in ``folder``: reused if it was made from the same images, captions,
        resolution, flips and ``key`` (name the encoder there, e.g. the model folder), else (re)built.

        ``encode(uint8 images (n, r, r, 3)) -> latents (n, h, w, c)``, called on batches of ``batch_size``
        (the last one padded, so a jitted encoder compiles once); it decides what a latent is (a draw from
        the VAE's posterior, or its mean), already scaled as the loss wants it. ``flips``: encode each
        mirror image too, so batches can flip. ``tokenize``: captions -> ids, stored; ``encode_text``: ids ->
        text states (n, L, D), stored (it needs ``tokenize``). In a run of several processes, process 0
        builds it and the others wait for it (the folder must be one they all see).
        """
        folder = Path(folder)
        if encode_text is not None and tokenize is None:
            raise ValueError("encode_text needs tokenize: the text states are made from the captions' ids")
        want = {"fingerprint": images.fingerprint(), "resolution": int(resolution), "flips": bool(flips),
                "key": key, "ids": tokenize is not None, "text": encode_text is not None,
                "dtype": np.dtype(dtype).name, "images": len(images)}
        reason = cls._stale(folder, want)
        if reason is not None and jax.process_index() == 0:
            print(f"latent cache {folder}: {reason}; encoding {len(images)} images"
                  f"{' and their mirrors' if flips else ''} ...", file=sys.stderr)
            cls._write(images, folder, encode, tokenize, encode_text, want, batch_size, dtype)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdiff: latent cache built")
        return cls(folder)

    @classmethod
    def _stale(cls, folder: Path, want: dict) -> str | None:
        try:
            have = json.loads((folder / "cache.json").read_text())
        except (OSError, ValueError):
            return "none yet" if not folder.exists() else "unreadable"
        changed = [k for k in want if have.get(k) != want[k]]
        if not changed:
            return None
        if "fingerprint" in changed:
            return "made from other images or captions"
        return f"made with other {', '.join(changed)}"

    @classmethod
    def _write(cls, images, folder, encode, tokenize, encode_text, meta, batch_size, dtype) -> None:
        tmp = folder.parent / f".{folder.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            views = 2 if meta["flips"] else 1
            latents = None
            n = len(images)
            for start in range(0, n, batch_size):
                chunk = list(range(start, min(start + batch_size, n)))
                pixels = np.stack(list(pool.map(lambda i: load_image(images.examples[i].path, meta["resolution"]),
                                                chunk)))
                for v in range(views):
                    z = _encode_padded(encode, pixels[:, :, ::-1] if v else pixels, batch_size)
                    if latents is None:
                        latents = np.lib.format.open_memmap(tmp / "latents.npy", "w+", np.dtype(dtype),
                                                            (n, views, *z.shape[1:]))
                    latents[chunk, v] = z
            latents.flush()
            del latents
            if tokenize is not None:
                ids = _captions_to_y(images.captions, tokenize)
                np.save(tmp / "ids.npy", ids)
                if encode_text is not None:
                    text = np.concatenate([_encode_padded(encode_text, ids[s : s + batch_size], batch_size)
                                           for s in range(0, n, batch_size)])
                    np.save(tmp / "text.npy", text.astype(dtype))
            (tmp / "cache.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks a whole cache
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        finally:
            pool.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _encode_padded(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
    n = len(x)
    if n < batch_size:
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    return np.asarray(fn(x))[:n]


class CachedBatches:
    """Batches from a ``LatentCache``: (latents float (rows, h, w, c), ids int32 (rows, L) or text states
    (rows, L, D)) for this process's rows, in the order and with the flips ``CaptionedBatches`` would
    draw for the same seed. ``text``: give the stored text states instead of the ids."""

    def __init__(self, images: CaptionedImages, cache: LatentCache, batch_size: int, seed: int = 0, *,
                 flip: bool = False, text: bool = False):
        if cache.latents.shape[0] != len(images):
            raise ValueError(f"the cache in {cache.folder} holds {cache.latents.shape[0]} images, the folder "
                             f"{len(images)}: build it from these images")
        if flip and not cache.flips:
            raise ValueError(f"flip=True but the cache in {cache.folder} was built without mirror images "
                             f"(flips=False): rebuild it with flips=True")
        y = cache.text if text else cache.ids
        if y is None:
            raise ValueError(f"the cache in {cache.folder} holds no {'text states' if text else 'token ids'}: "
                             f"build it with {'encode_text' if text else 'tokenize'}")
        self.cache, self.flip, self.y = cache, bool(flip), y
        self.order = _Order(images.rows(), batch_size, seed)
        self.batch_size, self.per_epoch = self.order.batch_size, self.order.per_epoch

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        examples, rows = self.order.examples(index)
        views = [int(self.flip and self.order.rng(index, r).random() < 0.5) for r in rows]
        return np.asarray(self.cache.latents[examples, views]), np.asarray(self.y[examples])

    def stack(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self(start + k) for k in range(count)), strict=True)
        return np.stack(xs), np.stack(ys)
