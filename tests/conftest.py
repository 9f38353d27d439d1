"""Shared fixtures: the textbook schedule and labelled Gaussian mixtures with exact scores."""

import atexit
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import mixture, schedules

# Tests build the same small programs again and again (each pipeline or model object compiles afresh), and
# compiling is most of the suite's time: a compilation cache turns the repeats into reads. One folder per
# xdist worker, since JAX writes its cache files non-atomically; set here, in-process only, so the children
# that tests launch keep their own settings.
_CACHE = tempfile.mkdtemp(prefix=f"jaxdiff-xla-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def linear_schedule():
    return schedules.linear()


@pytest.fixture(scope="session")
def mixture2d():
    """Three separated, unequal, correlated components in 2-D."""
    return mixture.GaussianMixture.create(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
        covs=[np.eye(2) * 0.3, np.diag([0.2, 0.5]), [[0.4, 0.1], [0.1, 0.2]]],
    )


@pytest.fixture(scope="session")
def overlapping2d():
    """Two components that overlap, so p(y | x0) is far from 0/1 and guidance has room to act."""
    return mixture.GaussianMixture.create(
        weights=[0.5, 0.5], means=[[-0.6, 0.0], [0.6, 0.0]], covs=[np.eye(2) * 0.5, np.eye(2) * 0.5]
    )


def assign(gm, x):
    """Each sample's most probable component under the clean mixture (t = 0)."""
    return np.asarray(jnp.argmax(gm.log_posterior(jnp.asarray(x), jnp.ones(len(x))), -1))


def component_stats(gm, x):
    """Weights, means and covariances of samples grouped by ``assign``."""
    x = np.asarray(x, np.float64)
    lab = assign(gm, x)
    k = gm.num_components
    weights = np.bincount(lab, minlength=k) / len(x)
    means = np.stack([x[lab == i].mean(0) for i in range(k)])
    covs = np.stack([np.cov(x[lab == i].T) for i in range(k)])
    return weights, means, covs


@pytest.fixture(scope="session")
def reference_stats(mixture2d):
    """The same statistics on 400k exact draws, so the grouping's bias cancels out."""
    x, _ = mixture2d.sample(jax.random.key(12345), 400_000)
    return component_stats(mixture2d, x)
