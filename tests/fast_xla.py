"""XLA settings for the suite (nothing happens on import; conftest applies them before JAX starts).

Most test programs are tiny and run once or twice, so compiling them costs more than running them:
LLVM at -O0, and XLA:CPU's older loop emitters instead of its fusion emitters (measured: a small U-Net's
training step compiles in 1.4 s, against 4.9 s at -O0 alone and 9.7 s by default)."""

import os
import subprocess
import sys

FAST_XLA = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

# For the few programs whose running time outweighs their compile time (thousands of steps on 100k draws):
# jax.jit(f, compiler_options=FULL_OPT) compiles that one program as XLA does by default, over FAST_XLA.
FULL_OPT = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def apply_to_environment() -> None:
    """FAST_XLA's flags into XLA_FLAGS, each unless XLA_FLAGS already sets it (the caller's choice wins).
    XLA aborts on a flag it does not know, so a release that dropped one is found here first, in a child
    (under a second), and the suite then runs without that flag rather than not at all."""
    global FAST_XLA, FULL_OPT
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in FAST_XLA.split() if f.split("=")[0] not in flags]
    if not added:
        return
    env = {**os.environ, "XLA_FLAGS": f"{flags} {' '.join(added)}".strip(), "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)
    if probe.returncode != 0:
        FAST_XLA, FULL_OPT = "--xla_backend_optimization_level=0", {"xla_backend_optimization_level": 3}
        added = [f for f in added if f.startswith("--xla_backend_optimization_level")]
    os.environ["XLA_FLAGS"] = f"{flags} {' '.join(added)}".strip()
