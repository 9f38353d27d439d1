"""One owner per run folder: a lock file holding the owner's pid and host, so that a second run with
the same folder is refused instead of writing its checkpoints over the first's.

A lock whose process has ended on this host (a run killed with SIGKILL, a machine that rebooted) is
stale: it is taken over, with a notice. A lock of another host cannot be checked from here, so it
is refused, and the message says which file to delete once that run is known to be gone.

On a local or shared filesystem the lock is created with ``O_CREAT | O_EXCL``, so of two runs
started at once exactly one gets it. A bucket (``gs://`` through ``etils.epath``) has no exclusive
create there: the lock is checked and then written, which catches a run started earlier but not one
started within the same moment. In a multi-process run only process 0 holds the lock (it stands for
the whole run); the caller tells the other processes whether it got it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from etils import epath

NAME = "jaxdiff.lock"


class RunLocked(ValueError):
    """Another live run holds the folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live owner from a new
    process that was given the dead owner's pid; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """``RunLock(folder).acquire()`` ... ``release()``; ``notice`` receives the one-line stale-lock notice."""

    def __init__(self, folder, notice=print):
        self.path = epath.Path(folder) / NAME
        self.notice, self.held = notice, False
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def acquire(self) -> RunLock:
        for _ in range(2):  # a second try after removing a stale lock
            if self._create():
                self.held = True
                return self
            owner = self._owner()
            if owner is None:
                continue  # released between our create and our read
            if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int) \
                    and not _alive(owner["pid"], owner.get("started")):
                self.notice(f"note: taking over {self.path}: its run (pid {owner['pid']} on {owner['host']}, "
                            f"since {owner.get('since', '?')}) is no longer running")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            raise RunLocked(self._refusal(owner))
        raise RunLocked(f"{self.path}: could not take the lock (another run took it at the same moment)")

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                if self._owner() == self.me:
                    self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        text = json.dumps(self.me)
        if "://" in str(self.path):  # a bucket: check, then write (see the module's docstring)
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _owner(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict):  # empty or damaged: a run that died while writing it, or not ours
            return {"damaged": text[:80]}
        return owner

    def _refusal(self, owner: dict) -> str:
        who = "a run whose lock file is unreadable" if "damaged" in owner else \
            f"another run (pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since', '?')})"
        return (f"{self.path.parent} is in use by {who}: wait for it to end or use another folder "
                f"(delete {self.path} only if that run is gone)")
