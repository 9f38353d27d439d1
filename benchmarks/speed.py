"""Training and sampling speed of jaxdiff's U-Net, beside a PyTorch twin, in one process.

    python -m benchmarks.speed --out docs/speed.md            # GPU: the full table
    python -m benchmarks.speed --tiny                          # CPU smoke run

Measures, on whatever device JAX sees: training images/s at each --train-batches (the
default mnist_cfg U-Net, bf16 compute on GPU, several steps per dispatch, data already on the
device), 1000-step CFG DDPM sampling images/s at each --sample-batches, the model's FLOPs per
image (XLA's count of the compiled forward pass and train step), the measured bf16 matrix
rate and the fraction of it training reaches, data-parallel scaling when there are several
devices, and the same training and sampling in PyTorch (eager float32, and bf16 autocast +
channels-last + torch.compile(mode="reduce-overhead") + fused Adam) when torch is installed. Ratios
are jaxdiff over PyTorch, measured in this one run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, host, sampling, schedules, train
from jaxdiff.nets.unet import textbook_unet
from jaxdiff.pipeline import loop_compiler_options


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() after one warm-up call; fn must block until done."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_rate(n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    sec = timed(lambda: f(a, b).block_until_ready(), 10)
    return 2 * n**3 / sec


def flops(jitted, *args) -> float:
    """XLA's FLOP count of ``jitted(*args)``, for the host's CPU: after GPU compilation the convolutions are
    cuDNN custom calls that the count leaves out (jax 0.11.2 on an H200 printed 0.031 GFLOP for a 2.2 GFLOP
    train step), and the program before compilation is the same on every platform."""
    cpu = host.cpu()
    if cpu is None:  # a GPU's count would leave the convolutions out: none rather than a wrong one
        return float("nan")
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu), args)
    lowered = jitted.trace(*shapes).lower()
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost:
        try:
            cost = lowered.compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        except Exception as err:  # say so and carry on with the timings
            print(f"no FLOP count: {err}", file=sys.stderr)
            cost = None
    return float((cost or {}).get("flops", float("nan")))


class JaxBench:
    def __init__(self, args, dtype):
        self.args, self.dtype = args, dtype
        self.model = textbook_unet(channels=args.channels, dtype=dtype)
        self.sched = schedules.linear(args.timesteps)
        x = jnp.zeros((1, 28, 28, 1))
        self.params = textbook_unet(channels=args.channels).init(jax.random.key(0), x, jnp.ones((1,), jnp.int32),
                                                                  jnp.zeros((1,), jnp.int32))
        self.tx = train.make_optimizer(train.OptimConfig())
        self.loss = train.diffusion_loss(self.model.apply, self.sched, p_uncond=0.1, null_label=10)

    def train_rate(self, batch: int, devices, count_flops: bool = True) -> tuple[float, float]:
        """(images/s, train FLOPs per image, nan unless ``count_flops``) at global ``batch`` over ``devices``."""
        mesh = train.make_mesh(devices)
        k = self.args.steps_per_dispatch
        step = train.data_parallel(self.loss, self.tx, 0.999, mesh)
        rng = np.random.default_rng(0)
        xs = rng.integers(0, 256, (k, batch, 28, 28, 1), dtype=np.uint8)
        ys = rng.integers(0, 10, (k, batch)).astype(np.int32)
        data = train.shard_batches((xs, ys), mesh)
        state = [train.replicate(train.init_state(self.params, self.tx, 0), mesh)]
        # XLA counts a scan's body once, so count one unscanned step
        one = jax.jit(train.make_train_step(self.loss, self.tx, 0.999))
        fl = flops(one, state[0], (xs[0], ys[0])) / batch if count_flops else float("nan")

        def run():
            state[0], m = step(state[0], data, None)
            m["loss"].block_until_ready()

        sec = timed(run, self.args.repeats)
        return k * batch / sec, fl

    def forward_flops(self) -> float:
        b = 64
        x, t, y = jnp.zeros((b, 28, 28, 1)), jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
        return flops(jax.jit(self.model.apply), self.params, x, t, y) / b

    def sample_rate(self, batch: int) -> float:
        model = self.model

        @partial(jax.jit, compiler_options=loop_compiler_options())
        def generate(params, labels, key):  # compiled as the pipeline compiles its samplers
            # as the pipeline does: the parameters cast to the compute dtype once, outside the loop
            params = jax.tree.map(lambda a: a.astype(self.dtype), params)
            eps = guidance.cfg(lambda x, t, y: model.apply(params, x, t, y), labels, 10, 3.0)
            k1, k2 = jax.random.split(key)
            return sampling.ddpm(eps, self.sched, jax.random.normal(k1, (labels.shape[0], 28, 28, 1)), key=k2)

        labels = jnp.arange(batch) % 10
        sec = timed(lambda: generate(self.params, labels, jax.random.key(1)).block_until_ready(),
                    self.args.sample_repeats)
        return batch / sec


START = time.perf_counter()


def log(msg: str):
    """Progress on stderr as each measurement lands, so a run cut short still says what it measured."""
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def log_row(row):
    log(f"{row[0]} {row[1]} batch {row[2]}: {row[3]:,.1f} images/s (jaxdiff / this {row[4]:.2f})")
    return row


def torch_rows(args, jax_train, jax_sample):
    try:
        import torch

        from benchmarks import torch_twin
    except ImportError:
        print("torch not installed: PyTorch twin skipped", file=sys.stderr)
        return []
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = {"compiled": ("torch bf16+CL+compile", True, True), "eager": ("torch eager f32", False, False)}
    variants = [known[v] for v in args.torch_variants
                if v == "eager" or dev.type == "cuda" or args.torch_compile_on_cpu]
    rows = []
    for name, bf16, fast in variants:
        torch.manual_seed(0)
        model = torch_twin.UNet(channels=args.channels).to(dev)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        # the fast variant takes the fused CUDA Adam, as a speed-minded user would
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fast and dev.type == "cuda")
        net = torch.compile(model, mode="reduce-overhead") if fast else model
        step = torch_twin.make_train_step(net, opt, args.timesteps, bf16=bf16)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for batch in args.train_batches:
            x = torch.randn(batch, 1, 28, 28, device=dev)
            if fast:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=dev)

            def run(step=step, x=x, y=y, sync=sync):
                for _ in range(args.steps_per_dispatch):
                    step(x, y)
                sync()

            t0 = time.perf_counter()
            run()  # compile and warm up
            log(f"{name}: first train dispatch at batch {batch} (compile included) {time.perf_counter() - t0:.1f}s")
            rate = args.steps_per_dispatch * batch / timed(run, args.repeats)
            rows.append(log_row((name, "train", batch, rate, jax_train[batch] / rate)))
        net.eval()
        for batch in args.sample_batches:
            labels = torch.arange(batch, device=dev) % 10

            def gen(net=net, labels=labels, bf16=bf16, fast=fast, sync=sync):
                torch_twin.cfg_ddpm_sample(net, labels, 3.0, args.timesteps, bf16=bf16, channels_last=fast)
                sync()

            rate = batch / timed(gen, args.sample_repeats)
            rows.append(log_row((name, "sample", batch, rate, jax_sample[batch] / rate)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]
    p.add_argument("--train-batches", type=ints, default=[128, 512])
    p.add_argument("--sample-batches", type=ints, default=[20, 1000])
    p.add_argument("--channels", type=lambda s: tuple(ints(s)), default=(64, 128, 256))
    p.add_argument("--timesteps", type=int, default=1000, help="T of the schedule, so sampling runs T steps")
    p.add_argument("--steps-per-dispatch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-repeats", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--torch", choices=["auto", "off"], default="auto")
    p.add_argument("--torch-compile-on-cpu", action="store_true")
    p.add_argument("--torch-variants", type=lambda v: v.split(","), default=["compiled", "eager"],
                   help="PyTorch variants in order: compiled (bf16 autocast, channels-last, torch.compile "
                        "reduce-overhead, fused Adam; GPU only unless --torch-compile-on-cpu), eager (float32)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configuration")
    p.add_argument("--scaling-only", action="store_true",
                   help="only data-parallel scaling: 1 device against all, at the last --train-batches per device")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.tiny:
        args.train_batches, args.sample_batches, args.channels = [8], [2], (8, 16)
        args.timesteps, args.steps_per_dispatch, args.repeats, args.sample_repeats, args.matmul_size = 5, 2, 1, 1, 256
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    jb = JaxBench(args, dtype)
    rows, info = [], []
    jax_train, jax_sample = {}, {}
    if args.scaling_only:
        args.train_batches, args.sample_batches, args.torch = args.train_batches[-1:], [], "off"
    else:
        rate = matmul_rate(args.matmul_size)
        fwd = jb.forward_flops()
        info.append(f"bf16 matmul {args.matmul_size}^3: {rate / 1e12:.1f} TFLOP/s measured")
        info.append(f"U-Net forward: {fwd / 1e9:.3f} GFLOP per image (XLA cost analysis of the lowered program)")
    for b in ([] if args.scaling_only else args.train_batches):
        jax_train[b], train_fl = jb.train_rate(b, jax.local_devices()[:1])
        rows.append(log_row(("jaxdiff", "train", b, jax_train[b], 1.0)))
        info.append(f"train step at batch {b}: {train_fl / 1e9:.3f} GFLOP per image; "
                    f"{jax_train[b] * train_fl / rate:.1%} of the measured bf16 matmul rate")
    for b in args.sample_batches:
        jax_sample[b] = jb.sample_rate(b)
        rows.append(log_row(("jaxdiff", "sample", b, jax_sample[b], 1.0)))
    n = jax.local_device_count()
    if args.scaling_only and n == 1:
        info.append("one device: no data-parallel scaling to measure")
    scaling = []
    if n > 1:
        per = args.train_batches[-1]
        counts = sorted({k for k in (1, 2, 4, 8, 16, 32) if k < n} | {n})
        for k in counts:
            if k == 1 and per in jax_train:  # measured above, the same way
                rate_k = jax_train[per]
            else:
                rate_k, _ = jb.train_rate(per * k, jax.local_devices()[:k], count_flops=False)
            scaling.append((k, per * k, rate_k))
            log(f"data parallel on {k} devices, global batch {per * k}: {rate_k:,.1f} images/s")
        one = scaling[0][2]
        info.append(f"data parallel, per-device batch {per}: {n} devices {scaling[-1][2]:,.0f} img/s against "
                    f"1 device's {one:,.0f}, speed-up {scaling[-1][2] / one:.2f}x")
    if args.torch == "auto":
        rows += torch_rows(args, jax_train, jax_sample)

    header = (f"{jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}; python "
              f"{platform.python_version()}; T = {args.timesteps}; U-Net channels {args.channels}; "
              f"jaxdiff compute {jnp.dtype(dtype).name}")
    lines = [header]
    if rows:
        lines += ["", "| implementation | work | batch | images/s | jaxdiff / this |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,.1f} | {r[4]:.2f} |" for r in rows]
    if scaling:
        lines += ["", f"Data-parallel training, {args.train_batches[-1]} images per device per step:", "",
                  "| devices | global batch | images/s | speed-up | efficiency |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k} | {b} | {r:,.1f} | {r / scaling[0][2]:.2f}x | {r / (k * scaling[0][2]):.1%} |"
                  for k, b, r in scaling]
    lines += [""] + [f"- {s}" for s in info]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
