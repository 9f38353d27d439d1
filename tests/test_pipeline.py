"""The pipeline's plumbing (conditions, negatives, gamma, classifier guidance) on the exact
mixture, where the right answer is known, and the checks on what users pass in."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assign

from jaxdiff import conditions, specs
from jaxdiff.nets.text import Tokenizer
from jaxdiff.pipeline import Pipeline


def mixture_pipeline(gm, schedule, classifier=False):
    """A label pipeline whose 'network' is the mixture's exact eps (and, with ``classifier``, whose
    noisy classifier's logits are the exact log p(y | x_t))."""
    exact = gm.cond_eps_fn(schedule)
    logits = (lambda p, x, t: gm.log_posterior(x, schedule.alpha_bar(t))) if classifier else None
    return Pipeline(lambda p, x, t, y: exact(x, t, y), {}, schedule, conditions.Labels(gm.num_components), (2,),
                    clip_x0=None, classifier=logits)


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
    np.testing.assert_allclose(pipe.sample(y, negative=1, gamma=1.0, seed=3), pipe.sample(y, gamma=1.0, seed=3),
                               atol=1e-5)
    x = np.asarray(pipe.sample(y, negative=[1], gamma=1.5, seed=4), np.float64)
    np.testing.assert_allclose(x.mean(0), [1.5 * -0.6 - 0.5 * 0.6, 0.0], atol=0.04)
    np.testing.assert_allclose(np.cov(x.T), 0.5 * np.eye(2), atol=0.05)


def test_exact_classifier_guidance_at_gamma_one_is_the_conditional(mixture2d, linear_schedule):
    pipe = mixture_pipeline(mixture2d, linear_schedule, classifier=True)
    x = pipe.sample(np.full(3000, 1), gamma=1.0, seed=5)
    assert share(mixture2d, x, 1) > 0.97
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        pipe.sample([1], negative=[0])


def test_classifier_must_know_the_u_nets_classes_and_schedule():
    from jaxdiff import specs

    unet = specs.LabelUNet(num_classes=4, channels=(8, 16), image_shape=(8, 8, 1))
    for clf, msg in [(specs.NoisyClassifier(num_classes=3, image_shape=(8, 8, 1)),
                      "classifier knows 3 classes, the U-Net 4"),
                     (specs.NoisyClassifier(num_classes=4, image_shape=(8, 8, 1),
                                            schedule=specs.linear_schedule(500)), "another schedule")]:
        with pytest.raises(ValueError, match=msg):
            Pipeline.for_labels(unet, None, None, classifier=(clf, None, None))


def test_per_example_gamma_and_seeds(mixture2d, linear_schedule):
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    a = pipe.sample([0, 1], gamma=[1.0, 2.0], seed=0, steps=5)
    b = pipe.sample([0, 1], gamma=[1.0, 2.0], seed=0, steps=5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="gamma must be a real number or 2 of them"):
        pipe.sample([0, 1], gamma=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm", "euler_a"])
def test_image_i_depends_on_seed_and_i_alone(mixture2d, linear_schedule, sampler):
    """Not on the batch it was drawn in: the first three of nine images are the three asked alone."""
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    nine = pipe.sample([0, 1, 2, 0, 1, 2, 0, 1, 2], gamma=2.0, sampler=sampler, steps=10, seed=7)
    three = pipe.sample([0, 1, 2], gamma=2.0, sampler=sampler, steps=10, seed=7)
    np.testing.assert_allclose(nine[:3], three, atol=1e-5)
    assert not np.allclose(nine[:3], nine[3:6])  # the same labels, other images


@pytest.mark.parametrize("kwargs, msg", [
    ({"condition": [3]}, r"labels must be in 0..2, got 3..3"),
    ({"condition": []}, "labels is empty"),
    ({"condition": [0.5]}, "integer class labels"),
    ({"condition": [1.0]}, "integer class labels"),
    ({"condition": [[1, 2], [0, 1]]}, "1-D sequence"),
    ({"condition": np.zeros((1, 14, 14, 1), np.uint8)}, "1-D sequence of integer class labels, got an array of uint8"),
    ({"condition": [2**32 + 1]}, r"must be in 0..2, got 4294967297"),
    ({"condition": np.array([1e10])}, "integer class labels"),
    ({"condition": [True]}, "integer class labels"),
    ({"condition": "1"}, "integer or a 1-D sequence"),
    ({"condition": [0], "negative": [0, 1, 2]}, "negative has 3 entries for 1 images"),
    ({"condition": [0], "steps": 0}, "steps must be a positive integer, got 0"),
    ({"condition": [0], "steps": 2.7}, "steps must be a positive integer, got 2.7"),
    ({"condition": [0], "steps": 1001}, "steps must be at most 1000"),
    ({"condition": [0], "seed": "abc"}, "seed must be an integer in 0..2\\*\\*32-1, got 'abc'"),
    ({"condition": [0], "seed": 1.5}, "seed must be an integer"),
    ({"condition": [0], "seed": 2**64}, "seed must be an integer"),
    ({"condition": [0], "seed": -1}, "seed must be an integer"),
    ({"condition": [0], "gamma": "abc"}, "gamma must be a real number"),
    ({"condition": [0], "gamma": np.inf}, "gamma must be finite"),
    ({"condition": [0], "sampler": "plms"}, "unknown sampler 'plms'"),
    ({"condition": [0], "sampler": "euler_discrete"}, "walks a diffusers scheduler config, which this pipeline lacks"),
    ({"condition": [0], "sampler": "ddim", "eta": -1.0}, "eta must be a finite number >= 0"),
])
def test_bad_inputs_are_refused_naming_the_argument(mixture2d, linear_schedule, kwargs, msg):
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    with pytest.raises(ValueError, match=msg):
        pipe.sample(**kwargs)


def test_jax_labels_are_checked_like_numpy_ones(mixture2d, linear_schedule):
    """Every label the network reads (conditions and negatives, jax arrays too) is checked on the host."""
    import jax
    import jax.numpy as jnp

    pipe = mixture_pipeline(mixture2d, linear_schedule)
    np.testing.assert_array_equal(pipe.sample(jnp.array([0, 2]), negative=jnp.array(1), steps=3, seed=2),
                                  pipe.sample([0, 2], negative=[1], steps=3, seed=2))
    for condition, negative, msg in [(jnp.array([0, 3]), None, r"labels must be in 0..2, got 0..3"),
                                     (jnp.array([0.0, 1.0]), None, "integer class labels, got an array of float32"),
                                     ([0], jnp.array([-1]), r"negative must be in 0..2, got -1..-1"),
                                     ([0], jnp.array([1.5]), "negative must be a 1-D sequence of integer"),
                                     (jnp.array([True]), None, "integer class labels")]:
        with pytest.raises(ValueError, match=msg):
            pipe.sample(condition, negative=negative, steps=3)
    with pytest.raises(ValueError, match="labels must be concrete values"):
        jax.jit(lambda y: pipe.sample(y, steps=3))(jnp.array([0]))


def test_a_non_finite_result_is_an_error_naming_the_stage(mixture2d, linear_schedule):
    from jaxdiff.pipeline import NonFiniteSample

    exact = mixture2d.cond_eps_fn(linear_schedule)
    # finite until the last steps (t small), as an overflow in a network late in sampling would be
    late_nan = lambda p, x, t, y: jnp.where(jnp.reshape(t < 50, (-1, 1)), jnp.nan, exact(x, t, y))
    pipe = Pipeline(late_nan, {}, linear_schedule, conditions.Labels(3), (2,), clip_x0=None)
    with pytest.raises(NonFiniteSample, match=r"non-finite values \(NaN or inf\) in the samples") as err:
        pipe([0, 1], steps=5)
    assert err.value.stage == "samples" and isinstance(err.value, ValueError)
    assert np.isfinite(mixture_pipeline(mixture2d, linear_schedule).sample([0, 1], steps=5)).all()


def test_settings_a_sampler_ignores_are_not_checked(mixture2d, linear_schedule):
    """DDPM walks all T steps and takes no eta; DPM-Solver++ takes no eta."""
    pipe = mixture_pipeline(mixture2d, linear_schedule)
    assert pipe.sample([0], sampler="ddpm", steps=0, eta=-3.0).shape == (1, 2)
    assert pipe.sample([0], sampler="dpm++", steps=3, eta="anything").shape == (1, 2)
    assert pipe.sample(np.int64(1), steps=3).shape == (1, 2)  # one NumPy integer is one image


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


def test_compiled_ahead_with_zero_parameters_a_call_with_trained_ones_compiles_nothing_more(caplog):
    spec = specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=16, image_shape=(8, 8, 1))
    trained = jax.device_get(spec.init(1))
    pipe = Pipeline.for_labels(spec, spec.module(), jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                                                  spec.template()))
    labels, settings = np.array([0, 1, 1]), dict(gamma=2.0, steps=3, seed=5)
    pipe.compile(labels, **settings)
    pipe.params["unet"] = trained
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        out = pipe.sample(labels, **settings)
    assert "compilation of jit(_generate)" not in caplog.text
    fresh = Pipeline.for_labels(spec, spec.module(), trained).sample(labels, **settings)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fresh))
    with pytest.raises(ValueError, match="steps"):  # compile checks what sample checks
        pipe.compile(labels, steps=0)
