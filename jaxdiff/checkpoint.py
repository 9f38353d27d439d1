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
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

try:  # private: see _finish_every_read
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


@contextlib.contextmanager
def _finish_every_read():
    """orbax restores on a fresh event loop and closes it as soon as one array's read fails, while
    TensorStore goes on completing the other reads and calls back into the closed loop: one
    "Event loop is closed" traceback each, hundreds for a damaged checkpoint. For the duration of a
    restore, run orbax's loop until every task on it has finished, failed or not. (A private hook:
    if a later orbax lacks it, restores still work, only noisily when they fail.)"""
    original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if original is None:
        yield
        return

    def run(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            asyncio.set_event_loop(None)
            loop.close()

    asyncio_utils._run_sync_via_new_loop = run
    try:
        yield
    finally:
        asyncio_utils._run_sync_via_new_loop = original


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
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
            item_names=ITEMS,
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, config: dict) -> None:
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                ema=ocp.args.StandardSave(state.ema_params),
                config=ocp.args.JsonSave(_normalise(config)),
            ),
        )

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

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
            with _finish_every_read():
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
