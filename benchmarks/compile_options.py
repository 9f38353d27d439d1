"""The main job's compile time against its speed under XLA options: mnist_cfg's training dispatch (a scan of
--steps-per-dispatch steps at --batch, the 64/128/256 U-Net in bf16) and its sampler (20 DPM-Solver++ steps
with CFG at --sample-batch), each option set in a fresh process (XLA keeps autotuning results in memory).

    python -m benchmarks.compile_options --out compile_options.md

Reported per option set: seconds to compile the training dispatch and the sampler (lower + compile, ahead of
time), training images/s after it (median of --repeats dispatches) and the sampler's seconds per call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np

VARIANTS = {
    "XLA defaults": {},
    "autotune level 1 (no buffer checks)": {"xla_gpu_autotune_level": 1},
    "cuBLAS for the dots (no Triton GEMM)": {"xla_gpu_enable_triton_gemm": False},
    "both": {"xla_gpu_autotune_level": 1, "xla_gpu_enable_triton_gemm": False},
    "no autotuning (level 0): what autotuning costs": {"xla_gpu_autotune_level": 0},
    "level 0 and cuBLAS": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
}


def measure(options: dict, args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdiff import guidance, sampling, schedules, train
    from jaxdiff.nets.unet import textbook_unet

    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = textbook_unet(channels=args.channels, dtype=dtype)
    params = textbook_unet(channels=args.channels).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                                        jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    sched = schedules.linear()
    tx = train.make_optimizer(train.OptimConfig())
    loss = train.diffusion_loss(model.apply, sched, p_uncond=0.1, null_label=10)
    mesh = train.make_mesh(jax.local_devices()[:1])
    step = train.data_parallel(loss, tx, 0.999, mesh, host_loop=False)  # one program, as on a GPU
    rng = np.random.default_rng(0)
    k = args.steps_per_dispatch
    data = train.shard_batches((rng.integers(0, 256, (k, args.batch, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, (k, args.batch)).astype(np.int32)), mesh)
    state = train.replicate(train.init_state(params, tx, 0), mesh)
    t0 = time.perf_counter()
    opts = jax.profiler.ProfileOptions()
    opts.host_tracer_level, opts.python_tracer_level = 3, 0  # level 3: XLA's compiler passes and autotuning
    with (jax.profiler.trace(args.trace, create_perfetto_trace=True, profiler_options=opts) if args.trace
          else contextlib.nullcontext()):
        compiled = step.lower(state, data, None).compile(compiler_options=options or None)
    train_compile = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, data, None)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)

    def generate(p, labels, key):
        eps = guidance.cfg(lambda x, t, y: model.apply(p, x, t, y), labels, 10, 3.0)
        k1, k2 = jax.random.split(key)
        return sampling.run("dpm++", eps, sched, jax.random.normal(k1, (labels.shape[0], 28, 28, 1)), steps=20,
                            key=k2)

    from jaxdiff.pipeline import LOOP_COMPILER_OPTIONS

    if jax.default_backend() == "gpu":  # the sampler as the pipeline compiles it
        sample_options = {**LOOP_COMPILER_OPTIONS, **options}
    else:
        sample_options = options
    labels = jnp.arange(args.sample_batch) % 10
    cast = jax.tree.map(lambda a: a.astype(dtype), params)
    t0 = time.perf_counter()
    sampler = jax.jit(generate).lower(cast, labels, jax.random.key(1)).compile(
        compiler_options=sample_options or None)
    sample_compile = time.perf_counter() - t0
    sampler(cast, labels, jax.random.key(1)).block_until_ready()
    t0 = time.perf_counter()
    sampler(cast, labels, jax.random.key(2)).block_until_ready()
    return dict(train_compile=train_compile, images_per_s=k * args.batch / float(np.median(times[1:])),
                sample_compile=sample_compile, sample_s=time.perf_counter() - t0,
                device=f"{jax.devices()[0].device_kind}, jax {jax.__version__}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    p.add_argument("--channels", default=(64, 128, 256), type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps-per-dispatch", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=180, help="seconds per option set")
    p.add_argument("--out", default=None)
    p.add_argument("--trace", default=None,
                   help="a folder: trace the training program's compile (jax.profiler, perfetto; XLA's passes and "
                        "autotuning), each option set's in DIR/<its index in --variants>")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(VARIANTS[args.worker], args)))
        return
    lines = ["| XLA options | training compile s | training images/s | sampler compile s | sampler s per call |",
             "| --- | --- | --- | --- | --- |"]
    device = ""
    for i, name in enumerate(args.variants.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.compile_options", "--worker", name, "--batch", str(args.batch),
               "--channels", ",".join(map(str, args.channels)), "--steps-per-dispatch", str(args.steps_per_dispatch),
               "--sample-batch", str(args.sample_batch), "--repeats", str(args.repeats)] + (
                   ["--trace", os.path.join(args.trace, str(i))] if args.trace else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            r = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        except subprocess.TimeoutExpired:
            r, done = None, None
        except (IndexError, ValueError):  # it exited 0 without its line of JSON
            r = None
        if r is None:
            why = f"exit status {done.returncode}: {done.stderr.strip()[-300:]}" if done else f"over {args.timeout}s"
            lines.append(f"| {name} | failed ({why}) | | | |")
        else:
            device = r["device"]
            lines.append(f"| {name} | {r['train_compile']:.1f} | {r['images_per_s']:,.0f} | "
                         f"{r['sample_compile']:.1f} | {r['sample_s']:.3f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join([f"{device}; batch {args.batch}, {args.steps_per_dispatch} steps per dispatch, sampler batch "
                      f"{args.sample_batch}; {time.strftime('%Y-%m-%d')}", ""] + lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
