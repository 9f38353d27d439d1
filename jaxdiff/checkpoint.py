"""Orbax checkpoints of a train state with the configuration that made it.

Each step's checkpoint holds three items: the full train state (to resume), the EMA parameters
alone (what a pipeline loads) and the configuration as JSON. Orbax writes to a temporary folder
and renames it when complete, so a run killed mid-save leaves the previous checkpoint as the
latest. A damaged latest checkpoint (truncated or missing files) is reported in one line and
the newest intact one is loaded instead; a damaged step asked for by number is an error.
Paths are ``etils.epath`` paths, so ``gs://`` works where the machine can reach it. Reading
never creates folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading

import jax
import orbax.checkpoint as ocp
from etils import epath

try:  # private: see _QuietOrbax
    from orbax.checkpoint._src import asyncio_utils
except ImportError:  # pragma: no cover
    asyncio_utils = None

ITEMS = ("state", "ema", "config")


class ConfigMismatch(ValueError):
    """A checkpoint was made under a configuration that differs in a setting that must match.
    ``diffs`` lists (setting, checkpoint's value, this run's value)."""

    def __init__(self, message: str, diffs=()):
        super().__init__(message)
        self.diffs = list(diffs)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, damaged, or not a jaxdiff checkpoint."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full or read-only disk, a lost bucket): one line naming the
    step, the cause and the file. The steps saved before it are intact, so a resume continues from them."""


def _normalise(config: dict) -> dict:
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from JSON


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def compare_configs(saved: dict, wanted: dict, keys=None, where: str = "") -> None:
    """Raise ConfigMismatch naming each setting (among ``keys``, default all; nested settings as
    ``a.b``) whose value differs."""
    saved, wanted = _flatten(_normalise(saved)), _flatten(_normalise(wanted))
    keys = sorted(set(saved) | set(wanted)) if keys is None else keys
    diffs = [(k, saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)]
    if diffs:
        lines = [f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in diffs]
        raise ConfigMismatch(f"checkpoint {where} was made with another configuration:\n  " + "\n  ".join(lines), diffs)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _damaged_file(err: BaseException, folder: epath.Path) -> str:
    """The file an orbax/TensorStore error names, if any, else the step's folder."""
    found = re.findall(r"[\w./:-]*" + re.escape(folder.name) + r"[\w./-]*", str(err))
    return max(found, key=len) if found else str(folder)


class _QuietOrbax:
    """While any ``Checkpoints`` is open: orbax's asyncio loops (restores on the caller's thread, saves on
    its background threads) run until every task on them has finished, failed or not, and swallow the
    "exception was never retrieved" reports; orbax's own error logs with tracebacks are dropped.

    Why: when one array's read or write fails, orbax closes its loop while TensorStore goes on completing
    the others and calls back into the closed loop, one "Event loop is closed" traceback each, and orbax
    logs the same error again from each of its threads: a full disk gave 1,400 lines with the real error
    near the end. jaxdiff raises that error once, as one line (``CheckpointError``,
    ``CheckpointSaveError``). The loop runner is a private hook: a later orbax without it still works,
    only noisily when a read or write fails."""

    def __init__(self):
        self._lock, self._users, self._original = threading.Lock(), 0, None

    def acquire(self):
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            logging.getLogger("absl").addFilter(_drop_orbax_tracebacks)
            if getattr(asyncio_utils, "_run_sync_via_new_loop", None) is not None:
                self._original = asyncio_utils._run_sync_via_new_loop
                asyncio_utils._run_sync_via_new_loop = _run_every_task

    def release(self):
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            logging.getLogger("absl").removeFilter(_drop_orbax_tracebacks)
            if self._original is not None:
                asyncio_utils._run_sync_via_new_loop, self._original = self._original, None


def _run_every_task(coro):
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_unretrieved_is_reported_elsewhere)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        asyncio.set_event_loop(None)
        loop.close()


def _unretrieved_is_reported_elsewhere(loop, context):
    # the failed write or read that orbax's gather raised already carries the error; these are its siblings
    if "never retrieved" not in context.get("message", ""):
        loop.default_exception_handler(context)


def _drop_orbax_tracebacks(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


_quiet = _QuietOrbax()


def _save_failure(err: BaseException, directory, step) -> str:
    """One line for a failed save: the step, the operating system's reason (orbax and TensorStore wrap
    it: "[Errno 28] ...", "os_error_code='28'") and the file being written."""
    texts, chain = [], err
    while chain is not None and len(texts) < 10:
        texts.append(str(chain))
        chain = chain.__cause__ or chain.__context__
    text = " ".join(texts)
    code = next((c for c in (getattr(e, "errno", None) for e in (err, err.__cause__)) if isinstance(c, int)), None)
    found = re.search(r"\[Errno (\d+)\]|os_error_code='?(\d+)", text)
    if code is None and found:
        code = int(found.group(1) or found.group(2))
    why = os.strerror(code) if code else _one_line(err, 200)
    path = re.search(r'(?:Failed writing|Failed to open|local file|Failed to write)[^"]*"([^"]+)"', text)
    path = path.group(1) if path else getattr(err, "filename", None)
    where = f" (writing {path})" if path else ""
    return (f"checkpoint step {step} could not be saved in {directory}: {why}{where}; the checkpoints before it are "
            f"intact: make room or fix the disk, then resume")


def _placed(template):
    """``template`` with a sharding on every ``jax.ShapeDtypeStruct`` that has none: this process's first
    device. Without one, orbax takes the sharding saved in the checkpoint, which names the devices of
    the run that saved it and fails on another topology (a checkpoint of a multi-host run loaded on
    one machine)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def place(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(place, template)


class Checkpoints:
    """Save every N steps and at the end (the caller decides when), keep the last ``max_to_keep``.

    ``create=False`` (reading) refuses a folder that does not exist instead of making it. Use as a
    context manager, or call ``close()``: the manager's background threads must not outlive it.
    """

    def __init__(self, directory, max_to_keep: int = 3, create: bool = False):
        # orbax wants absolute paths; a URI (gs://...) is absolute already
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        if not create and not self.directory.exists():
            raise CheckpointError(f"no checkpoint folder {self.directory}")
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is a file, not a checkpoint folder")
        self._manager = ocp.CheckpointManager(
            self.directory,
            # a writer first removes what a failed or killed save left (N.orbax-checkpoint-tmp)
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                 cleanup_tmp_directories=create),
            item_names=ITEMS,
        )
        self._saving, self._failed, self._closed = None, False, False  # the step whose save may still fail
        _quiet.acquire()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, config: dict) -> None:
        """Start saving ``step`` (orbax writes in the background). A failure of this save or of an
        earlier one raises ``CheckpointSaveError``, here or at the next ``check``, ``wait`` or ``close``."""
        with self._saves(int(step)):
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    ema=ocp.args.StandardSave(state.ema_params),
                    config=ocp.args.JsonSave(_normalise(config)),
                ),
            )
        self._saving = int(step)

    def check(self) -> None:
        """Raise ``CheckpointSaveError`` if a background save has failed (cheap: no waiting), so a run
        stops at once rather than training on for hours without checkpoints."""
        with self._saves(self._saving):
            self._manager.check_for_errors()
            # orbax's finalize thread may have taken the error over (raised once) and holds it: look there too
            finalize = getattr(getattr(self._manager, "_finalize_thread", None), "get", lambda: None)()
            if finalize is not None and not finalize.is_alive() and getattr(finalize, "exception", None):
                raise finalize.exception

    @contextlib.contextmanager
    def _saves(self, step):
        try:
            yield
        except Exception as err:
            self._failed = True
            raise CheckpointSaveError(_save_failure(err, self.directory, self._saving or step)) from err

    def config(self, step: int | None = None) -> dict:
        """The configuration saved with ``step`` (default: the newest readable one)."""
        return self._newest("config", ocp.args.JsonRestore, step)[1]

    def restore(self, template_state, config: dict | None = None, must_match=None, step: int | None = None):
        """The train state at ``step`` (default: the newest intact one), after checking that the saved
        configuration equals ``config`` (in the settings ``must_match``, default all)."""
        def check(saved: dict, s: int):  # before reading the state: another model's state would not fit
            if config is not None:
                compare_configs(saved, config, must_match, where=f"{self.directory} step {s}")

        template_state = _placed(template_state)
        return self._newest("state", lambda: ocp.args.StandardRestore(template_state), step, check)[1]

    def restore_ema(self, template_params, step: int | None = None):
        """The EMA parameters at ``step`` (default: the newest intact one). Leaves of the template
        without a sharding (``jax.eval_shape``'s) are restored onto this process's first device."""
        template_params = _placed(template_params)
        return self._newest("ema", lambda: ocp.args.StandardRestore(template_params), step)[1]

    def wait(self) -> None:
        with self._saves(self._saving):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves under way and stop orbax's threads. After a failed save orbax's own close
        stops at the failure and leaves its other workers running (they then keep the interpreter from
        exiting), so the rest is closed anyway; a failure not yet reported raises ``CheckpointSaveError``."""
        if self._closed:
            return
        self._closed, reported = True, self._failed
        try:
            with self._saves(self._saving):
                self._manager.close()
        except CheckpointSaveError:
            finalize = getattr(self._manager, "_finalize_thread", None)  # private: the failed save's record
            if finalize is not None and hasattr(finalize, "set"):
                finalize.set(None)
            with contextlib.suppress(Exception):
                self._manager.close()
            if not reported:
                raise
        finally:
            if not self._failed:  # else the failed save's threads may still be logging: stay quiet
                _quiet.release()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading with a fallback to the newest intact step

    def _newest(self, item: str, make_args, step=None, check=None):
        """(step, item) at ``step`` if given, else at the newest step whose config and ``item`` both
        read back, saying on stderr which damaged steps were passed over. ``check(config, step)`` runs
        on the saved config before the item is read (its exceptions pass through)."""
        steps = [self._require(step)] if step is not None else self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for s in reversed(steps):
            try:
                config = self._read_step(s, "config", ocp.args.JsonRestore())
                if check is not None:
                    check(config, s)
                return s, config if item == "config" else self._read_step(s, item, make_args())
            except CheckpointError as err:
                if step is not None:
                    raise
                older = [o for o in steps if o < s]
                print(f"warning: {err}" + (f"; falling back to step {older[-1]}" if older else ""), file=sys.stderr)
        raise CheckpointError(f"no intact checkpoint in {self.directory} (steps {steps} are all damaged)")

    def _read_step(self, step: int, item: str, args):
        folder = self.directory / str(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except KeyError as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no {item!r} item "
                                  f"(a damaged or foreign checkpoint)") from err
        except Exception as err:  # orbax and TensorStore raise plain Exceptions too
            raise CheckpointError(f"checkpoint step {step} is damaged or unreadable ({_damaged_file(err, folder)}: "
                                  f"{_one_line(err, 160)}); load another with step=") from err

    def _require(self, step):
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it holds steps {steps}")
        return step
