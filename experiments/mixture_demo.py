"""Samplers and guidance on a 2-D Gaussian mixture whose scores are exact.

Prints how far each sampler's component weights, means and covariances are from the truth
(with its number of network evaluations), and draws (matplotlib) each sampler's output beside
the true distribution, and classifier-free guidance at several gammas. No training; about a
minute on a CPU.

    python -m experiments.mixture_demo --out runs/mixture_demo
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments import common
from jaxdiff import guidance, mixture, sampling, schedules

EXTENT = 4.0
RUNS = [("ddpm", None), ("ddim", 50), ("dpm++", 20), ("dpm++", 10), ("heun", 10), ("euler_a", 50)]


def stats(gm, x):
    lab = np.asarray(jnp.argmax(gm.log_posterior(jnp.asarray(x), jnp.ones(len(x))), -1))
    k = gm.num_components
    w = np.bincount(lab, minlength=k) / len(x)
    m = np.stack([x[lab == i].mean(0) for i in range(k)])
    c = np.stack([np.cov(x[lab == i].T) for i in range(k)])
    return lab, w, m, c


def panels(path, titled_points, suptitle):
    """One scatter panel per (title, points, component of each point)."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(titled_points), figsize=(2.6 * len(titled_points), 2.9), dpi=100,
                             sharex=True, sharey=True)
    for ax, (title, x, lab) in zip(np.atleast_1d(axes), titled_points, strict=True):
        ax.scatter(x[:, 0], x[:, 1], c=lab, cmap="tab10", vmin=0, vmax=9, s=1, alpha=0.3, rasterized=True)
        ax.set(title=title, xlim=(-EXTENT, EXTENT), ylim=(-EXTENT, EXTENT), aspect="equal")
        ax.set_xlabel("x1")
    np.atleast_1d(axes)[0].set_ylabel("x2")
    fig.suptitle(suptitle, fontsize=10)
    common.save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mixture_demo", help="output directory for the plots")
    p.add_argument("--samples", type=common.positive_int, default=20_000, help="samples per panel")
    p.add_argument("--seed", type=common.seed_int, default=0)
    args = p.parse_args(argv)
    if args.samples < 100:
        p.error("--samples must be at least 100")
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sched = schedules.linear()
    gm = mixture.GaussianMixture.create(
        [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
        [np.eye(2) * 0.3, np.diag([0.2, 0.5]), [[0.4, 0.1], [0.1, 0.2]]],
    )
    key_data, key_noise, key_run = jax.random.split(jax.random.key(args.seed), 3)
    x_T = jax.random.normal(key_noise, (args.samples, 2))
    eps_fn = gm.eps_fn(sched)
    truth = np.asarray(gm.sample(key_data, args.samples)[0])
    lab, tw, tm, tc = stats(gm, truth)
    shown = [("data", truth, lab)]
    print(f"{'sampler':<18}{'NFE':>6}{'seconds':>9}{'max |dw|':>10}{'max |dmean|':>13}{'max rel dcov':>14}")
    for name, steps in RUNS:
        t0 = time.perf_counter()
        x = np.asarray(jax.jit(partial(sampling.run, name, eps_fn, sched, x_T, key=key_run, steps=steps))())
        dt = time.perf_counter() - t0
        lab, w, m, c = stats(gm, x)
        rel = max(np.linalg.norm(c[k] - tc[k]) / np.linalg.norm(tc[k]) for k in range(3))
        nfe = sampling.nfe(name, steps, sched)
        label = f"{name} {steps or sched.num_timesteps}"
        print(f"{label:<18}{nfe:>6}{dt:>9.2f}{np.abs(w - tw).max():>10.4f}{np.abs(m - tm).max():>13.4f}{rel:>14.3f}")
        shown.append((f"{label} ({nfe} NFE)", x, lab))
    panels(out / "samplers.png", shown, "exact scores of a 3-component mixture: samplers against the data")
    print(f"wrote {out / 'samplers.png'}")

    # classifier-free guidance toward component 0 of an overlapping pair
    pair = mixture.GaussianMixture.create([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.0]], [np.eye(2) * 0.5] * 2)
    y = jnp.zeros((args.samples,), jnp.int32)
    gammas = [0.0, 1.0, 2.0, 3.0, 5.0]
    cfg_run = jax.jit(lambda g: sampling.dpm_solver_pp(guidance.cfg(pair.cond_eps_fn(sched), y, pair.null_label, g),
                                                       sched, x_T, steps=20))
    shown = []
    for g in gammas:
        x = np.asarray(cfg_run(g))
        post = pair.log_posterior(jnp.asarray(x), jnp.ones(len(x)))
        mass = float(jnp.mean(jnp.exp(post[:, 0])))
        print(f"CFG gamma={g:<4} mean p(y=0 | x0) = {mass:.3f}")
        shown.append((f"gamma {g:g}: p(y=0|x) {mass:.2f}", x, np.asarray(jnp.argmax(post, -1))))
    panels(out / "cfg_gammas.png", shown, "classifier-free guidance toward component 0 (DPM-Solver++, 20 steps)")
    print(f"wrote {out / 'cfg_gammas.png'}")


if __name__ == "__main__":
    main()
