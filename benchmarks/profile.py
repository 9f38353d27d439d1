"""Where the small U-Net's time goes on the GPU: a jax.profiler trace of training steps and of a CFG
sampling run, summed per kernel, the top kernels by time in a table.

    python -m benchmarks.profile --out docs/profile.md

Training: the main job's U-Net (bf16) at --train-batch, --steps steps in one scanned dispatch (as
mnist_cfg trains). Sampling: DDPM with classifier-free guidance at --sample-batch, --sample-steps steps
of a T = --sample-steps schedule (the 1000-step run's kernels, fewer of them). Kernels are grouped by
kind from their names: convolution (cuDNN), matrix product (cuBLAS / Triton GEMM), fusion (XLA's fused
elementwise and reduction kernels: GroupNorm, SiLU, adds, the optimizer), copy / transpose, other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed import JaxBench
from jaxdiff import guidance, sampling, schedules, train

KINDS = [("convolution", r"conv(?!ert)|cudnn|implicit_?gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|sm\d+_xmma"
                         r"|fprop|dgrad|wgrad"),
         ("matrix product", r"gemm|cublas|cutlass|triton_gemm|matmul|nvjet|sm90_x?mma"),
         ("copy / transpose", r"copy|transpose|memcpy|memset"),
         ("fusion", r"fusion|loop_|input_|reduce|triton"),
         ("attention", r"flash|fmha|attention")]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_times(trace_dir: str) -> tuple[dict, float]:
    """{kernel name: (total microseconds, calls)} on the accelerator's streams of a perfetto trace, and
    the wall span they cover."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return {}, 0.0
    with gzip.open(files[0]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
    if not gpu:
        print(f"no accelerator streams among the trace's processes {sorted(names.values())}", file=sys.stderr)
    totals = collections.defaultdict(lambda: [0.0, 0])
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            totals[e["name"]][0] += e["dur"]
            totals[e["name"]][1] += 1
            start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
    return dict(totals), (end - start if totals else 0.0)


def profile(fn, label: str) -> tuple[dict, float]:
    fn()  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            fn()
        return kernel_times(d)


def report(label: str, totals: dict, span: float, top: int) -> list[str]:
    busy = sum(t for t, _ in totals.values())
    if not totals:
        return [f"### {label}", "", "no accelerator kernels in the trace (a CPU run)", ""]
    by_kind = collections.defaultdict(float)
    for name, (t, _) in totals.items():
        by_kind[kind_of(name)] += t
    lines = [f"### {label}", "", f"{busy / 1e3:.1f} ms of kernel time in a {span / 1e3:.1f} ms span "
             f"({busy / span:.0%} busy); {sum(c for _, c in totals.values()):,} launches of {len(totals)} kernels.", "",
             "| kind | ms | share |", "| --- | --- | --- |"]
    lines += [f"| {k} | {t / 1e3:.2f} | {t / busy:.1%} |" for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | kind | calls | ms | share | us per call |", "| --- | --- | --- | --- | --- | --- |"]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    for name, (t, c) in ranked:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {kind_of(name)} | {c} | {t / 1e3:.2f} | {t / busy:.1%} | {t / c:.1f} |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="training steps traced (one dispatch)")
    p.add_argument("--sample-batch", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    bench_args = argparse.Namespace(channels=(64, 128, 256), timesteps=args.sample_steps,
                                    steps_per_dispatch=args.steps, repeats=1, sample_repeats=1)
    jb = JaxBench(bench_args, dtype)
    mesh = train.make_mesh(jax.local_devices()[:1])
    step = train.data_parallel(jb.loss, jb.tx, 0.999, mesh)
    rng = np.random.default_rng(0)
    data = train.shard_batches((rng.integers(0, 256, (args.steps, args.train_batch, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, (args.steps, args.train_batch)).astype(np.int32)), mesh)
    state = [train.replicate(train.init_state(jb.params, jb.tx, 0), mesh)]

    def train_run():
        state[0], m = step(state[0], data)
        m["loss"].block_until_ready()

    sched = schedules.linear(args.sample_steps)

    @jax.jit
    def generate(params, labels, key):
        eps = guidance.cfg(lambda x, t, y: jb.model.apply(params, x, t, y), labels, 10, 3.0)
        k1, k2 = jax.random.split(key)
        return sampling.ddpm(eps, sched, jax.random.normal(k1, (labels.shape[0], 28, 28, 1)), key=k2)

    labels = jnp.arange(args.sample_batch) % 10
    sample_run = lambda: generate(jb.params, labels, jax.random.key(1)).block_until_ready()
    lines = [f"{jax.devices()[0].device_kind}, jax {jax.__version__}, the main job's U-Net (channels 64,128,256), "
             f"{jnp.dtype(dtype).name} compute; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", ""]
    lines += report(f"training: {args.steps} steps at batch {args.train_batch}", *profile(train_run, "train"), args.top)
    lines += report(f"sampling: CFG DDPM, {args.sample_steps} steps at batch {args.sample_batch}",
                    *profile(sample_run, "sample"), args.top)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
