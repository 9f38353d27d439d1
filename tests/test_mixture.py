"""The exact oracle itself, checked against independent float64 NumPy and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np


def np_log_components(gm, x, abar):
    """log w_k + log N(x; sqrt(abar) mu_k, abar S_k + (1 - abar) I), written out in float64."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    d = x.shape[-1]
    out = []
    for k in range(len(w)):
        c = abar * cov[k] + (1 - abar) * np.eye(d)
        diff = x - np.sqrt(abar) * mu[k]
        maha = diff @ np.linalg.inv(c) @ diff
        out.append(np.log(w[k]) - 0.5 * (maha + np.log(np.linalg.det(c)) + d * np.log(2 * np.pi)))
    return np.array(out)


def np_log_p(gm, x, abar, y=None):
    lc = np_log_components(gm, x, abar)
    if y is None:
        return np.log(np.sum(np.exp(lc)))
    return lc[y] - np.log(float(gm.weights[y]))


def fd_grad(f, x, h=1e-5):
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def test_scores_match_finite_differences_of_float64_density(mixture2d):
    rng = np.random.default_rng(1)  # per test: a module-level generator's draws depend on what ran before
    for _ in range(5):
        x = rng.normal(size=2) * 2
        abar = rng.uniform(0.05, 0.99)
        got = np.asarray(mixture2d.score(jnp.asarray([x], jnp.float32), jnp.asarray([abar], jnp.float32)))[0]
        np.testing.assert_allclose(got, fd_grad(lambda z, abar=abar: np_log_p(mixture2d, z, abar), x),
                                   rtol=1e-3, atol=1e-3)
        for y in range(3):
            got = mixture2d.score(jnp.asarray([x], jnp.float32), jnp.asarray([abar], jnp.float32), jnp.array([y]))
            want = fd_grad(lambda z, abar=abar, y=y: np_log_p(mixture2d, z, abar, y), x)
            np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-3, atol=1e-3)


def test_null_label_is_the_marginal(mixture2d):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    abar = jnp.full((4,), 0.4)
    null = jnp.full((4,), mixture2d.null_label)
    np.testing.assert_allclose(mixture2d.score(x, abar, null), mixture2d.score(x, abar), rtol=1e-6)


def test_log_prob_and_classifier_match_numpy_bayes(mixture2d):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 2)) * 2
    abar = 0.3
    lp = np.asarray(mixture2d.log_prob(jnp.asarray(x, jnp.float32), jnp.full((3,), abar)))
    post = np.asarray(mixture2d.log_posterior(jnp.asarray(x, jnp.float32), jnp.full((3,), abar)))
    for i in range(3):
        lc = np_log_components(mixture2d, x[i], abar)
        assert abs(lp[i] - np.log(np.exp(lc).sum())) < 1e-4
        np.testing.assert_allclose(post[i], lc - np.log(np.exp(lc).sum()), atol=1e-4)


def test_noisy_components_match_monte_carlo(mixture2d, linear_schedule):
    """The closed form for x_t | y against actually noising draws of x0."""
    from jaxdiff import schedules

    x0, y = mixture2d.sample(jax.random.key(0), 200_000)
    t = jnp.full((len(x0),), 300)
    x_t = np.asarray(schedules.add_noise(linear_schedule, x0, t, jax.random.normal(jax.random.key(1), x0.shape)))
    abar = float(linear_schedule.alpha_bar(300))
    for k in range(3):
        sel = x_t[np.asarray(y) == k]
        cov = abar * np.asarray(mixture2d.covs[k]) + (1 - abar) * np.eye(2)
        se_mean = np.sqrt(np.diag(cov) / len(sel))  # standard errors; 5 of them is the bound
        np.testing.assert_array_less(np.abs(sel.mean(0) - np.sqrt(abar) * np.asarray(mixture2d.means[k])), 5 * se_mean)
        se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / len(sel))
        np.testing.assert_array_less(np.abs(np.cov(sel.T) - cov), 5 * se_cov)
