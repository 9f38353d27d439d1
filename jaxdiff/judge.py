"""The evaluation classifier that judges samples: class accuracy, and FID in its features.

docs/QUALITY.md's protocol: an ``EvalClassifier`` trained on a dataset's training split (clean
images, random shifts of up to 2 pixels), never used for guidance. Accuracy is the share of
samples it assigns to the label asked for; FID is the Frechet distance between Gaussians fitted
to its penultimate (128-d) features of the samples and of the real test split::

    judge = Judge.train_or_load("runs/eval_fashion_mnist", images, labels, dataset="fashion_mnist")
    judge.accuracy(samples, asked)                       # in [0, 1]
    judge.fid(samples, judge.feature_stats(test_images))
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath

from jaxdiff import data, metrics, specs, train, trainer
from jaxdiff.checkpoint import CheckpointError, Checkpoints

CHANNELS = (32, 64, 128)


class Judge:
    """A trained evaluation classifier, applied to uint8 images in chunks of ``batch``."""

    def __init__(self, spec: specs.EvalClassifier, params, dataset: str | None = None, batch: int = 1000):
        net = spec.module()
        self.spec, self.dataset, self.batch = spec, dataset, batch
        self._logits = jax.jit(lambda p, x: net.apply(p, data.to_float(x)))
        self._features = jax.jit(lambda p, x: net.apply(p, data.to_float(x), features=True))
        self.params = params

    def logits(self, images) -> np.ndarray:
        return self._chunks(self._logits, images)

    def features(self, images) -> np.ndarray:
        return self._chunks(self._features, images)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.logits(images).argmax(-1) == np.asarray(labels)))

    def feature_stats(self, images):
        return metrics.feature_stats(self.features(images))

    def fid(self, images, reference_stats) -> float:
        return metrics.frechet_distance(*self.feature_stats(images), *reference_stats)

    def _chunks(self, fn, images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != tuple(self.spec.image_shape):
            shape = ", ".join(map(str, self.spec.image_shape))
            raise ValueError(f"the judge reads uint8 images of shape (N, {shape}), "
                             f"got {images.dtype} {images.shape}")
        return np.concatenate([np.asarray(fn(self.params, images[i : i + self.batch]))
                               for i in range(0, len(images), self.batch)])

    @classmethod
    def load(cls, directory) -> Judge:
        from jaxdiff.pipeline import checkpoint_folder, load_model

        folder = checkpoint_folder(directory)
        spec, _, params = load_model(folder, expect="eval_classifier")
        with Checkpoints(folder) as ckpt:
            dataset = ckpt.config().get("meta", {}).get("dataset")
        return cls(spec, params, dataset)

    @classmethod
    def train_or_load(cls, directory, images, labels, *, dataset: str, steps: int = 3000, batch_size: int = 256,
                      seed: int = 0, progress: bool = True) -> Judge:
        """The judge in ``directory``, trained there first (``steps`` steps of ``batch_size`` on the
        given training images) if it holds none. A judge of another dataset is refused."""
        folder = epath.Path(directory) / "checkpoints"
        if not _has_checkpoint(folder):
            spec = specs.EvalClassifier(num_classes=int(labels.max()) + 1, channels=CHANNELS,
                                        image_shape=tuple(images.shape[1:]))
            config = trainer.TrainConfig(steps=steps, batch_size=min(batch_size, len(images)), seed=seed,
                                         save_every=steps)
            trainer.fit(spec, train.clean_classifier_loss(spec.module().apply), data.Batches(images, labels,
                        config.batch_size, seed), config, directory=folder, meta={"dataset": dataset},
                        progress=progress, label="evaluation classifier")
        judge = cls.load(directory)
        if judge.dataset != dataset:
            raise ValueError(f"{directory} judges {judge.dataset}, not {dataset}")
        return judge


def _has_checkpoint(folder) -> bool:
    if not folder.is_dir():
        return False
    try:
        with Checkpoints(folder) as ckpt:
            return ckpt.latest_step() is not None
    except CheckpointError:
        return False
