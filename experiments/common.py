"""What the experiments share: flags, data loading, the training loop, checkpoints, outputs."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.png import grid, line_plot, upscale, write_png
from jaxdiff import data, train
from jaxdiff.checkpoint import Checkpoints, ConfigMismatch
from jaxdiff.pipeline import MUST_MATCH, SAMPLERS, init_params, load_model, model_from_config, schedule_from_config


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def finite_floats(s):
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"every value must be finite, got {s!r}")
    return vals


def parser(description: str, steps: int, batch_size: int, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(data.DATASETS), default="mnist")
    g.add_argument("--data-dir", default=None, help=f"folder with the IDX .gz files (else ${data.ENV_DIR}, else download via tensorflow-datasets)")
    g.add_argument("--split", choices=["train", "test"], default="train", help="split to train on")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=steps, help="optimisation steps")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help="global batch, split over devices")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after warmup")
    g.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampled parameters")
    g.add_argument("--channels", default="64,128,256", help="channels per U-Net level")
    g.add_argument("--blocks-per-level", type=positive_int, default=1, help="conv blocks per U-Net level")
    g.add_argument("--attention-levels", default="", help="U-Net levels (0 = full resolution) with self-attention, e.g. 2 or 1,2")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="compute dtype; auto = bf16 on GPU/TPU, f32 on CPU")
    g.add_argument("--steps-per-dispatch", type=positive_int, default=50, help="steps scanned in one device call")
    g.add_argument("--devices", type=int, default=0, help="devices for data parallelism (0 = all local)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--out", default=out, help="output folder: checkpoints, PNGs, loss CSV")
    g.add_argument("--save-every", type=positive_int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=positive_int, default=3, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLERS, default="dpm++")
    g.add_argument("--sample-steps", type=positive_int, default=20, help="sampler steps (ddpm always uses T)")
    return p


def override(args, **changes) -> argparse.Namespace:
    """The same flags with some changed: a stage's own step count, another split."""
    return argparse.Namespace(**{**vars(args), **changes})


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def load_data(args):
    try:
        return data.load(args.dataset, args.split, args.data_dir)
    except (data.DataUnavailable, ValueError) as err:
        fail(str(err))


def parse_channels(s: str):
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        fail(f"--channels must be comma-separated integers, got {s!r}")
    if not ch or min(ch) < 4 or any(c % 4 for c in ch):
        fail(f"--channels must be positive multiples of 4, got {s!r}")
    return ch


def parse_levels(s: str, num_levels: int) -> list[int]:
    try:
        levels = sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        fail(f"--attention-levels must be comma-separated integers, got {s!r}")
    if any(not 0 <= v < num_levels for v in levels):
        fail(f"--attention-levels must be in 0..{num_levels - 1} for {num_levels} levels, got {s!r}")
    return levels


class Progress:
    """One line of progress on stderr: step, loss, images/s, time left."""

    def __init__(self, total: int, batch_size: int, label: str):
        self.total, self.batch, self.label = total, batch_size, label
        self.t0, self.last_print, self.images = time.perf_counter(), 0.0, 0
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, images: int, rate_start: float | None = None):
        now = time.perf_counter()
        self.images += images
        if now - self.last_print < 1.0 and step < self.total:
            return
        self.last_print = now
        rate = self.images / max(now - (rate_start or self.t0), 1e-9)
        left = (self.total - step) * self.batch / max(rate, 1e-9)
        bar = "#" * int(20 * step / self.total)
        line = f"{self.label} [{bar:<20}] {step}/{self.total} loss {loss:.4f} {rate:,.0f} img/s {left:,.0f}s left"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def run_training(args, config: dict, params, loss_fn, images, labels, out_dir: str, label: str):
    """Train with checkpoints and resume; returns (state, seconds, images/s after the first dispatch)."""
    devices = jax.local_devices()
    if args.devices:
        if args.devices > len(devices):
            fail(f"--devices {args.devices} asked for, only {len(devices)} present")
        devices = devices[: args.devices]
    if args.batch_size % len(devices):
        fail(f"--batch-size {args.batch_size} must be divisible by the {len(devices)} devices")
    mesh = train.make_mesh(devices)
    opt = train.OptimConfig(args.lr, args.warmup, 1.0, args.ema)
    tx = train.make_optimizer(opt)
    multi_step = train.data_parallel(loss_fn, tx, opt.ema_decay, mesh)
    state = train.init_state(params, tx, args.seed)
    ckpt = Checkpoints(os.path.join(out_dir, "checkpoints"), max_to_keep=args.keep)
    csv_path = os.path.join(out_dir, "loss.csv")
    if args.resume and ckpt.latest_step() is not None:
        try:
            state = ckpt.restore(state, config, MUST_MATCH)
        except ConfigMismatch as err:
            fail(str(err))
        print(f"resumed from step {int(state.step)} in {ckpt.directory}", file=sys.stderr)
        truncate_csv(csv_path, int(state.step))
    elif ckpt.latest_step() is not None:
        fail(f"{ckpt.directory} already holds checkpoints: pass --resume to continue, or choose another --out")
    else:
        with open(csv_path, "w") as f:
            f.write("step,loss\n")
    state = train.replicate(state, mesh)
    batches = data.Batches(images, labels, args.batch_size, args.seed)
    progress = Progress(args.steps, args.batch_size, label)
    step = int(state.step)
    t0, warm_t, warm_images = time.perf_counter(), None, 0
    while step < args.steps:
        k = min(args.steps_per_dispatch, args.steps - step, args.save_every - step % args.save_every)
        xs, ys = batches.stack(step, k)
        state, metrics = multi_step(state, train.shard_batches((xs, ys), mesh))
        losses = np.asarray(metrics["loss"])  # one host sync per dispatch
        if warm_t is None:
            warm_t = time.perf_counter()  # the first dispatch carries the compile
        else:
            warm_images += k * args.batch_size
        with open(csv_path, "a") as f:
            f.writelines(f"{step + i + 1},{l:.6f}\n" for i, l in enumerate(losses))
        step += k
        progress.update(step, float(losses.mean()), k * args.batch_size)
        if step % args.save_every == 0 or step == args.steps:
            ckpt.save(step, state, config)
    progress.close()
    ckpt.wait()
    ckpt.close()
    seconds = time.perf_counter() - t0
    # nan when the run had a single dispatch: no throughput apart from the compile
    rate = warm_images / max(time.perf_counter() - warm_t, 1e-9) if warm_t and warm_images else float("nan")
    if int(state.skipped):
        print(f"warning: {int(state.skipped)} updates skipped for non-finite loss or gradients", file=sys.stderr)
    write_loss_plot(csv_path, os.path.join(out_dir, "loss.png"))
    return state, seconds, rate


def truncate_csv(csv_path: str, last_step: int):
    """Drop loss rows logged after the checkpoint a resumed run starts from."""
    rows = open(csv_path).read().splitlines() if os.path.exists(csv_path) else ["step,loss"]
    kept = [rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= last_step]
    with open(csv_path, "w") as f:
        f.write("\n".join(kept) + "\n")


def write_loss_plot(csv_path: str, png_path: str):
    with open(csv_path) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    if losses:
        w = max(1, len(losses) // 200)  # a running mean, so the curve is readable
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        write_png(png_path, line_plot(smooth))


def save_grid(path: str, images_uint8: np.ndarray, rows: int, cols: int, scale: int = 2):
    """(rows * cols, H, W, C) uint8 images, row-major, as one PNG."""
    write_png(path, upscale(grid(images_uint8.reshape(rows, cols, *images_uint8.shape[1:])), scale))


def train_model(args, images, labels, out_dir: str, *, model: str, num_classes: int, p_uncond: float = 0.0,
                channels=None, label: str = "train"):
    """Build the configuration, the network and its loss, then train (or resume) it.

    ``model="unet"`` trains eps_theta(x_t, t, y) with labels dropped with probability ``p_uncond``
    (1.0: an unconditional model, every label the null one); ``model="classifier"`` trains the
    noisy classifier. Returns (config, network, state, schedule, seconds, images/s).
    """
    unet = model == "unet"
    small = {"classifier": 128, "eval_classifier": None}
    channels = channels or parse_channels(args.channels)
    config = dict(model=model, num_classes=num_classes, channels=channels,
                  blocks_per_level=args.blocks_per_level if unet else None,
                  attention_levels=parse_levels(args.attention_levels, len(channels)) if unet else None,
                  cond_dim=256 if unet else small[model], schedule="linear", num_timesteps=1000,
                  image_shape=list(images.shape[1:]), dataset=args.dataset, split=args.split,
                  batch_size=args.batch_size, lr=args.lr, p_uncond=p_uncond, seed=args.seed)
    dtype = compute_dtype(args.dtype)
    net = model_from_config(config, dtype)
    params = init_params(model_from_config(config), config, args.seed)
    schedule = schedule_from_config(config)
    if unet:
        loss_fn = train.diffusion_loss(net.apply, schedule, p_uncond=p_uncond, null_label=num_classes)
    elif model == "classifier":
        loss_fn = train.classifier_loss(net.apply, schedule)
    else:
        loss_fn = train.clean_classifier_loss(net.apply)
    print(f"{args.dataset}/{args.split}: {len(images)} images; {model} {tuple(config['channels'])}, "
          f"{sum(a.size for a in jax.tree.leaves(params)):,} parameters, {jnp.dtype(dtype).name} compute, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}", file=sys.stderr)
    state, seconds, rate = run_training(args, config, params, loss_fn, images, labels, out_dir, label)
    return config, net, state, schedule, seconds, rate


JUDGE_CHANNELS = (32, 64, 128)


def judge(args, directory: str, steps: int = 3000):
    """The evaluation classifier in ``directory``, trained there first (on the real training split of
    --dataset, ``steps`` steps of batch 256) if it holds none. Returns jitted (logits_fn, features_fn) of uint8 images."""
    ckpt_dir = os.path.join(directory, "checkpoints")
    def trained() -> bool:
        with Checkpoints(ckpt_dir) as ckpt:
            return ckpt.latest_step() is not None

    if not (os.path.isdir(ckpt_dir) and trained()):
        os.makedirs(directory, exist_ok=True)
        train_args = override(args, split="train", out=directory, resume=False, steps=steps,
                              batch_size=min(256, args.batch_size), lr=1e-3, warmup=200)
        images, labels = load_data(train_args)
        train_model(train_args, images, labels, directory, model="eval_classifier",
                    num_classes=data.NUM_CLASSES[args.dataset], channels=JUDGE_CHANNELS, label="eval classifier")
    net, params, config = load_model(ckpt_dir, expect="eval_classifier")
    if config["dataset"] != args.dataset:
        fail(f"{directory} judges {config['dataset']}, not {args.dataset}")
    logits = jax.jit(lambda x: net.apply(params, data.to_float(x)))
    feats = jax.jit(lambda x: net.apply(params, data.to_float(x), features=True))
    return logits, feats


def batched(fn, x, batch: int = 1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def final_loss(out_dir: str) -> float:
    rows = np.loadtxt(os.path.join(out_dir, "loss.csv"), delimiter=",", skiprows=1, ndmin=2)
    return float(rows[-50:, 1].mean())
