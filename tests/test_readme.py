"""The README's library example runs as written (with fewer training steps): train, interrupt, resume, sample
with one's own sampler."""

import os
import re
import subprocess
import sys

from fast_xla import FAST_XLA
from test_data import write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"<!-- readme-example: [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "the README lost its marked example"
    return found.group(1)


def shortened(code: str) -> str:
    """The example with a twenty-fifth of its training steps and a tenth of its sampling steps: the same calls,
    interrupt and resume, in a fraction of the CI machine's time."""
    for long, short in [("steps=100,", "steps=4,"), ("steps=200,", "steps=8,"), ("save_every=50", "save_every=2"),
                        ("steps=30,", "steps=3,")]:
        assert long in code, f"the README example no longer has {long!r}; update tests/test_readme.py"
        code = code.replace(long, short)
    return code


def test_the_readme_example_runs(tmp_path):
    write_split(tmp_path / "data", "train", 64)
    code = shortened(readme_example()) + (
        "\nimport numpy as np\n"
        "assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8\n"
        "assert result.start_step == 4 and int(result.state.step) == 8\n"
        "print('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
                              "JAXDIFF_DATA_DIR": str(tmp_path / "data"),
                              # compiles in about half the time; the example's numbers are not checked
                              "XLA_FLAGS": FAST_XLA})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    assert (tmp_path / "runs" / "notebook" / "checkpoints").is_dir()


def test_ci_runs_the_readmes_test_command():
    """.ci/run runs the README's test command verbatim (they once drifted apart: CI ran without -n 2)."""
    lines = open(os.path.join(ROOT, "README.md")).read().split("```")[1].splitlines()
    command = lines[lines.index(next(line for line in lines if line.startswith("# tests"))) + 1]
    assert command.startswith("python3 -m venv .venv") and "pytest" in command and "ruff check ." in command
    assert command in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
