"""CLIP's tokenizer from the BPE merges shipped with jaxdiff, for checkpoints that carry no tokenizer.

A single-file Stable Diffusion checkpoint holds weights only. CLIP's vocabulary is a function of its
merges list (Radford et al.; the 48,894 merges in ``data/clip_bpe_merges.txt.gz``):

    ids 0..255       the 256 byte symbols, in GPT-2's byte -> printable-character order
    ids 256..511     the same symbols with the end-of-word mark ``</w>``
    ids 512..49405   each merge's joined symbol, in merge order
    49406, 49407     ``<|startoftext|>``, ``<|endoftext|>``

so "a photo of a cat" is 49406, 320 ("a</w>" = 256 + 64), 1125, 539, 320, 2368, 49407. SD 1.x's tokenizer
pads with ``<|endoftext|>``; SD 2.x's (OpenCLIP's convention) with ``!``, id 0.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from jaxdiff.pretrained.tokenizer import CLIPTokenizer

MERGES_FILE = "clip_bpe_merges.txt.gz"
NUM_MERGES = 49408 - 512 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
# what SD's tokenizer folders say: start, end and unknown tokens match normalised text; pad is a plain string
PAD_TOKENS = {"sd1": END, "sd2": "!"}


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the bytes 0..255, in vocabulary order: the printable Latin-1
    bytes as themselves first, then the rest mapped to code points 256 upwards (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


@lru_cache(maxsize=1)
def merges() -> tuple[tuple[str, str], ...]:
    data = resources.files("jaxdiff.pretrained").joinpath("data", MERGES_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    body = [line for line in lines[1:] if line]  # the first line is the "#version" header
    if len(body) != NUM_MERGES:
        raise ValueError(f"jaxdiff/pretrained/data/{MERGES_FILE}: expected {NUM_MERGES} merges, found {len(body)}; "
                         f"the package data is damaged: reinstall jaxdiff")
    return tuple(tuple(line.split(" ")) for line in body)


@lru_cache(maxsize=1)
def vocabulary() -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges()] + [START, END]
    return {t: i for i, t in enumerate(tokens)}


@lru_cache(maxsize=4)
def bundled_tokenizer(pad: str = "sd1", max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer as SD 1.x (``pad="sd1"``) or SD 2.x (``pad="sd2"``) folders configure it (built once
    per setting: a call only reads it)."""
    if pad not in PAD_TOKENS:
        raise ValueError(f"pad must be one of {', '.join(map(repr, PAD_TOKENS))}, got {pad!r}")
    token = lambda content: {"content": content, "normalized": True, "lstrip": False, "rstrip": False,
                             "single_word": False}
    specials = {"bos_token": token(START), "eos_token": token(END), "unk_token": token(END),
                "pad_token": {"content": PAD_TOKENS[pad], "normalized": False}}
    return CLIPTokenizer(vocabulary(), merges(), special_tokens=specials, max_length=max_length,
                         source=f"jaxdiff/pretrained/data/{MERGES_FILE}")
