"""The speed benchmark in its tiny CPU configuration: it runs and prints its table (never timed here)."""

import os
import subprocess
import sys

from fast_xla import FAST_XLA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_benchmark_tiny_on_four_simulated_devices(tmp_path):
    """Four CPU devices stand in for GPUs: the speed table, then a scaling row per device count 1, 2, 4."""
    out = tmp_path / "speed.md"
    # FAST_XLA: XLA's CPU backend compiles in a fraction of the time, and nothing here is timed for real
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_XLA}"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    assert "| implementation | work | batch | images/s | jaxdiff / this |" in table
    assert "| jaxdiff | train | 8 |" in table and "| jaxdiff | sample | 2 |" in table
    assert "GFLOP per image" in table and "of the measured bf16 matmul rate" in table
    assert "nan" not in table.split("GFLOP per image")[0].splitlines()[-1]  # a FLOP count, not a gap
    assert "| devices | global batch | images/s | speed-up | efficiency |" in table
    for k in (1, 2, 4):
        assert f"| {k} | {8 * k} |" in table, table
    assert "| 100.0% |" in table.split("| 1 | 8 |")[1].splitlines()[0]
    assert "jaxdiff train batch 8:" in res.stderr  # each measurement logged as it lands


def test_stable_diffusion_benchmark_tiny(tmp_path):
    """The SD benchmark on the tiny test pipeline, jaxdiff alone (CI has no torch): its table renders. With FAST_XLA,
    as the speed benchmark's test: nothing here is timed for real."""
    out = tmp_path / "sd.md"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": FAST_XLA}
    res = subprocess.run([sys.executable, "-m", "benchmarks.sd_speed", "--tiny", "--impls", "jaxdiff",
                          "--batches", "1,2", "--repeats", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    assert "| implementation | batch | s per call | images/s |" in table
    assert "| jaxdiff | 1 |" in table and "| jaxdiff | 2 |" in table and "1.00x" in table


def test_stable_diffusion_training_benchmark_tiny(tmp_path):
    """The SD training benchmark on the tiny U-Net, jaxdiff's LoRA step alone (the cheapest to compile):
    a variant's worker runs and its row, model FLOPs and MFU render."""
    out = tmp_path / "sd_train.md"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": FAST_XLA}
    res = subprocess.run([sys.executable, "-m", "benchmarks.sd_train_speed", "--tiny", "--impls", "jaxdiff",
                          "--modes", "lora", "--checkpointing", "0", "--batches", "2", "--peak-bf16", "1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    assert "| jaxdiff | lora | 2 |" in table and "MFU)" in table and "TFLOP per trained image" in table
