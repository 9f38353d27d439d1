"""Section 10.4: classifier-free guidance on MNIST (or Fashion-MNIST), the main job.

Trains one class-conditional U-Net whose labels are dropped to the null label with
probability 0.1 per example, then samples every label at several guidance scales
gamma: eps = eps_u + gamma (eps_c - eps_u). Writes, under --out:
  samples.png          rows = labels 0-9, columns = gamma values (--gammas)
  samples_gamma<G>.png rows = labels 0-9, columns = --per-label samples at --gamma
  negative.png         rows = labels 0-9 sampled with the negative label (y + 1) mod 10
  loss.csv, loss.png   the training loss; checkpoints/ (orbax), resumable with --resume

On a CPU, a picture within a few minutes on two cores:
  python -m experiments.mnist_cfg --steps 300 --channels 16,32,64 --batch-size 32 --steps-per-dispatch 10
"""

from __future__ import annotations

import sys
import time

_IMPORTING = time.perf_counter()  # the imports below take seconds of the wall time reported

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from jaxdiff import data, sampling  # noqa: E402
from jaxdiff.judge import Judge  # noqa: E402
from jaxdiff.pipeline import Pipeline  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _IMPORTING


def main(argv=None):
    p = common.parser(__doc__, steps=6000, batch_size=256, out="runs/mnist_cfg")
    p.add_argument("--p-uncond", type=common.probability, default=0.1, help="per-example probability of the null label")
    p.add_argument("--gammas", type=common.finite_floats, default=[0.0, 1.0, 2.0, 3.0, 5.0],
                   help="guidance scales for samples.png")
    p.add_argument("--gamma", type=common.finite_float, default=3.0, help="guidance scale for the per-label grid")
    p.add_argument("--per-label", type=common.positive_int, default=10, help="samples per label in the per-label grid")
    p.add_argument("--eval-classifier", default=None,
                   help="folder of an evaluation classifier (made there first if absent, as experiments.evaluate "
                        "makes it): report the class accuracy of --eval-samples samples at --gamma")
    p.add_argument("--eval-samples", type=common.positive_int, default=1000)
    p.add_argument("--judge-steps", type=common.positive_int, default=3000,
                   help="steps to train an absent evaluation classifier")
    started = time.perf_counter()
    args = p.parse_args(argv)
    with common.cli(args) as out:
        run(args, out, started)


def run(args, out, started: float):
    common.check_levels(args, len(args.channels))
    times = {"imports": IMPORT_SECONDS}
    t0 = time.perf_counter()
    images, labels = common.load_data(args)
    times["data"] = time.perf_counter() - t0
    num_classes = data.NUM_CLASSES[args.dataset]
    spec, module, loss = common.label_unet(args, images, args.p_uncond)
    draws = grids(args, num_classes)
    asked = np.arange(args.eval_samples) % num_classes
    judged = dict(gamma=args.gamma, seed=args.seed + 2)
    settings = dict(sampler=args.sampler, steps=args.sample_steps)

    def compiled_pipeline():  # while training runs: the parameters' values come after it, only their shapes now
        pipe = Pipeline.for_labels(spec, module, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), spec.template()))
        for _, rows, _, kw in draws:
            pipe.compile(rows, **kw, **settings)
        if args.eval_classifier:
            pipe.compile(asked, **judged, **settings)
        return pipe

    samplers = common.Later(compiled_pipeline)
    t0 = time.perf_counter()
    result = common.fit(args, spec, loss, images, labels, out, on_compiled=samplers.start,
                        meta={"dataset": args.dataset, "split": args.split, "p_uncond": args.p_uncond})
    times["training"] = result.seconds
    # around the loop: the initial parameters, opening and closing the checkpoints, the loss plot
    times["setup and wrap-up of training"] = time.perf_counter() - t0 - result.seconds

    t0 = time.perf_counter()
    pipe = samplers.wait()
    pipe.params["unet"] = jax.device_get(result.state.ema_params)  # the compiled samplers read them as arguments
    for name, rows, cols, kw in draws:
        common.save_grid(out / name, pipe(rows, **kw, **settings), num_classes, cols)
    sample_s = times["sampling"] = time.perf_counter() - t0
    accuracy = ""
    t0 = time.perf_counter()
    if args.eval_classifier:
        train_images, train_labels = common.load_data(args, "train")
        judge = Judge.train_or_load(args.eval_classifier, train_images, train_labels, dataset=args.dataset,
                                    steps=args.judge_steps, seed=args.seed)
        acc = judge.accuracy(pipe(asked, **judged, **settings), asked)
        accuracy = f"class accuracy {acc:.4f} ({args.eval_samples} samples, gamma {args.gamma:g}), "
        times["judging"] = time.perf_counter() - t0
    nfe = sampling.nfe(args.sampler, args.sample_steps, pipe.schedule)
    if jax.process_index() == 0:
        print(f"done: {int(result.state.step)} steps in {result.seconds:.1f}s ({common.speed(result)}), sampling "
              f"{sample_s:.1f}s ({args.sampler}, {nfe} NFE), {accuracy}final loss "
              f"{common.final_loss(out):.4f}, skipped {int(result.state.skipped)}; outputs in {out}")
        wall = IMPORT_SECONDS + time.perf_counter() - started
        print(f"wall {wall:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
              + f" (training's first dispatch, its compile included: {result.first_dispatch:.1f}s)")
    sys.stdout.flush()


def grids(args, num_classes: int) -> list:
    """(file name, labels, columns, sampling settings) of each grid the job draws."""
    per_label = np.repeat(np.arange(num_classes), args.per_label)
    return [
        ("samples.png", np.repeat(np.arange(num_classes), len(args.gammas)),
         len(args.gammas), dict(gamma=np.tile(np.asarray(args.gammas, np.float32), num_classes), seed=args.seed)),
        (f"samples_gamma{args.gamma:g}.png", per_label, args.per_label, dict(gamma=args.gamma, seed=args.seed + 1)),
        ("negative.png", per_label, args.per_label,
         dict(negative=(per_label + 1) % num_classes, gamma=args.gamma, seed=args.seed + 1)),
    ]


if __name__ == "__main__":
    main()
