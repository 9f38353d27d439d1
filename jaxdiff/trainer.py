"""The training loop: any model spec, any loss, any batch source, checkpointed and resumable.

    from jaxdiff import data, specs, train, trainer
    spec = specs.LabelUNet(num_classes=10)
    loss = train.diffusion_loss(spec.eps_model(spec.module()), spec.build_schedule(), p_uncond=0.1, null_label=10)
    images, labels = data.load("fashion_mnist", data_dir="...")
    config = trainer.TrainConfig(steps=2000, batch_size=128)
    result = trainer.fit(spec, loss, data.Batches(images, labels, 128, seed=0), config, directory="run/checkpoints")
    # interrupted? the same call with resume=True continues from the newest intact checkpoint, exactly

Every ``save_every`` steps (and at the end) the state is saved with orbax; a resume checks that
the spec, the settings that change what the run computes (``TrainConfig.MEANING``) and the
caller's ``meta`` are those of the checkpoint, and raises ``ConfigMismatch`` naming each one that
is not. Several steps run per device call (``steps_per_dispatch``) over the data-parallel mesh;
updates with a non-finite loss or gradient are skipped, counted and reported. Progress goes to stderr,
the loss to an optional CSV. Failures are exceptions, never exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import numpy as np
from etils import epath

from jaxdiff import distributed, host, sharding, train
from jaxdiff.checkpoint import Checkpoints, ConfigMismatch

__all__ = ["TrainConfig", "TrainResult", "RunExists", "ConfigMismatch", "Interrupted", "fit", "Progress", "LossLog"]


class RunExists(ValueError):
    """The checkpoint folder already holds a run and ``resume`` was not asked for."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during ``fit``: the saves under way were finished first. ``step``: the last step
    trained; ``checkpoint``: the newest saved step (None: none yet), from which a resume continues."""

    def __init__(self, label: str, step: int, checkpoint: int | None, directory):
        self.step, self.checkpoint = step, checkpoint
        saved = f"its newest checkpoint is step {checkpoint} in {directory}" if checkpoint is not None else \
            "no checkpoint saved yet"
        super().__init__(f"{label}: interrupted after step {step}; {saved}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to optimise. The settings in ``MEANING`` change what the run computes, so a
    resume must agree with the checkpoint in them; the others (length, checkpoint cadence, steps
    per device call) may change between the two halves of a run."""

    steps: int
    batch_size: int
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    save_every: int = 1000
    keep: int = 3
    steps_per_dispatch: int = 50
    weight_decay: float = 0.0  # > 0: AdamW
    grad_accum: int = 1  # average the gradients of this many steps, then update once (the EMA still steps each step)

    MEANING: ClassVar[tuple] = ("batch_size", "learning_rate", "warmup_steps", "grad_clip", "ema_decay", "seed")
    # settings added later: part of the meaning only when set, so checkpoints written before them still resume
    LATER_MEANING: ClassVar[dict] = {"weight_decay": 0.0, "grad_accum": 1}

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "keep", "steps_per_dispatch", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, (int, np.integer)) \
                or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite positive number, got {self.learning_rate!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite positive number, got {self.grad_clip!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")

    def optimizer(self):
        return train.make_optimizer(train.OptimConfig(self.learning_rate, self.warmup_steps, self.grad_clip,
                                                      self.ema_decay, self.weight_decay, self.grad_accum))

    def meaning(self) -> dict:
        out = {k: getattr(self, k) for k in self.MEANING}
        later = {k: getattr(self, k) for k, default in self.LATER_MEANING.items() if getattr(self, k) != default}
        return {**out, **later}


@dataclasses.dataclass
class TrainResult:
    state: train.TrainState
    start_step: int  # 0, or the step the run resumed from
    seconds: float  # wall time of this call's training
    images_per_second: float  # after the first dispatch, which carries the compile; nan if there was one
    first_dispatch: float = float("nan")  # seconds of the first dispatch, its compile included

    @property
    def trained_steps(self) -> int:
        return int(self.state.step) - self.start_step


def is_writer() -> bool:
    """Only process 0 of a multi-process run writes logs, plots and images, and prints."""
    return jax.process_index() == 0


class Progress:
    """Progress on stderr: a line before the first dispatch (which compiles), then step, loss,
    images/s and time left, at most once a second, the compile left out of the rate."""

    def __init__(self, label: str, total: int, batch_size: int, stream=None):
        self.label, self.total, self.batch = label, total, batch_size
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_print, self.warm_from, self.warm_steps = 0.0, None, 0

    def start(self, step: int, devices: int) -> None:
        self._print(f"{self.label}: compiling the training step (batch {self.batch} over {devices} device"
                    f"{'s' if devices > 1 else ''}), then steps {step}..{self.total} ...", end=True)
        self.t0 = time.perf_counter()

    def update(self, step: int, count: int, loss: float) -> None:
        now = time.perf_counter()
        if self.warm_from is None:  # the first dispatch: compile + count steps
            self.warm_from = now
            self._print(f"{self.label}: first {count} steps (with compile) took {now - self.t0:.1f}s", end=True)
        else:
            self.warm_steps += count
        if now - self.last_print < 1.0 and step < self.total:
            return
        self.last_print = now
        rate = self.warm_steps / (now - self.warm_from) if self.warm_steps else float("nan")
        left = f"{(self.total - step) / rate:,.0f}s left" if rate == rate and rate > 0 else "time left: measuring"
        bar = "#" * int(20 * step / self.total)
        img = f"{rate * self.batch:,.0f} img/s" if rate == rate else "- img/s"
        self._print(f"{self.label} [{bar:<20}] {step}/{self.total} loss {loss:.4f} {img} {left}")

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)

    def _print(self, line: str, end: bool = False) -> None:
        if self.tty and not end:  # one line rewritten in place
            print("\r" + line, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


class LossLog:
    """``step,loss`` rows in a CSV; a resumed run first drops the rows past its checkpoint. The file is
    rewritten whole (and atomically), since a bucket (gs://) cannot append: at most every
    ``every_s`` seconds and on ``flush`` (at each checkpoint and at the end), so a long run does not
    rewrite a growing file at every dispatch."""

    def __init__(self, path, resume_step: int = 0, every_s: float = 10.0):
        self.path, self.every_s = epath.Path(path), every_s
        rows = self.path.read_text().splitlines() if resume_step and self.path.exists() else []
        self.rows = ["step,loss", *(r for i, r in enumerate(rows[1:], 2) if r and self._step(r, i) <= resume_step)]
        self.flush()

    def _step(self, row: str, line: int) -> int:
        """The step of a kept row, checked whole: a damaged log is refused before training, not by the plot after it."""
        try:
            step, loss = row.split(",")
            float(loss)
            return int(step)
        except ValueError:
            raise ValueError(f"{self.path} line {line}: expected 'step,loss' numbers, got {row[:80]!r} (fix or "
                             f"delete that line, or the file)") from None

    def append(self, first_step: int, losses) -> None:
        self.rows += [f"{first_step + i},{float(v):.6f}" for i, v in enumerate(losses)]
        if time.monotonic() - self._written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._write(self.rows)
        self._written = time.monotonic()

    def _write(self, rows) -> None:
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        tmp.replace(self.path)


def checkpoint_config(spec, config: TrainConfig, meta: dict | None) -> dict:
    """What a checkpoint records about its run, and what a resume must agree with."""
    return {"spec": spec.to_dict() if spec is not None else None, "train": config.meaning(), "meta": meta or {}}


def fit(spec, loss_fn: Callable, batches, config: TrainConfig, *, directory=None, params: Any = None,
          resume: bool = False, meta: dict | None = None, devices=None, loss_log=None,
          progress: bool | Progress = True, label: str = "train", mesh: str | None = None,
          frozen: Any = None, every: tuple[int, Callable] | None = None,
          on_compiled: Callable[[], None] | None = None) -> TrainResult:
    """Train ``params`` (default: ``spec.init(config.seed)``) on ``loss_fn`` for ``config.steps`` steps.

    ``batches.stack(start, count)`` gives ``count`` consecutive global batches (x, y) stacked on a
    leading axis (``jaxdiff.data.Batches`` does, deterministically from its seed, so a resumed run
    sees the batches the uninterrupted run would have); in a multi-process run, either the whole
    batches or this process's rows of them (``jaxdiff.distributed.Batches``). ``directory``: the
    checkpoint folder (None: no checkpoints). ``resume``: continue from its newest intact
    checkpoint; without it, a folder that already holds checkpoints raises ``RunExists``. A resume
    whose checkpoint is at or past ``config.steps`` trains nothing and returns the restored state.
    ``meta``: JSON-able settings of the caller's (dataset, loss weights) that a resume must match too.
    ``mesh``: None (default) replicates the state on every device (data parallelism); a setting such as
    ``"data=2,fsdp=4"`` (``jaxdiff.sharding``) splits parameters and optimizer state over the fsdp axis
    and the batch over both. It does not change what the run computes, so a resume may use another.
    ``frozen``: parameters the loss reads but does not train (a LoRA's base network); then ``loss_fn(frozen)``
    is the loss. They are placed on the mesh as the state is (replicated, or split over fsdp), enter every
    step as data and are neither checkpointed nor averaged.
    ``every``: ``(n, fn)`` calls ``fn(state, step)`` after every n-th step (dispatches end there), on every
    process, e.g. to draw validation samples from the EMA parameters while training goes on.
    ``on_compiled``: called once the training program is compiled and its first dispatch is on its way, on
    every process (not at all when there is nothing to train), e.g. to compile the samplers in a background
    thread while training goes on.

    The next batches are drawn while the device still runs the last dispatch: ``stack`` must give fresh
    arrays that it does not change afterwards (on a CPU the device may read them in place).
    """
    if every is not None and (isinstance(every[0], bool) or not isinstance(every[0], (int, np.integer))
                              or every[0] < 1 or not callable(every[1])):
        raise ValueError(f"every must be (a positive number of steps, a function of (state, step)), got {every!r}")
    tx = config.optimizer()
    if params is None and mesh is None:
        params = spec.init(config.seed)
    devices = list(jax.devices() if devices is None else devices)
    if getattr(batches, "batch_size", config.batch_size) != config.batch_size:
        raise ValueError(f"the batches hold {batches.batch_size} examples, "
                         f"the config says batch_size {config.batch_size}")
    if config.batch_size % len(devices):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {len(devices)} devices")
    owned = [sum(d.process_index == p for d in devices) for p in range(jax.process_count())]
    if min(owned) != max(owned) or not owned[0]:  # the data axis must span every process evenly
        raise ValueError(f"every process must give the same number of devices to the run; per process: {owned}")
    if mesh is None:
        mesh = train.make_mesh(devices)
        # replicated over the mesh before a restore, so orbax restores into globally sharded arrays
        fresh = host.run_once(lambda p: train.init_state(p, tx, config.seed), params,
                              values=lambda: 4 * sum(np.size(a) for a in jax.tree.leaves(params)))
        state = train.replicate(fresh, mesh)
    else:  # split over the mesh; a restore reads into the same layout
        mesh = sharding.make_mesh(mesh, devices)
        state = sharding.init_state(params, tx, config.seed, mesh, init=lambda: spec.init(config.seed))
    if frozen is not None:
        frozen = (sharding.place(frozen, sharding.shardings(frozen, mesh)) if sharding.is_sharded(mesh)
                  else train.replicate(frozen, mesh))
    saved = checkpoint_config(spec, config, meta)
    if directory is not None:
        distributed.check_shared_folder(directory)
    ckpt = Checkpoints(directory, max_to_keep=config.keep, create=True) if directory is not None else None
    try:
        start = 0
        if ckpt is not None and ckpt.latest_step() is not None:
            if not resume:
                raise RunExists(f"{ckpt.directory} already holds checkpoints (steps {ckpt.steps()}): "
                                f"resume to continue, or choose another folder")
            state = ckpt.restore(state, saved, step=None)
            start = int(state.step)
        if start >= config.steps:
            return TrainResult(state, start, 0.0, float("nan"))
        log = LossLog(loss_log, start) if loss_log is not None and is_writer() else None
        at = {"step": start}  # where _loop has got to, for an interruption's message
        try:
            result = _loop(state, spec, loss_fn, tx, batches, config, mesh, ckpt, saved, log, progress, label, at,
                           frozen, every, on_compiled)
            if ckpt is not None:
                ckpt.wait()
        except KeyboardInterrupt:
            newest = None
            if ckpt is not None:
                with contextlib.suppress(Exception):  # a failed save: the steps before it stay the newest
                    ckpt.wait()
                newest = ckpt.latest_step()
            raise Interrupted(label, at["step"], newest, ckpt.directory if ckpt else None) from None
        return result
    finally:
        if ckpt is not None:
            ckpt.close()


def _loop(state, spec, loss_fn, tx, batches, config, mesh, ckpt, saved, log, progress, label, at,
          frozen=None, every=None, on_compiled=None) -> TrainResult:
    sharded = sharding.is_sharded(mesh)
    multi_step = (sharding.train_step(loss_fn, tx, config.ema_decay, mesh, state, frozen=frozen) if sharded
                  else train.data_parallel(loss_fn, tx, config.ema_decay, mesh))
    put = sharding.shard_batches if sharded else train.shard_batches
    start = step = int(state.step)
    show = progress if isinstance(progress, Progress) else (
        Progress(label, config.steps, config.batch_size) if progress and is_writer() else None)
    if show:
        show.start(step, mesh.devices.size)
    skips = Skips(label, show.stream if show else sys.stderr)
    t0, warm, warm_images = time.perf_counter(), None, 0

    def account(first: int, k: int, metrics) -> None:
        """What one dispatch did: its losses (the wait for it), skipped updates, the log and progress."""
        nonlocal warm, warm_images
        losses = np.asarray(metrics["loss"])
        skips.update(first, np.asarray(metrics["finite"]))
        if ckpt is not None:
            ckpt.check()  # a background save that failed stops the run here, not at the end
        if warm is None:
            warm = time.perf_counter()
        else:
            warm_images += k * config.batch_size
        if log is not None:
            log.append(first + 1, losses)
        if show:
            show.update(first + k, k, float(losses.mean()))

    # One dispatch stays in flight: the host draws and sends the next batches while the device runs the
    # last ones, rather than leaving the device idle for that time after every dispatch.
    inflight = []
    while step < config.steps:
        k = min(config.steps_per_dispatch, config.steps - step, config.save_every - step % config.save_every)
        if every is not None:
            k = min(k, every[0] - step % every[0])
        stacked = batches.stack(step, k)
        check_batches(stacked, step, k, spec, first=step == start)
        local = _local(stacked, config.batch_size)
        state, metrics = multi_step(state, put(local, mesh), frozen)
        if on_compiled is not None and step == start:
            on_compiled()
        inflight.append((step, k, metrics))
        step += k
        at["step"] = step  # dispatched: the device trains it whatever the host does next
        saves = ckpt is not None and (step % config.save_every == 0 or step == config.steps)
        calls = every is not None and step % every[0] == 0
        # before a checkpoint (or a call) every dispatch is accounted: loss.csv, flushed with the checkpoint,
        # must hold exactly its steps, which a resume relies on; the save waits for the state anyway
        while len(inflight) > (0 if saves or calls else 1):
            account(*inflight.pop(0))
        if saves:
            ckpt.save(step, state, saved)
            if log is not None:
                log.flush()
        if calls:
            every[1](state, step)
    while inflight:
        account(*inflight.pop(0))
    if log is not None:
        log.flush()
    if show:
        show.close()
    skips.close(step - start)
    rate = warm_images / (time.perf_counter() - warm) if warm_images else float("nan")
    first = warm - t0 if warm is not None else float("nan")
    return TrainResult(state, start, time.perf_counter() - t0, rate, first)


class Skips:
    """Say when updates are being skipped for a non-finite loss or gradient (bad batches, a learning
    rate too high, overflow in reduced precision): a warning when it starts, again at most every
    ``every_s`` seconds while it goes on, and the count at the end. Process 0 speaks."""

    def __init__(self, label: str, stream, every_s: float = 60.0):
        self.label, self.stream, self.every_s = label, stream, every_s
        self.count, self.last = 0, None

    def update(self, first_step: int, finite) -> None:
        bad = int(np.size(finite) - np.count_nonzero(finite))
        self.count += bad
        if not bad or not is_writer() or (self.last is not None and time.monotonic() - self.last < self.every_s):
            return
        self.last = time.monotonic()
        print(f"{self.label}: warning: {bad} of the {np.size(finite)} updates of steps {first_step + 1}.."
              f"{first_step + np.size(finite)} skipped (non-finite loss or gradients; {self.count} so far): the "
              f"parameters are not changed by them", file=self.stream, flush=True)

    def close(self, steps: int) -> None:
        if self.count and is_writer():
            every = " (every one: the parameters did not change)" if self.count == steps else ""
            print(f"{self.label}: warning: {self.count} of {steps} updates skipped for a non-finite loss or "
                  f"gradients{every}", file=self.stream, flush=True)


def check_batches(stacked, step: int, count: int, spec, first: bool) -> None:
    """What ``batches.stack(step, count)`` gave must be ``count`` batches (images, labels): every dispatch
    checks the count (a short source would count steps it never took); for a spec of pixel images
    (one with ``image_shape``) the first also the images' dtype, range and shape and the labels' dtype and
    range. Raises ValueError naming what was wrong."""
    where = f"batches.stack({step}, {count})"
    if not isinstance(stacked, (tuple, list)) or len(stacked) != 2:
        raise ValueError(f"{where} must give a pair (images, labels), got {type(stacked).__name__}")
    x, y = stacked
    for name, a in (("images", x), ("labels", y)):
        n = np.shape(a)[0] if np.ndim(a) else None
        if n != count:
            raise ValueError(f"{where} gave {n} batches of {name} (shape {np.shape(a)}); expected {count}: a batch "
                             f"source must give every batch it is asked for")
    image_shape = tuple(getattr(spec, "image_shape", ()) or ())
    if not first or not image_shape:  # latents and text states (Stable Diffusion) are the loss's to read
        return
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8:
        lo, hi = (float(np.min(x)), float(np.max(x))) if x.size and np.issubdtype(x.dtype, np.number) else (0, 0)
        raise ValueError(f"{where} gave images of dtype {x.dtype} (values {lo:g}..{hi:g}); expected uint8 in 0..255 "
                         f"(jaxdiff.data.to_uint8 converts [-1, 1] floats; scale [0, 1] floats by 255)")
    if x.shape[2:] != image_shape:
        raise ValueError(f"{where} gave images of shape {x.shape[2:]} each; the spec's image_shape is {image_shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape[:2] != (count, x.shape[1]):
        raise ValueError(f"{where} gave labels of dtype {y.dtype} and shape {y.shape}; expected integers of shape "
                         f"({count}, {x.shape[1]})")
    classes = getattr(spec, "num_classes", None)
    if classes and y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{where} gave labels {y.min()}..{y.max()}; the spec has classes 0..{classes - 1}")


def _local(stacked, batch_size: int):
    """This process's rows of stacked batches (steps, rows, ...): the batches may hold the whole global
    batch (every process the same, as ``jaxdiff.data.Batches`` gives) or only this process's rows
    (``jaxdiff.distributed.Batches``); with one process the two are the same."""
    rows = distributed.local_rows(batch_size)
    local = rows.stop - rows.start

    def pick(a):
        a = np.asarray(a)
        if a.ndim < 2 or a.shape[1] not in (local, batch_size):
            raise ValueError(f"batches.stack gave an array of shape {a.shape}; expected (steps, {batch_size}, ...) "
                             f"or this process's (steps, {local}, ...)")
        return a if a.shape[1] == local else a[:, rows]

    return jax.tree.map(pick, stacked)
