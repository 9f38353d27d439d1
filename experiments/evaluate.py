"""Measure a trained model: FID and class accuracy over guidance scales and samplers.

Protocol (docs/QUALITY.md): an evaluation classifier, trained here on the dataset's training
split and never used for guidance, judges every sample. FID is the Frechet distance between
Gaussians fitted to its penultimate features (128-d) of --num-samples generated images
(labels balanced, 0..9 in turn) and of the whole real test split. The floor is the same
distance from --num-samples real training images to the test split. Accuracy is the share of
samples the evaluation classifier assigns to the label that was asked for.

With neither --checkpoint nor --classifier-guidance it makes (or loads) the evaluation classifier
and reports its test accuracy and the FID floor alone.

Writes under --out: quality.csv, quality.md (the table), quality.png (accuracy above, FID
below, against gamma; one line per sampler, in the table's order), and the evaluation
classifier in --eval-classifier (trained once, then reused).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from experiments import common
from jaxdiff import data, sampling
from jaxdiff.judge import Judge
from jaxdiff.pipeline import Pipeline


def parse_samplers(s: str):
    out = []
    for item in s.split(","):
        name, _, steps = item.partition(":")
        if name not in sampling.SAMPLERS or (steps and not steps.isdigit()) or (steps and int(steps) < 1):
            raise argparse.ArgumentTypeError(f"samplers look like ddpm,ddim:50,dpm++:20 (names "
                                             f"{tuple(sampling.SAMPLERS)}); got {item!r}")
        info = sampling.SAMPLERS[name]
        out.append((name, None if info.default_steps is None else int(steps or info.default_steps)))
    return out


def main(argv=None):
    p = common.parser(__doc__, steps=3000, batch_size=256, out="runs/evaluate")
    p.add_argument("--checkpoint", help="a classifier-free-guidance run (mnist_cfg) or its checkpoints/")
    p.add_argument("--classifier-guidance", help="--out of mnist_classifier_guidance (unet/ and classifier/)")
    p.add_argument("--eval-classifier", help="folder of the evaluation classifier (default runs/eval_<dataset>)")
    p.add_argument("--num-samples", type=common.positive_int, default=10_000, help="generated samples per table cell")
    p.add_argument("--gammas", type=common.finite_floats, default=[0.0, 1.0, 2.0, 3.0, 5.0, 7.5])
    p.add_argument("--samplers", type=parse_samplers, default=parse_samplers("ddpm,ddim:50,dpm++:20,dpm++:10"))
    p.add_argument("--ddpm-gammas", type=common.finite_floats, default=None,
                   help="gammas for DDPM (default: all; it costs 1000 NFE)")
    p.add_argument("--cg-scales", type=common.finite_floats, default=[0.0, 1.0, 3.0, 5.0, 10.0],
                   help="classifier guidance scales")
    p.add_argument("--sample-batch", type=common.positive_int, default=5000, help="images generated per device call")
    args = p.parse_args(argv)
    args.eval_classifier = args.eval_classifier or f"runs/eval_{args.dataset}"
    with common.cli(args) as out:
        run(args, out)


def run(args, out):
    train_images, train_labels = common.load_data(args)
    test_images, test_labels = common.load_data(args, "test")
    judge = Judge.train_or_load(args.eval_classifier, train_images, train_labels, dataset=args.dataset,
                                steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    test_acc = judge.accuracy(test_images, test_labels)
    ref = judge.feature_stats(test_images)
    n_floor = min(args.num_samples, len(train_images))
    floor_idx = np.random.default_rng(args.seed).choice(len(train_images), n_floor, replace=False)
    floor = judge.fid(train_images[floor_idx], ref)
    common.note(f"evaluation classifier: test accuracy {test_acc:.4f}; FID floor (real train {n_floor} vs test "
                f"{len(test_images)}) {floor:.3f}")

    rows = []
    n = args.num_samples
    labels = np.arange(n) % data.NUM_CLASSES[args.dataset]

    def measure(kind, pipe, sampler, steps, gamma):
        chunk = min(args.sample_batch, n)
        pipe(labels[:chunk], gamma=gamma, sampler=sampler, steps=steps, seed=args.seed)  # compile, untimed
        t0 = time.perf_counter()
        imgs = np.concatenate([pipe(labels[i : i + chunk], gamma=gamma, sampler=sampler, steps=steps,
                                    seed=args.seed + i) for i in range(0, n, chunk)])
        seconds = time.perf_counter() - t0
        nfe = sampling.nfe(sampler, steps, pipe.schedule)
        rows.append(dict(guidance=kind, sampler=sampler, nfe=nfe, gamma=gamma, fid=judge.fid(imgs, ref),
                         accuracy=judge.accuracy(imgs, labels[: len(imgs)]), seconds=seconds))
        write_csv(out, rows)  # after every cell, so a run cut short keeps what it measured
        r = rows[-1]
        common.note(f"{kind:<10}{sampler:>7}{nfe:>6}{gamma:>7.2f}{r['fid']:>10.3f}{r['accuracy']:>10.4f}{seconds:>9.1f}")

    common.note(f"{'guidance':<10}{'sampler':>7}{'NFE':>6}{'gamma':>7}{'FID':>10}{'accuracy':>10}{'seconds':>9}")
    dtype = common.compute_dtype(args.dtype)
    if args.checkpoint:
        pipe = Pipeline.from_checkpoint(args.checkpoint, dtype=dtype)
        for sampler, steps in args.samplers:
            gammas = args.ddpm_gammas if (sampler == "ddpm" and args.ddpm_gammas is not None) else args.gammas
            for gamma in gammas:
                measure("cfg", pipe, sampler, steps, gamma)
    if args.classifier_guidance:
        d = args.classifier_guidance
        pipe = Pipeline.from_checkpoint(f"{d}/unet", dtype=dtype, classifier_directory=f"{d}/classifier")
        sampler, steps = args.samplers[-1] if args.samplers[-1][0] != "ddpm" else ("dpm++", 20)
        for scale in args.cg_scales:
            measure("classifier", pipe, sampler, steps, scale)
    write_outputs(args, out, rows, test_acc, floor, n_floor, len(test_images))


def write_csv(out, rows):
    if jax.process_index() == 0:
        (out / "quality.csv").write_text(
            "guidance,sampler,nfe,gamma,fid,accuracy,seconds\n"
            + "".join(f"{r['guidance']},{r['sampler']},{r['nfe']},{r['gamma']},{r['fid']:.4f},{r['accuracy']:.4f},"
                      f"{r['seconds']:.2f}\n" for r in rows))


def write_outputs(args, out, rows, test_acc, floor, n_floor, n_test):
    write_csv(out, rows)
    lines = [f"Dataset {args.dataset}; evaluation classifier test accuracy {test_acc:.4f}; FID floor "
             f"(real train {n_floor} vs real test {n_test}) {floor:.3f}; {args.num_samples} samples per row; "
             f"{jax.device_count()} x {jax.devices()[0].device_kind}.", "",
             "| guidance | sampler | NFE | gamma | FID | accuracy | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['guidance']} | {r['sampler']} | {r['nfe']} | {r['gamma']:g} | {r['fid']:.3f} | "
              f"{r['accuracy']:.4f} | {r['seconds']:.1f} |" for r in rows]
    if jax.process_index() != 0:
        return
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_quality(out / "quality.png", rows, floor)


def plot_quality(path, rows, floor):
    """Class accuracy (left) and FID (right) against gamma, one line per (guidance, sampler, NFE)."""
    plt = common.pyplot()
    if plt is None or not rows:
        return
    fig, (acc_ax, fid_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key in dict.fromkeys((r["guidance"], r["sampler"], r["nfe"]) for r in rows):
        series = sorted((r["gamma"], r["accuracy"], r["fid"]) for r in rows
                        if (r["guidance"], r["sampler"], r["nfe"]) == key)
        g, acc, fid = zip(*series, strict=True)
        name = f"{key[0]}, {key[1]}, {key[2]} NFE"
        acc_ax.plot(g, acc, marker="o", label=name)
        fid_ax.plot(g, fid, marker="o", label=name)
    fid_ax.axhline(floor, color="0.5", ls="--", label="floor (real vs real)")
    acc_ax.set(xlabel="guidance scale gamma", ylabel="class accuracy (evaluation classifier)", title="accuracy")
    fid_ax.set(xlabel="guidance scale gamma", ylabel="FID in the classifier's features", title="FID", yscale="log")
    for ax in (acc_ax, fid_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
