"""Captions made from class labels with varied templates, for contrastive text-image training
and text-to-image prompts. Held-out templates test whether the text space generalises."""

from __future__ import annotations

import numpy as np

CLASS_NAMES = {
    "mnist": [("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
              ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9")],
    "fashion_mnist": [("t shirt", "top"), ("trouser", "pants"), ("pullover", "sweater"), ("dress", "dress"),
                      ("coat", "coat"), ("sandal", "sandal"), ("shirt", "shirt"), ("sneaker", "sneaker"),
                      ("bag", "bag"), ("ankle boot", "boot")],
}
TRAIN_TEMPLATES = {
    "mnist": ["a handwritten {name}", "the digit {digit}", "{digit}", "a picture of the digit {name}",
              "a hand drawn {digit}", "{name}"],
    "fashion_mnist": ["a photo of a {name}", "a {name}", "{name}", "a picture of a {alt}", "a black and white {name}"],
}
# never seen in training: the zero-shot check of the text space
HELD_OUT_TEMPLATES = {
    "mnist": ["the number {name}", "number {digit} written by hand"],
    "fashion_mnist": ["an image of a {alt}", "a small photo of the {name}"],
}


def caption(dataset: str, label: int, template: str) -> str:
    name, alt = CLASS_NAMES[dataset][label]
    return template.format(name=name, digit=alt, alt=alt)


def random_captions(dataset: str, labels, rng: np.random.Generator, templates=None) -> list[str]:
    templates = templates or TRAIN_TEMPLATES[dataset]
    return [caption(dataset, int(y), templates[rng.integers(len(templates))]) for y in labels]


def all_texts(dataset: str) -> list[str]:
    """Every caption any template can make, for building the tokenizer's vocabulary."""
    ts = TRAIN_TEMPLATES[dataset] + HELD_OUT_TEMPLATES[dataset]
    return [caption(dataset, y, t) for t in ts for y in range(len(CLASS_NAMES[dataset]))]
