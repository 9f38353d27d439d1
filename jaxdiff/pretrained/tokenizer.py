"""CLIP's byte-level BPE tokenizer, built with the ``tokenizers`` package from a tokenizer folder.

The pipeline, stage by stage (Radford et al.'s CLIP tokenizer as transformers' CLIPTokenizer runs it):

1. special tokens written in the text (``<|endoftext|>``, SD 2.x's pad token ``!``) are cut out
   first and keep their ids; each one matches the raw text or, if its ``normalized`` flag is set,
   the normalised text (the flags come from the tokenizer config: see ``_special_tokens``);
2. normalise: Unicode NFC, every whitespace run -> one space, lower case;
3. pre-tokenise with CLIP's pattern: the special-token strings, the contractions 's 't 're 've 'm
   'll 'd, runs of letters, single digits, runs of anything else but whitespace; whitespace is
   dropped. Then byte-level: each UTF-8 byte becomes its printable stand-in (GPT-2's table); its
   own GPT-2 split is kept because it changes one thing: a special-token string that survived as
   text is cut into ``<|``, ``endoftext``, ``|>``;
4. BPE over each piece with the merges in rank order, the last symbol carrying ``</w>``;
5. ``<|startoftext|>`` ... ``<|endoftext|>`` around the ids; truncation to ``model_max_length``
   (77) keeps both; padding to it with the pad token the config names.

The result is ``(ids, mask)``, int32 NumPy arrays of shape (N, model_max_length).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiff.pretrained.folder import read_json

# CLIP's pre-tokenisation pattern (Radford et al.), matched on lower-cased text
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")  # in transformers' order
DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


class TokenizerConfigError(ValueError):
    """A tokenizer folder that is incomplete or inconsistent."""


class CLIPTokenizer:
    """``tokenizer(prompts) -> (ids, mask)``: int32 arrays of shape (N, max_length).

    Build it with ``CLIPTokenizer.from_folder(<sd>/tokenizer)`` (or ``load_tokenizer``).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        special_tokens: dict[str, dict],
        max_length: int = 77,
        added_tokens: Sequence[dict] = (),
        source: str = "merges",
    ):
        """``special_tokens``: attribute (bos_token, eos_token, unk_token, pad_token) -> a dict with
        ``content`` and optionally the flags ``normalized``, ``lstrip``, ``rstrip``, ``single_word``.
        ``added_tokens``: further tokens in the same form, each with its ``id`` (applied first).
        ``source``: what errors call the merges (the file they came from)."""
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        if not isinstance(max_length, int) or max_length < 2:
            raise TokenizerConfigError(
                f"max_length must be an integer >= 2 (room for the start and end tokens), got {max_length!r}"
            )
        missing = [a for a in SPECIAL_ATTRIBUTES if a not in special_tokens]
        if missing:
            raise TokenizerConfigError(f"special_tokens lacks {', '.join(missing)}")
        for attr in SPECIAL_ATTRIBUTES:
            content = special_tokens[attr]["content"]
            if content not in vocab:
                raise TokenizerConfigError(f"{attr} {content!r} is not in the vocabulary")
        _check_merges(vocab, merges, source)
        self.vocab_size = len(vocab)
        # the largest id the tokenizer can emit: what the text encoder's embedding table must cover
        ids = [int(i) for i in vocab.values()] + [int(t["id"]) for t in added_tokens if isinstance(t.get("id"), int)]
        self.max_token_id = max(ids)
        self.max_length = max_length
        # kept as given, so ``save`` can write the folder back
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.added_tokens = [dict(t) for t in added_tokens]
        self.special_tokens = {a: dict(special_tokens[a]) for a in SPECIAL_ATTRIBUTES}
        self.bos_token_id = vocab[special_tokens["bos_token"]["content"]]
        self.eos_token_id = vocab[special_tokens["eos_token"]["content"]]
        self.pad_token_id = vocab[special_tokens["pad_token"]["content"]]

        tok = Tokenizer(
            BPE(
                vocab=dict(vocab),
                merges=[tuple(m) for m in merges],
                end_of_word_suffix="</w>",
                unk_token=special_tokens["unk_token"]["content"],
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

        def added(spec: dict) -> AddedToken:
            return AddedToken(
                spec["content"],
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", False)),  # a special token's default: raw text
                special=True,
            )

        # added one by one in transformers' order, so a later flag for the same content wins
        for spec in list(added_tokens) + [special_tokens[a] for a in SPECIAL_ATTRIBUTES]:
            tok.add_special_tokens([added(spec)])
        bos, eos = special_tokens["bos_token"]["content"], special_tokens["eos_token"]["content"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, self.bos_token_id), (eos, self.eos_token_id)]
        )
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(
            length=max_length, pad_id=self.pad_token_id, pad_token=special_tokens["pad_token"]["content"]
        )
        self._tok = tok

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """A tokenizer folder as diffusers ships it: ``vocab.json`` + ``merges.txt`` (or a
        ``tokenizer.json`` holding a BPE model), ``tokenizer_config.json`` and, in the older layout,
        ``special_tokens_map.json``. Special tokens follow transformers' precedence: when
        tokenizer_config.json has ``added_tokens_decoder`` its own entries hold (with the flags
        listed there); otherwise special_tokens_map.json overrides tokenizer_config.json. A token
        given as a plain string matches raw text only (``normalized`` false)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerConfigError(f"{folder}: no such tokenizer folder")
        config = _read_json(folder / "tokenizer_config.json", required=False) or {}
        added_tokens: list[dict] = []
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
            source = str(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges, added_tokens = _read_tokenizer_json(folder / "tokenizer.json")
            source = str(folder / "tokenizer.json")
        else:
            raise TokenizerConfigError(
                f"{folder}: expected vocab.json and merges.txt (or tokenizer.json), found "
                f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}"
            )
        specials = _special_tokens(folder, config, added_tokens)
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 10**6:  # transformers' "unset" is 1e30
            raise TokenizerConfigError(
                f"{folder / 'tokenizer_config.json'}: model_max_length must be the text encoder's length "
                f"(77 for CLIP), got {max_length!r}"
            )
        return cls(vocab, merges, special_tokens=specials, max_length=max_length, added_tokens=added_tokens,
                   source=source)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` for one prompt or a list: int32 arrays of shape (N, max_length); the
        mask is 1 on the start token, the prompt's tokens and the end token, 0 on padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"prompts must be a string or a sequence of strings, got {[type(p).__name__ for p in prompts]}"
            )
        if not prompts:
            shape = (0, self.max_length)
            return np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        encodings = self._tok.encode_batch(prompts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
        return ids, mask

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the tokenizer as a folder ``from_folder`` and transformers' CLIPTokenizer both read:
        ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` whose ``added_tokens_decoder`` lists
        the special (and added) tokens with their flags, so they match text as they did here."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        decoder = {}
        for spec in self.added_tokens + [self.special_tokens[a] for a in SPECIAL_ATTRIBUTES]:
            token_id = spec.get("id", self.vocab.get(spec["content"]))
            decoder[str(token_id)] = {
                "content": spec["content"],
                **{flag: bool(spec.get(flag, False)) for flag in ("lstrip", "normalized", "rstrip", "single_word")},
                "special": bool(spec.get("special", True)),
            }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
            **{a: self.special_tokens[a]["content"] for a in SPECIAL_ATTRIBUTES},
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        return folder

    def dropped(self, prompts: Sequence[str]) -> list[str]:
        """Per prompt, the text truncation to ``max_length`` cuts off ("" when it all fits)."""
        out = []
        for prompt, e in zip(prompts, self._tok.encode_batch(list(prompts)), strict=True):
            starts = [a for o in e.overflowing for (a, b) in o.offsets if b > a]
            out.append(prompt[min(starts):] if starts else "")
        return out

    def tokens(self, prompt: str) -> list[str]:
        """The token strings of one prompt, without padding: for looking, not for the model."""
        e = self._tok.encode(prompt)
        return [t for t, m in zip(e.tokens, e.attention_mask, strict=True) if m]


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)


def _read_json(path: Path, required: bool = True):
    if not required and not path.is_file():
        return None
    return read_json(path, TokenizerConfigError)


def _check_merges(vocab: dict, merges, source: str) -> None:
    """Every merge's two symbols and their join must be in the vocabulary (``tokenizers`` refuses it
    otherwise, deep in a traceback that names no file)."""
    for n, (a, b) in enumerate(merges, 1):
        for symbol in (a, b, a + b):
            if symbol not in vocab:
                raise TokenizerConfigError(
                    f"{source}: merge {n} ({a!r}, {b!r}): {symbol!r} is not in the vocabulary; the merges do not "
                    f"belong to this vocab"
                )


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerConfigError(f"{path}:{n}: a merge must be two symbols separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list, list]:
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise TokenizerConfigError(f"{path}: expected a BPE model with vocab and merges")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if any(len(m) != 2 for m in merges):
        raise TokenizerConfigError(f"{path}: every merge must be a pair of symbols")
    added = [t for t in data.get("added_tokens", []) if isinstance(t, dict) and isinstance(t.get("content"), str)]
    return model["vocab"], merges, sorted(added, key=lambda t: t.get("id", 0))


def _special_tokens(folder: Path, config: dict, added_tokens: list[dict]) -> dict[str, dict]:
    """attribute -> {content, flags}, resolved the way transformers resolves them."""
    values = {a: config.get(a) for a in SPECIAL_ATTRIBUTES}
    known = {}
    if "added_tokens_decoder" in config:
        known = {t["content"]: t for t in config["added_tokens_decoder"].values() if isinstance(t, dict)}
    else:
        smap = _read_json(folder / "special_tokens_map.json", required=False) or {}
        for a in SPECIAL_ATTRIBUTES:
            if smap.get(a) is not None:
                values[a] = smap[a]
    known.update({t["content"]: t for t in added_tokens if "content" in t})
    out = {}
    for a in SPECIAL_ATTRIBUTES:
        v = values[a] if values[a] is not None else DEFAULTS[a]
        content = v.get("content") if isinstance(v, dict) else v
        if not isinstance(content, str) or not content:
            raise TokenizerConfigError(f"{folder}: {a} must be a string or a token dict with 'content', got {v!r}")
        if content in known:  # a listed added token brings its own flags
            spec = known[content]
        elif isinstance(v, dict):
            spec = v
        else:
            spec = {"content": content, "normalized": False}
        out[a] = {k: spec[k] for k in ("content", "normalized", "lstrip", "rstrip", "single_word") if k in spec}
    return out
