"""Samplers and guidance on a 2-D Gaussian mixture whose scores are exact.

Writes a picture of each sampler's output beside the true distribution, and of
classifier-free guidance at several gammas, and prints how far each sampler's
component weights, means and covariances are from the truth. No training, runs in
about a minute on a CPU.

    python -m experiments.mixture_demo --out runs/mixture_demo
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.png import grid, upscale, write_png
from jaxdiff import guidance, mixture, sampling, schedules

EXTENT = 4.0
COLORS = np.array([[214, 39, 40], [31, 119, 180], [44, 160, 44], [120, 120, 120]], np.float64)


def density_image(x: np.ndarray, labels: np.ndarray, num_labels: int, size: int = 128) -> np.ndarray:
    """A 2-D histogram of samples, tinted by component, as an RGB uint8 image."""
    img, total = np.zeros((size, size, 3)), np.zeros((size, size, 1))
    ij = np.clip(((x + EXTENT) / (2 * EXTENT) * size).astype(int), 0, size - 1)
    for k in range(num_labels):
        sel = ij[labels == k]
        counts = np.zeros((size, size))
        np.add.at(counts, (size - 1 - sel[:, 1], sel[:, 0]), 1.0)
        img += counts[..., None] * COLORS[k % len(COLORS)]
        total += counts[..., None]
    strength = np.log1p(total) / max(np.log1p(total).max(), 1e-9)
    tint = img / np.maximum(total, 1e-9)
    return (255 - strength * (255 - tint)).clip(0, 255).astype(np.uint8)


def stats(gm, x):
    lab = np.asarray(jnp.argmax(gm.log_posterior(jnp.asarray(x), jnp.ones(len(x))), -1))
    k = gm.num_components
    w = np.bincount(lab, minlength=k) / len(x)
    m = np.stack([x[lab == i].mean(0) for i in range(k)])
    c = np.stack([np.cov(x[lab == i].T) for i in range(k)])
    return lab, w, m, c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mixture_demo", help="output directory for the PNGs")
    p.add_argument("--samples", type=int, default=20_000, help="samples per panel")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.samples < 100:
        p.error("--samples must be at least 100")

    sched = schedules.linear()
    gm = mixture.GaussianMixture.create(
        [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
        [np.eye(2) * 0.3, np.diag([0.2, 0.5]), [[0.4, 0.1], [0.1, 0.2]]],
    )
    key_data, key_noise, key_run = jax.random.split(jax.random.key(args.seed), 3)
    x_T = jax.random.normal(key_noise, (args.samples, 2))
    eps_fn = gm.eps_fn(sched)
    runs = {
        "data": lambda: gm.sample(key_data, args.samples)[0],
        "DDPM 1000": lambda: sampling.ddpm(eps_fn, sched, x_T, key_run),
        "DDIM 50": lambda: sampling.ddim(eps_fn, sched, x_T, steps=50),
        "DPM-Solver++ 20": lambda: sampling.dpm_solver_pp(eps_fn, sched, x_T, steps=20),
        "DPM-Solver++ 10": lambda: sampling.dpm_solver_pp(eps_fn, sched, x_T, steps=10),
    }
    _, tw, tm, tc = stats(gm, np.asarray(runs["data"]()))
    print(f"{'sampler':<18}{'NFE':>6}{'seconds':>9}{'max |dw|':>10}{'max |dmean|':>13}{'max rel dcov':>14}")
    panels = []
    for name, run in runs.items():
        t0 = time.perf_counter()
        x = np.asarray(jax.jit(run)())
        dt = time.perf_counter() - t0
        lab, w, m, c = stats(gm, x)
        rel = max(np.linalg.norm(c[k] - tc[k]) / np.linalg.norm(tc[k]) for k in range(3))
        nfe = 0 if name == "data" else int(name.split()[-1])
        print(f"{name:<18}{nfe:>6}{dt:>9.2f}{np.abs(w - tw).max():>10.4f}{np.abs(m - tm).max():>13.4f}{rel:>14.3f}")
        panels.append(density_image(x, lab, 3))
    path = os.path.join(args.out, "samplers.png")
    write_png(path, upscale(grid(np.stack(panels)[None]), 2))
    print(f"wrote {path}: {', '.join(runs)} (left to right)")

    # classifier-free guidance toward component 0 of an overlapping pair
    pair = mixture.GaussianMixture.create([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.0]], [np.eye(2) * 0.5] * 2)
    y = jnp.zeros((args.samples,), jnp.int32)
    gammas = [0.0, 1.0, 2.0, 3.0, 5.0]
    cfg_run = jax.jit(lambda g: sampling.dpm_solver_pp(guidance.cfg(pair.cond_eps_fn(sched), y, pair.null_label, g), sched, x_T, steps=20))
    panels = []
    for g in gammas:
        x = np.asarray(cfg_run(g))
        lab = np.asarray(jnp.argmax(pair.log_posterior(jnp.asarray(x), jnp.ones(len(x))), -1))
        mass = float(jnp.mean(jnp.exp(pair.log_posterior(jnp.asarray(x), jnp.ones(len(x)))[:, 0])))
        print(f"CFG gamma={g:<4} mean p(y=0 | x0) = {mass:.3f}")
        panels.append(density_image(x, lab, 2))
    path = os.path.join(args.out, "cfg_gammas.png")
    write_png(path, upscale(grid(np.stack(panels)[None]), 2))
    print(f"wrote {path}: gamma = {gammas} (left to right)")


if __name__ == "__main__":
    main()
