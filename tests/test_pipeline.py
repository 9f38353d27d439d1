"""The pipeline's plumbing (conditions, negatives, gamma, classifier guidance) on the exact
mixture, where the right answer is known, and the checks on what users pass in."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assign

from jaxdiff import conditions
from jaxdiff.nets.text import Tokenizer
from jaxdiff.pipeline import Pipeline


def mixture_pipeline(gm, schedule, classifier=None):
    exact = gm.cond_eps_fn(schedule)
    return Pipeline(lambda p, x, t, y: exact(x, t, y), None, schedule, conditions.Labels(gm.num_components), (2,),
                    clip_x0=None, classifier=classifier)


class ExactClassifier:
    """A 'network' whose logits are the mixture's exact log p(y | x_t)."""

    def __init__(self, gm, schedule):
        self.gm, self.schedule, self.num_classes = gm, schedule, gm.num_components

    def apply(self, params, x, t):
        return self.gm.log_posterior(x, self.schedule.alpha_bar(t))


def share(gm, x, k):
    return float(np.mean(assign(gm, np.asarray(x)) == k))


def test_labels_sample_their_component_and_gamma_zero_the_mixture(mixture2d, linear_schedule):
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    n = 3000
    x = pipe.sample(np.full(n, 2), gamma=1.0, seed=0)
    assert x.shape == (n, 2)
    assert share(mixture2d, x, 2) > 0.97
    x = pipe.sample(np.full(n, 2), gamma=0.0, seed=1)  # the null label: the whole mixture
    np.testing.assert_allclose([share(mixture2d, x, k) for k in range(3)], [0.5, 0.3, 0.2], atol=0.035)


def test_negative_condition_gives_the_closed_form(overlapping2d, linear_schedule):
    """Two components with one covariance S: guiding toward 0 and away from 1 samples
    p0^gamma / p1^(gamma - 1) = N(gamma m0 - (gamma - 1) m1, S), at every t, exactly."""
    pipe = mixture_pipeline(overlapping2d, linear_schedule)
    y = np.zeros(4000, np.int32)
    # with gamma 1 the negative cancels out: exactly the conditional eps
    np.testing.assert_allclose(pipe.sample(y, negative=1, gamma=1.0, seed=3), pipe.sample(y, gamma=1.0, seed=3), atol=1e-5)
    x = np.asarray(pipe.sample(y, negative=[1], gamma=1.5, seed=4), np.float64)
    np.testing.assert_allclose(x.mean(0), [1.5 * -0.6 - 0.5 * 0.6, 0.0], atol=0.04)
    np.testing.assert_allclose(np.cov(x.T), 0.5 * np.eye(2), atol=0.05)


def test_exact_classifier_guidance_at_gamma_one_is_the_conditional(mixture2d, linear_schedule):
    pipe = mixture_pipeline(mixture2d, linear_schedule, classifier=(ExactClassifier(mixture2d, linear_schedule), None))
    x = pipe.sample(np.full(3000, 1), gamma=1.0, seed=5)
    assert share(mixture2d, x, 1) > 0.97
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        pipe.sample([1], negative=[0])


def test_classifier_must_know_the_u_nets_classes(mixture2d, linear_schedule):
    config = {"num_classes": 4, "image_shape": [2]}
    with pytest.raises(ValueError, match="classifier knows 3 classes, the U-Net 4"):
        Pipeline.for_labels(None, None, linear_schedule, config, classifier=(ExactClassifier(mixture2d, linear_schedule), None))


def test_per_example_gamma_and_seeds(mixture2d, linear_schedule):
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    a = pipe.sample([0, 1], gamma=[1.0, 2.0], seed=0, steps=5)
    b = pipe.sample([0, 1], gamma=[1.0, 2.0], seed=0, steps=5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="gamma has 3 values for 2 images"):
        pipe.sample([0, 1], gamma=[1.0, 2.0, 3.0])
    for kwargs, msg in [({"condition": [3]}, r"labels must be in 0..2"), ({"condition": []}, "empty"),
                        ({"condition": [0.5]}, "integer class labels"), ({"condition": [0], "negative": [0, 1, 2]},
                                                                          "negative has 3 entries for 1 images"),
                        ({"condition": [0], "steps": 0}, "steps must be at least 1"),
                        ({"condition": [0], "gamma": np.inf}, "gamma must be finite")]:
        with pytest.raises(ValueError, match=msg):
            pipe.sample(**kwargs)


def test_low_res_condition():
    c = conditions.LowRes(low=14, size=28)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 14, 14, 1), dtype=np.uint8)
    host = c.host(imgs)
    np.testing.assert_allclose(host, imgs / 127.5 - 1.0, atol=1e-6)
    assert c.host(imgs[0, ..., 0]).shape == (1, 14, 14, 1)  # one (14, 14) image
    np.testing.assert_array_equal(c.host(imgs[1]), host[1:2])  # one (14, 14, 1) image
    up = np.asarray(c.network(None, host))
    assert up.shape == (3, 28, 28, 1)
    # bilinear 2x with half-pixel centres: output 2i+1 = 0.75 x[i] + 0.25 x[i+1], 2i+2 = 0.25 x[i] + 0.75 x[i+1]
    x = host[..., 0].astype(np.float64)
    rows = np.zeros((3, 26, 14))
    rows[:, 0::2], rows[:, 1::2] = 0.75 * x[:, :-1] + 0.25 * x[:, 1:], 0.25 * x[:, :-1] + 0.75 * x[:, 1:]
    both = np.zeros((3, 26, 26))
    both[:, :, 0::2], both[:, :, 1::2] = (0.75 * rows[:, :, :-1] + 0.25 * rows[:, :, 1:],
                                          0.25 * rows[:, :, :-1] + 0.75 * rows[:, :, 1:])
    np.testing.assert_allclose(up[:, 1:-1, 1:-1, 0], both, atol=1e-5)
    flat = np.asarray(c.network(None, np.full((1, 14, 14, 1), 0.25, np.float32)))
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(N, 14, 14, 1\)"):
        c.host(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        c.host(np.zeros((2, 14, 14, 1), np.float32))
    assert np.all(c.null(2) == 0) and c.null(2).shape == (2, 14, 14, 1)


def test_prompt_condition_checks_and_broadcast():
    c = conditions.Prompts(Tokenizer(["a", "three"], max_len=6), text_encoder=None)
    ids, mask = c.host("a three")
    assert ids.shape == (1, 6) and mask.sum() == 4
    with pytest.raises(ValueError, match="prompts must be strings"):
        c.host(["a", 3])
    with pytest.raises(ValueError, match="prompts is empty"):
        c.host([])
    ids, mask = conditions.broadcast(c.host("three"), 4, "negative")
    assert ids.shape == (4, 6) and np.all(ids == ids[0])
    null_ids, null_mask = c.null(2)
    assert null_mask.sum(1).tolist() == [2, 2]  # <bos> <eos>: the empty prompt


def test_downsample_against_numpy():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1))
    np.testing.assert_allclose(conditions.downsample(jnp.asarray(x)), x.reshape(2, 14, 2, 14, 2, 1).mean((2, 4)),
                               rtol=1e-5, atol=1e-6)
