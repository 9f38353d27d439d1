"""CLI glue the experiments share: flags, turning them into library calls, files out, errors out.

Training, checkpoints, specs, samplers and the judge live in ``jaxdiff``; here flags become a
``TrainConfig`` and a spec, library exceptions become one line on stderr and exit status 2, and
results become PNGs and plots (only on process 0 of a multi-process run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments.png import grid, upscale, write_png
from jaxdiff import data, distributed, sampling, specs, train, trainer
from jaxdiff.checkpoint import CheckpointError, CheckpointSaveError, ConfigMismatch
from jaxdiff.runlock import RunLock, RunLocked

# the flag behind each setting a resume must match (ConfigMismatch names settings)
FLAGS = {"train.seed": "--seed", "train.batch_size": "--batch-size", "train.learning_rate": "--lr",
         "train.warmup_steps": "--warmup", "train.ema_decay": "--ema", "meta.dataset": "--dataset",
         "meta.split": "--split", "meta.p_uncond": "--p-uncond", "meta.kl_weight": "--kl-weight",
         "spec.channels": "--channels", "spec.blocks_per_level": "--blocks-per-level",
         "spec.attention_levels": "--attention-levels"}


EXIT_GRACE_S = 10.0  # after a failed save, the longest the interpreter may take to exit (see _exit)


class Failure(Exception):
    """An expected failure of a CLI run: reported in one line, exit status 2."""


class NothingToDo(Exception):
    """A resume whose checkpoint is already at or past --steps: outputs are left alone."""


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def device_count(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 0 (all devices) or a positive count, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all devices) or a positive count, got {s}")
    return v


def seed_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**32-1, got {s!r}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**32-1, got {s}")
    return v


def finite_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def finite_floats(s):
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"every value must be finite, got {s!r}")
    return vals


def channels(s):
    try:
        ch = tuple(int(c) for c in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {s!r}") from None
    if not ch or min(ch) < 4 or any(c % 4 for c in ch):
        raise argparse.ArgumentTypeError(f"must be positive multiples of 4, got {s!r}")
    return ch


def levels(s):
    try:
        return tuple(sorted({int(v) for v in s.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {s!r}") from None


def probability(s):
    v = finite_float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def parser(description: str, steps: int, batch_size: int, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(data.DATASETS), default="mnist")
    g.add_argument("--data-dir", default=None, help=f"folder with the IDX .gz files (else ${data.ENV_DIR}, else "
                                                    f"download via tensorflow-datasets)")
    g.add_argument("--split", choices=["train", "test"], default="train", help="split to train on")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimisation steps (default {steps})")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"global batch, split over devices (default {batch_size})")
    g.add_argument("--lr", type=finite_float, default=1e-3, help="Adam learning rate after warmup (default 1e-3)")
    g.add_argument("--warmup", type=int, default=200, help="linear warmup steps (default 200)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampled parameters, reached after a "
                                                            "warm-up of min(decay, (1+n)/(10+n)) (default 0.999)")
    g.add_argument("--channels", type=channels, default=(64, 128, 256),
                   help="channels per U-Net level (default 64,128,256)")
    g.add_argument("--blocks-per-level", type=positive_int, default=1, help="conv blocks per U-Net level")
    g.add_argument("--attention-levels", type=levels, default=(), help="U-Net levels (0 = full resolution) with "
                                                                       "self-attention, e.g. 2 or 1,2")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype; auto = bf16 on GPU/TPU, f32 on CPU")
    g.add_argument("--steps-per-dispatch", type=positive_int, default=50, help="steps scanned in one device call")
    g.add_argument("--devices", type=device_count, default=0,
                   help="devices for data parallelism (0 = all; one process only)")
    g.add_argument("--seed", type=seed_int, default=0)
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--out", default=out, help=f"output folder or URI: checkpoints, PNGs, loss CSV (default {out})")
    g.add_argument("--save-every", type=positive_int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=positive_int, default=3, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=tuple(sampling.SAMPLERS), default="dpm++")
    g.add_argument("--sample-steps", type=positive_int, default=20, help="sampler steps (ddpm always uses T)")
    distributed.add_flags(p)
    return p


def override(args, **changes) -> argparse.Namespace:
    """The same flags with some changed: a stage's own step count, another split."""
    return argparse.Namespace(**{**vars(args), **changes})


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def label_unet(args, images, p_uncond: float):
    """The label U-Net the flags describe, its compute-dtype module, and its diffusion loss with labels
    dropped to the null label with probability ``p_uncond`` (1.0: an unconditional model)."""
    num_classes = data.NUM_CLASSES[args.dataset]
    spec = specs.LabelUNet(num_classes=num_classes, channels=args.channels, blocks_per_level=args.blocks_per_level,
                           attention_levels=args.attention_levels, image_shape=images.shape[1:])
    module = spec.module(compute_dtype(args.dtype))
    loss = train.diffusion_loss(spec.eps_model(module), spec.build_schedule(), p_uncond=p_uncond,
                                null_label=num_classes)
    return spec, module, loss


def check_levels(args, num_levels: int):
    if any(not 0 <= v < num_levels for v in args.attention_levels):
        raise Failure(f"--attention-levels must be in 0..{num_levels - 1} for {num_levels} levels, "
                      f"got {','.join(map(str, args.attention_levels))}")


def load_data(args, split: str | None = None):
    """(images, labels) of --dataset; with several processes, every process holds them all (they
    are small) and builds its own rows of each global batch."""
    return data.load(args.dataset, split or args.split, args.data_dir)


def devices(args):
    all_devices = jax.devices()
    if args.devices and jax.process_count() > 1:
        raise Failure(f"--devices applies to a single process; this run of {jax.process_count()} processes trains on "
                      f"all {len(all_devices)} of their devices")
    if args.devices:
        if args.devices > len(all_devices):
            raise Failure(f"--devices {args.devices} asked for, only {len(all_devices)} present")
        return all_devices[: args.devices]
    return all_devices


def check_sample_steps(args, num_timesteps: int) -> None:
    """--sample-steps against the schedule's T, before training rather than at sampling after it."""
    steps, sampler = getattr(args, "sample_steps", None), getattr(args, "sampler", None)
    if steps is None or sampler is None or sampling.get(sampler).default_steps is None:  # ddpm walks all T
        return
    if steps > num_timesteps:
        raise Failure(f"--sample-steps {steps} is more than the schedule's {num_timesteps} timesteps")


def check_paths(args) -> None:
    """Folder flags that the run writes into only after training, checked before it starts."""
    for name in ("eval_classifier",):
        value = getattr(args, name, None)
        if value and epath.Path(value).exists() and not epath.Path(value).is_dir():
            raise Failure(f"--{name.replace('_', '-')} {value} is a file; expected a folder (an evaluation "
                          f"classifier's, or one to make it in)")


def train_config(args, **changes) -> trainer.TrainConfig:
    values = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
                  ema_decay=args.ema, seed=args.seed, save_every=args.save_every, keep=args.keep,
                  steps_per_dispatch=args.steps_per_dispatch)
    return trainer.TrainConfig(**{**values, **changes})


def fit(args, spec, loss_fn, images, labels, out, *, meta: dict, label: str = "train", params=None,
        config: trainer.TrainConfig | None = None, stage: bool = False, flags: dict | None = None,
        batches=None, what: str | None = None, **fit_kw) -> trainer.TrainResult:
    """Train (or resume, with --resume) into ``out``: checkpoints/, loss.csv, loss.png. A run already at
    --steps raises NothingToDo, unless it is one ``stage`` of several (then its state is used as it is).
    ``flags`` names the flag behind a setting where it is not the one in FLAGS. ``batches``: a batch
    source instead of ``images`` and ``labels`` (then ``what`` says what is trained, for the first line);
    ``fit_kw`` go to ``trainer.fit`` (``mesh``, ``frozen``, ``every``)."""
    out = epath.Path(out)
    config = config or train_config(args)
    devs = devices(args)
    if config.batch_size % len(devs):
        raise Failure(f"--batch-size {config.batch_size} must be divisible by the {len(devs)} devices")
    if batches is None:
        batches = distributed.Batches(images, labels, config.batch_size, config.seed)
        what = (f"{spec.kind} {getattr(spec, 'channels', '')}, {spec.num_params():,} parameters, "
                f"{len(images)} training images")
    if trainer.is_writer():
        out.mkdir(parents=True, exist_ok=True)
        print(f"{label}: {what}, {len(devs)} x {devs[0].device_kind}", file=sys.stderr)
        # for the loss plot at the end; not a daemon: one stopped at exit inside a C extension can abort the process
        threading.Thread(target=_font_list).start()
    try:
        result = trainer.fit(spec, loss_fn, batches, config, directory=out / "checkpoints", params=params,
                             resume=args.resume, meta=meta, devices=devs, loss_log=out / "loss.csv", label=label,
                             **fit_kw)
    except ConfigMismatch as err:
        names = {**FLAGS, **(flags or {})}
        named = [f"{names.get(k, k)}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in err.diffs]
        raise Failure(f"--resume: {out} was trained with other settings: " + "; ".join(named)) from err
    except trainer.RunExists as err:
        raise Failure(f"{out / 'checkpoints'} already holds checkpoints: pass --resume to continue, or choose "
                      f"another --out") from err
    if result.trained_steps == 0 and stage:
        note(f"{label}: already trained ({int(result.state.step)} steps)")
        return result
    if result.trained_steps == 0:
        raise NothingToDo(f"{label}: {out} is already at step {int(result.state.step)} >= --steps {config.steps}; "
                          f"nothing to do (outputs left as they are)")
    if result.start_step:
        note(f"{label}: resumed from step {result.start_step}")
    if trainer.is_writer():
        plot_loss(out / "loss.csv", out / "loss.png", label)
    return result


@contextlib.contextmanager
def cli(args):
    """Run an experiment's body: join the run's processes (``jaxdiff.distributed``), check the flags
    that are used only after training, make sure --out is a folder (one folder shared by every process
    of a multi-process run) and take its lock (``jaxdiff.runlock``: one run per folder; released at the
    end). Expected failures (bad flags or data, an unwritable, unshared, damaged or busy --out, a
    checkpoint that could not be saved) become one line on stderr and exit status 2, Ctrl-C one line
    and status 130; an --out folder this run created is removed again if the run fails before writing
    anything into it. ``args``: the parsed flags of ``parser``; or only the --out path, for a program
    without the distributed flags, which then runs as one process."""
    joins = hasattr(args, "out")
    out = epath.Path(args.out if joins else args)
    created, lock = False, None
    try:
        if joins:
            distributed.from_args(args)
            check_sample_steps(args, specs.linear_schedule().num_timesteps)  # every experiment's schedule
            check_paths(args)
        if out.exists() and not out.is_dir():
            raise Failure(f"--out {out} is a file, not a folder")
        if not out.exists():
            try:
                out.mkdir(parents=True, exist_ok=True)  # another process of the run may make it at once
            except OSError as err:
                raise Failure(f"cannot create --out {out}: {err.strerror or err}") from err
            created = True
        elif not _writable(out):
            raise Failure(f"--out {out} is not writable")
        distributed.check_shared_folder(out)
        lock = _lock(out)
        yield out
    except NothingToDo as err:
        note(str(err))
        sys.exit(0)
    except KeyboardInterrupt as err:
        where = str(err) if isinstance(err, trainer.Interrupted) else "interrupted"
        resume = "; run the same command with --resume to continue" if getattr(err, "checkpoint", None) else ""
        note(f"{where}{resume}")
        _exit(130, lock)
    except (Failure, ValueError, CheckpointError, data.DataUnavailable, OSError) as err:
        if lock is not None:
            lock.release()
        if created:
            with contextlib.suppress(OSError):  # another process may have removed it, or written to it
                if not any(out.iterdir()):
                    out.rmdir()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        _exit(2, lock, threads_may_hang=isinstance(err, CheckpointSaveError))
    finally:
        if lock is not None:
            lock.release()


def _lock(out: epath.Path) -> RunLock | None:
    """Process 0 takes --out's lock for the whole run; every process learns whether it did, so that
    all of a refused run's processes stop together."""
    lock, refusal = None, ""
    if jax.process_index() == 0:
        try:
            lock = RunLock(out, notice=note).acquire()
        except RunLocked as err:
            refusal = str(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(refusal == ""))):
            refusal = refusal or f"process 0 could not take the lock of {out} (another run holds it)"
    if refusal:
        raise Failure(refusal)
    return lock


def _exit(code: int, lock: RunLock | None, threads_may_hang: bool = False) -> None:
    """sys.exit(code), the lock released first. After a failed save, orbax may leave threads behind (in a
    multi-process run, waiting in the distributed key-value store for a save that will never finish)
    that would keep the interpreter from exiting: a watchdog, started only as the interpreter shuts
    down, ends the process with ``code`` if that takes longer than a few seconds."""
    if lock is not None:
        lock.release()
    if threads_may_hang:
        _exit_within(code, EXIT_GRACE_S)
    sys.exit(code)


def _exit_within(code: int, seconds: float) -> None:
    def start():
        timer = threading.Timer(seconds, lambda: (sys.stderr.flush(), os._exit(code)))
        timer.daemon = True
        timer.start()

    # runs when the interpreter starts to shut down, before it waits for the threads left (private, since 3.9)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(start)


def note(message: str) -> None:
    """A line on stderr, from process 0 only in a multi-process run."""
    if trainer.is_writer():
        print(message, file=sys.stderr)


def _writable(folder: epath.Path) -> bool:
    probe = folder / f".jaxdiff-write-test-{jax.process_index()}"  # one per process: they probe at once
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def _one_line(err: BaseException) -> str:
    if isinstance(err, PermissionError) and err.filename:
        return f"cannot write {err.filename}: permission denied"
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return "; ".join(ln.strip() for ln in lines) if lines else type(err).__name__


def save_grid(path, images_uint8: np.ndarray, rows: int, cols: int, scale: int = 2):
    """(rows * cols, H, W, C) uint8 images, row-major, as one PNG (written by process 0 only)."""
    if trainer.is_writer():
        write_png(path, upscale(grid(images_uint8.reshape(rows, cols, *images_uint8.shape[1:])), scale))


def plot_loss(csv_path, png_path, title: str):
    """The training loss against the step, log scale, with a running mean (matplotlib; skipped with a
    note when it is not installed: pip install 'jaxdiff[experiments]')."""
    plt = pyplot()
    rows = read_csv(csv_path)
    if plt is None or len(rows) == 0:
        return
    steps, losses = rows[:, 0], rows[:, 1]
    w = max(1, len(losses) // 100)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, color="0.75", lw=0.8, label="loss per step")
    if w > 1:
        ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), color="C0",
                label=f"running mean of {w}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, png_path)


def _font_list() -> None:
    """Have matplotlib build its list of the system's fonts, which its first use on a machine does (seconds:
    every font file is read), while training runs rather than after it."""
    with contextlib.suppress(Exception):
        import matplotlib.font_manager  # noqa: F401


class Later:
    """``fn()`` in a background thread once ``start()`` is called (e.g. as ``trainer.fit``'s ``on_compiled``, to
    compile samplers while training runs); ``wait()`` gives its result or raises its error, and runs it here
    if it was never started. The thread is not a daemon: if the run fails meanwhile, the interpreter waits for
    it at exit, since one stopped inside an XLA compile aborts the process (and its clean exit status)."""

    def __init__(self, fn):
        self.fn, self.thread, self.outcome = fn, None, None

    def start(self) -> None:
        def body():
            try:
                self.outcome = (True, self.fn())
            except BaseException as err:  # handed to wait()
                self.outcome = (False, err)

        self.thread = threading.Thread(target=body)
        self.thread.start()

    def wait(self):
        if self.thread is None:
            return self.fn()
        self.thread.join()
        ok, value = self.outcome
        if not ok:
            raise value
        return value


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots (pip install 'jaxdiff[experiments]')", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp.png")
    fig.tight_layout()
    with tmp.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    tmp.replace(path)


def speed(result: trainer.TrainResult) -> str:
    rate = result.images_per_second
    return f"{rate:,.0f} img/s after compile" if rate == rate else "a single dispatch, compile included"


def read_csv(path) -> np.ndarray:
    """A numeric CSV with a header row, read through epath (so from a gs:// bucket too)."""
    return np.loadtxt(io.StringIO(epath.Path(path).read_text()), delimiter=",", skiprows=1, ndmin=2)


def final_loss(out) -> float:
    return float(read_csv(epath.Path(out) / "loss.csv")[-50:, 1].mean())
