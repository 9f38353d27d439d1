"""The README's library example runs as written: train, interrupt, resume, sample with one's own sampler."""

import os
import re
import subprocess
import sys

from test_data import write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"<!-- readme-example: [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "the README lost its marked example"
    return found.group(1)


def test_the_readme_example_runs(tmp_path):
    write_split(tmp_path / "data", "train", 64)
    code = readme_example() + (
        "\nimport numpy as np\n"
        "assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8\n"
        "assert result.start_step == 100 and int(result.state.step) == 200\n"
        "print('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
                              "JAXDIFF_DATA_DIR": str(tmp_path / "data")})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    assert (tmp_path / "runs" / "notebook" / "checkpoints").is_dir()
