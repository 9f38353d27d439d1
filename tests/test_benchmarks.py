"""The speed benchmark in its tiny CPU configuration: it runs and prints its table (never timed here)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_benchmark_tiny(tmp_path):
    out = tmp_path / "speed.md"
    res = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    assert "| implementation | work | batch | images/s | jaxdiff / this |" in table
    assert "| jaxdiff | train | 8 |" in table and "| jaxdiff | sample | 2 |" in table
    assert "GFLOP per image" in table and "of the measured bf16 matmul rate" in table
