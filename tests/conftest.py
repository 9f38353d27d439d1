"""Shared fixtures: the textbook schedule and labelled Gaussian mixtures with exact scores."""

import atexit
import os
import shutil
import tempfile

from fast_xla import apply_to_environment

# before JAX starts its backend: the children that tests launch inherit it (FAST_XLA for those given their own)
apply_to_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import mixture, schedules  # noqa: E402

# Tests build the same small programs again and again (each pipeline or model object compiles afresh), and
# compiling is most of the suite's time: a compilation cache turns the repeats into reads. Under xdist the
# workers share one folder, made by the controller (pytest_configure below), so a program one worker
# compiled the other reads; JAX writes cache files in place, so sharing needs the cache's size limit, with
# which JAX holds a file lock (filelock, a dependency of huggingface_hub) around every read and write.
# Set here, in-process only, so the children that tests launch keep their own settings. The cache is made
# fresh for each run and removed after it: nothing carries over between runs.
_SHARED_CACHE = "JAXDIFF_TEST_XLA_CACHE"
if os.environ.get(_SHARED_CACHE):
    _CACHE = os.environ[_SHARED_CACHE]
else:
    _CACHE = tempfile.mkdtemp(prefix=f"jaxdiff-xla-cache-{os.getpid()}-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_compilation_cache_max_size", 8 << 30)  # the limit turns the file lock on


def pytest_configure(config):
    # the xdist controller (it compiles nothing) makes the workers' shared cache before it starts them
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        os.environ[_SHARED_CACHE] = tempfile.mkdtemp(prefix="jaxdiff-xla-cache-shared-")


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get(_SHARED_CACHE):
        shutil.rmtree(os.environ.pop(_SHARED_CACHE), ignore_errors=True)

# The longest tests (measured under FAST_XLA, slowest first), started before the rest: pytest-xdist hands tests out in
# collection order, and one of these started last would keep one worker busy alone while the other idles.
# A test sharing a trained run (xdist_group) moves with its whole group, which runs on one worker.
SLOW_FIRST = [
    "test_experiments.py::test_evaluate_reports_what_a_recomputation_gives",  # the cfg_run group, with its run
    "test_distributed.py::test_two_processes_train_as_one_process_write_as_one_and_resume_exactly",
    "test_experiments.py::test_text_to_image_end_to_end",
    "test_experiments.py::test_cond_and_classifier_guidance_end_to_end",
    "test_train.py::test_data_parallel_on_4_cpu_devices_equals_single_device",
    "test_benchmarks.py::",
    "test_sd_finetune.py::",
    "test_readme.py::test_the_readme_example_runs",
    "test_sharding.py::test_sharded_runs_on_8_devices_equal_one_device_hold_a_share_of_the_state_and_resume_exactly",
    "test_sd_train.py::",
    "test_sampling.py::test_samplers_reproduce_the_mixture",
    "test_sharding.py::test_two_processes_with_the_fsdp_axis_across_them_train_as_one_device",
    "test_trainer.py::test_ema_samples_are_as_close_to_the_data_as_the_raw_parameters_after_a_short_run",
    "test_train.py::test_resume_is_exact",
    "test_trainer.py::",
    "test_autoencoder.py::test_autoencoder_learns_to_reconstruct_a_batch",
    "test_experiments.py::test_superres_end_to_end",
    "test_sd_pipeline.py::test_uint8_rgb_of_any_multiple_of_the_latent_factor_and_seeds",
    "test_sdxl.py::test_base_then_refiner",
]


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which should have named the groups
def pytest_collection_modifyitems(config, items):
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            if (mark := item.get_closest_marker("xdist_group")) is not None:
                _name_group(item, mark.args[0] if mark.args else mark.kwargs.get("name", "default"))

    def rank(item):
        return next((i for i, name in enumerate(SLOW_FIRST) if name in item.nodeid), len(SLOW_FIRST))

    ranks = {item: rank(item) for item in items}
    for item in items:  # a group takes its best-placed member's rank and stays together
        if (mark := item.get_closest_marker("xdist_group")) is not None:
            group = [i for i in items if (m := i.get_closest_marker("xdist_group")) and m.args == mark.args]
            ranks[item] = min(ranks[i] for i in group)
    items.sort(key=ranks.__getitem__)  # stable: the rest keep their order


def _name_group(item, group: str) -> None:
    """xdist keeps a group together by the "@group" ending of its tests' ids, which its worker writes into
    pytest's private ``_nodeid``; pytest 9.2 keeps ids structured (``_id``), so the write has no effect
    and every grouped test ran on either worker, each worker training the shared run again (pytest-xdist
    issue 1386). Write it there too, and stop loudly if neither takes."""
    if item.nodeid.endswith(f"@{group}"):
        return
    ident = getattr(item, "_id", None)
    if ident is not None and hasattr(type(ident), "parse"):
        item._id = type(ident).parse(f"{item.nodeid}@{group}")
    if not item.nodeid.endswith(f"@{group}"):
        raise pytest.UsageError(f"{item.nodeid}: cannot name its xdist_group {group!r} in its id; this pytest and "
                                f"pytest-xdist no longer keep such tests on one worker")


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
