"""One run over two JAX processes on this CPU machine, as on two hosts of a TPU slice or two GPU nodes:
``python -m experiments.mnist_cfg`` twice, joined through a coordinator on a loopback port, two
simulated devices each (the collectives go through gloo). It must compute what one process on four
devices computes, resume exactly, let only process 0 write logs and pictures, and refuse an --out
that is not one shared folder."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fast_xla import FAST_XLA
from test_data import write_split

from jaxdiff import data, distributed, trainer

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds for one launch of every process; a hung collective must not hang CI
GRACE = 20  # seconds the others get to finish once one process has failed, before they are killed
# --per-label 5 with the 5 default gammas: every sampling call has 50 rows, so the sampler compiles once
TINY = ["--batch-size", "8", "--steps-per-dispatch", "2", "--save-every", "2", "--channels", "8,16",
        "--sample-steps", "2", "--warmup", "1", "--per-label", "5"]
PICTURES = ["loss.png", "samples.png", "samples_gamma3.png", "negative.png"]

# Runs a module as __main__ and logs, one per line, every path this process opens for writing,
# creates, renames, removes or truncates from Python (orbax's TensorStore writes in C++ are not seen).
RUNNER = r"""
import os, runpy, sys
log = open(sys.argv[1], "w", buffering=1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def record(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        log.write(os.path.abspath(os.fsdecode(path)) + "\n")
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (mode is None and flags & WRITE_FLAGS):
            record(path)
    elif event == "os.rename":
        record(args[0]); record(args[1])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
        record(args[0])
sys.addaudithook(hook)
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict:
    """This environment without anything that would make JAX or jaxdiff join another cluster
    (Slurm, Open MPI, TPU, JAXDIFF_*) or change its numbers, on the CPU with ``devices`` devices."""
    drop = ("SLURM_", "OMPI_", "TPU_", "JAXDIFF_", "JAX_", "XLA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    # XLA's CPU backend compiles in a fraction of the time with FAST_XLA; every run here uses it, so the runs
    # still compare like with like
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


class Launch:
    """Processes started together; ``codes``, ``stdout``, ``stderr`` and ``writes`` (audited paths)
    per process, once every one has ended or been killed."""

    def __init__(self, folder: Path, name: str, argvs, devices: int, module: str = "experiments.mnist_cfg",
                 caches=None):
        folder.mkdir(parents=True, exist_ok=True)
        env = environment(devices)
        caches = caches or [None] * len(argvs)
        files = [(folder / f"{name}.{i}.stdout", folder / f"{name}.{i}.stderr", folder / f"{name}.{i}.writes")
                 for i in range(len(argvs))]
        procs = []
        for argv, (out, err, writes), cache in zip(argvs, files, caches, strict=True):
            # XLA's own caches off: their folder would enter the key, and each process reads its own copy
            cached = {} if cache is None else {"JAX_COMPILATION_CACHE_DIR": str(cache),
                                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
                                               "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES": "none"}
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, str(writes), module, *map(str, argv)],
                                              cwd=ROOT, env={**env, **cached}, stdout=o, stderr=e))
        self.timed_out = _wait(procs)
        self.codes = [p.returncode for p in procs]
        self.stdout = [o.read_text() for o, _, _ in files]
        self.stderr = [e.read_text() for _, e, _ in files]
        self.writes = [set(w.read_text().split("\n")) - {""} if w.exists() else set() for _, _, w in files]

    def report(self) -> str:
        """Every process's exit status and the end of its stderr, for an assertion's message."""
        parts = [f"timed out after {LAUNCH_TIMEOUT}s" if self.timed_out else ""]
        parts += [f"--- process {i}: exit {c}\n{e[-3000:]}"
                  for i, (c, e) in enumerate(zip(self.codes, self.stderr, strict=True))]
        return "\n".join(parts)


def _wait(procs) -> bool:
    """Wait for every process; once one fails, the others get GRACE seconds (they are likely stuck in a
    collective with it), then are killed, as they are at the overall deadline. True if time ran out."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + GRACE):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return now > deadline
        time.sleep(0.1)
    return False


def two_processes(folder, name, args, outs=None, caches=None) -> Launch:
    """mnist_cfg as processes 0 and 1 of one run (``outs``: each process's --out, else args hold it;
    ``caches``: each process's compilation cache folder, or None)."""
    port = free_port()
    argvs = [[*args, *(["--out", outs[i]] if outs else []), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2", "--process-id", str(i)] for i in range(2)]
    return Launch(folder, name, argvs, devices=2, caches=caches)


def losses(out: Path) -> np.ndarray:
    rows = (out / "loss.csv").read_text().split()
    assert rows[0] == "step,loss", rows
    return np.array([[float(v) for v in r.split(",")] for r in rows[1:]])


def ema(out: Path):
    from jaxdiff.pipeline import load_model

    return load_model(out / "checkpoints", expect="label_unet")[2]


def test_two_processes_train_as_one_process_write_as_one_and_resume_exactly(tmp_path):
    """One test, not three sharing a fixture: under pytest-xdist a module fixture would run once per
    worker, and these launches are most of the module's time."""
    write_split(tmp_path / "idx", "train", 64)
    write_split(tmp_path / "idx", "test", 32)
    args = [*TINY, "--steps", "4", "--data-dir", tmp_path / "idx"]
    # process 0 keeps its programs in a compilation cache (JAX writes one from process 0 only), which the
    # resume below reads back instead of compiling them again
    two = two_processes(tmp_path / "logs", "two", [*args, "--out", tmp_path / "two"],
                        caches=[tmp_path / "xla-cache", None])
    assert two.codes == [0, 0] and not two.timed_out, two.report()
    one = Launch(tmp_path / "logs", "one", [[*args, "--out", tmp_path / "one"]], devices=4)
    assert one.codes == [0], one.report()
    same_numbers_as_one_process(tmp_path / "two", tmp_path / "one", two)
    only_process_0_writes(tmp_path / "two", two)
    resumes_exactly(tmp_path, args)


def same_numbers_as_one_process(two_out, one_out, two):
    assert "4 x cpu" in two.stderr[0] and "batch 8 over 4 devices" in two.stderr[0]  # one data axis over both
    a, b = losses(two_out), losses(one_out)
    np.testing.assert_array_equal(a[:, 0], [1, 2, 3, 4])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ema(two_out), ema(one_out))


def only_process_0_writes(out, two):
    for name in ["loss.csv", *PICTURES]:
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in two.writes[0], name  # the audit sees process 0's writes
    # process 1 only makes sure --out exists and is writable (a probe file, removed at once), and writes
    # its part of the checkpoints
    outside = sorted(w for w in two.writes[1] if w.startswith(str(out)) and w != str(out)
                     and w != str(out / ".jaxdiff-write-test-1") and not w.startswith(str(out / "checkpoints")))
    assert outside == [], outside
    assert [ln for ln in two.stdout[0].splitlines() if ln.startswith("done: 4 steps")], two.stdout[0]
    assert "done:" not in two.stdout[1] and "compiling the training step" not in two.stderr[1], two.stderr[1]
    assert len(losses(out)) == 4  # one writer: each step logged once
    # both processes took part in every checkpoint: each wrote its share of the arrays
    for step in ("2", "4"):
        for item in ("state", "ema"):
            for p in (0, 1):
                assert (out / "checkpoints" / step / item / f"ocdbt.process_{p}").is_dir(), (step, item, p)
    assert not [p.name for p in out.rglob("*") if "tmp" in p.name or p.name.startswith(".jaxdiff")]


def resumes_exactly(root, args):
    # the uninterrupted run as if killed after its step-2 checkpoint: what a resume finds
    out = root / "resumed"
    shutil.copytree(root / "two", out)
    shutil.rmtree(out / "checkpoints" / "4")
    # each process reads its own copy of the first run's cache: JAX writes a cache file in place, so no
    # process may read a folder that another is writing. A cached program is the one a compile gives; the
    # numbers compared are the runtime's.
    caches = [root / f"xla-cache-{i}" for i in range(2)]
    for cache in caches:
        shutil.copytree(root / "xla-cache", cache)
    run = two_processes(root / "logs", "resumed", [*args, "--out", out, "--resume"], caches=caches)
    assert run.codes == [0, 0], run.report()
    assert "resumed from step 2" in run.stderr[0] and "resumed" not in run.stderr[1], run.report()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert (out / "loss.csv").read_text() == (root / "two" / "loss.csv").read_text()  # rows 3, 4 recomputed
    jax.tree.map(np.testing.assert_array_equal, ema(out), ema(root / "two"))


def test_an_out_folder_that_is_not_shared_is_refused_in_one_line(tmp_path):
    # two folders on one machine stand for one path on two hosts without a shared filesystem
    run = two_processes(tmp_path / "logs", "unshared", [*TINY, "--steps", "2", "--data-dir", tmp_path / "none"],
                        outs=[tmp_path / "a", tmp_path / "b"])
    assert run.codes == [2, 2], run.report()
    for _, err in enumerate(run.stderr):
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "is not one folder shared by all 2 processes" in line[0], run.report()
        assert "Traceback" not in err, run.report()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # made by the run, removed again


def test_the_coordinator_flags_go_together(tmp_path, capsys):
    from experiments.mnist_cfg import main

    with pytest.raises(SystemExit) as exit:
        main(["--coordinator", "127.0.0.1:1234", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--coordinator, --num-processes and --process-id go together" in err
    assert not (tmp_path / "o").exists()


def test_each_process_gathers_its_own_rows_of_the_same_global_batch(monkeypatch):
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    labels = np.arange(40) % 10
    whole = data.Batches(images, labels, 8, seed=3).stack(5, 3)  # steps 5..7, past the first epoch
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        mine = distributed.Batches(images, labels, 8, seed=3).stack(5, 3)
        assert mine[0].shape == (3, 4, 1, 1, 1)
        # the trainer takes the same rows from a batch source that gives every process the whole batch
        np.testing.assert_array_equal(trainer._local(whole, 8)[0], mine[0])
        parts.append(mine)
    for k in (0, 1):
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]], axis=1), whole[k])
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        distributed.Batches(images, labels, 7, seed=3)


def test_when_a_run_joins_a_cluster_by_itself(monkeypatch):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # the flag JAX sets on import on a Cloud TPU VM; if a JAX release drops it, TPU slices would
    # silently run unjoined, so its absence must fail here
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm

    assert running_in_cloud_tpu_vm is False and not distributed._cluster_detected()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert not distributed._cluster_detected()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed._cluster_detected()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed._cluster_detected()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setattr("jax._src.cloud_tpu_init.running_in_cloud_tpu_vm", True)
    assert distributed._cluster_detected()
