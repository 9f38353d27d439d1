"""Orbax checkpoints of a train state with the configuration that made it.

Each step's checkpoint holds three items: the full train state (for ``--resume``), the EMA
parameters alone (what a pipeline loads) and the configuration as JSON. Orbax writes to a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp


class ConfigMismatch(ValueError):
    """A checkpoint was made under a configuration that differs in a setting that must match."""


def _normalise(config: dict) -> dict:
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from JSON


def compare_configs(saved: dict, wanted: dict, keys=None, where: str = "") -> None:
    """Raise ConfigMismatch naming each setting (among ``keys``, default all) that differs."""
    saved, wanted = _normalise(saved), _normalise(wanted)
    keys = sorted(set(saved) | set(wanted)) if keys is None else keys
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {wanted.get(k)!r}"
             for k in keys if saved.get(k) != wanted.get(k)]
    if diffs:
        raise ConfigMismatch(f"checkpoint {where} was made with another configuration:\n  " + "\n  ".join(diffs))


class Checkpoints:
    """Save every N steps and at the end (the caller decides when), keep the last ``max_to_keep``."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "ema", "config"),
        )

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
        step = self._require(step)
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, template_state, config: dict, must_match=None, step: int | None = None):
        """The train state at ``step`` (default latest), after checking the saved configuration."""
        step = self._require(step)
        compare_configs(self.config(step), config, must_match, where=f"{self.directory} step {step}")
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template_state)))
        return out["state"]

    def restore_ema(self, template_params, step: int | None = None):
        step = self._require(step)
        return self._manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(template_params)))["ema"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # the manager's background threads must not outlive a caller that only looked

    def _require(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step
