"""Sharded Stable Diffusion training on several GPUs of one host: speed, memory and equality with one GPU.

    python -m benchmarks.sd_train_scaling --gpus 1,2 --out docs/sd_train_scaling.md    # GPU host
    python -m benchmarks.sd_train_scaling --tiny --gpus 1,2                          # CPU, simulated devices

SD-1.5's U-Net (random weights) fully fine-tuned on cached 64x64x4 latents and 77x768 text states, the
step ``sharding.train_step`` runs (AdamW, clipping, EMA, float32 master weights, bf16 compute, cuDNN
attention). Each mesh runs in its own process that sees only its GPUs (its own allocator, so peak memory
is per run):

- ``fsdp``: ``--mesh data=1,fsdp=N``: parameters, EMA and Adam moments split N ways, the batch too;
- ``dp``: ``--mesh data=N,fsdp=1``: plain data parallelism, every GPU holds the whole state.

Weak scaling: ``--per-gpu-batch`` rows per GPU, so N GPUs train a global batch N times larger; the
efficiency is images/s over N times the one-GPU run's. Reported per run: images/s (median of
``--repeats`` windows of ``--steps`` steps in one scan after a warm-up window), the first call (compile
included), the train state's bytes on each GPU (parameters + EMA + moments) and the peak GPU memory.

The equality check (``--check``) runs in one process on every GPU: the same global batch through three
steps on one GPU and on each N-GPU mesh, in float32 with XLA attention and the highest matmul precision,
and prints the largest loss difference and the largest parameter difference as a fraction of the largest
change the three steps made. On CPU the test suite asserts the same equality (tests/test_sharding.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from benchmarks.sd_speed import SD15_SCHEDULER, configs, random_params


def log(msg: str) -> None:
    print(f"[sd_train_scaling] {msg}", file=sys.stderr, flush=True)


def _setup(tiny: bool, dtype_name: str, attention):
    import jax.numpy as jnp

    from jaxdiff import sd_train, specs, train
    from jaxdiff.pretrained.scheduler import schedule_from_config

    cfg = configs(tiny)["unet"]
    spec = specs.StableDiffusionUNet.from_config(cfg)
    dtype = jnp.float32 if dtype_name == "float32" else jnp.bfloat16
    module = spec.module(dtype, attention)
    side = cfg.get("sample_size", 8) if tiny else 64
    ctx = cfg.get("cross_attention_dim", 768)
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    empty = np.zeros((77, ctx), np.float32)
    loss = sd_train.sd_loss(sd_train.unet_apply(module), schedule_from_config(dict(SD15_SCHEDULER)), "epsilon",
                            empty_context=empty, p_uncond=0.1)
    tx = train.make_optimizer(train.OptimConfig(learning_rate=1e-5, warmup_steps=1, weight_decay=1e-2))
    params = random_params(spec.template(), 0, np.float32)
    return loss, tx, params, (side, side, cfg.get("in_channels", 4)), ctx


def _batches(steps: int, batch: int, latent, ctx: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, batch, *latent), np.float32),
            rng.standard_normal((steps, batch, 77, ctx), np.float32))


def measure(args, n: int, kind: str) -> dict:
    import jax

    from jaxdiff import sharding

    cpu = jax.default_backend() == "cpu"
    devices = jax.devices()[:n]
    if len(devices) < n:
        raise SystemExit(f"--gpus asks for {n} devices; this process sees {len(jax.devices())}")
    setting = f"data=1,fsdp={n}" if kind == "fsdp" else f"data={n},fsdp=1"
    mesh = sharding.make_mesh(setting, devices)
    loss, tx, params, latent, ctx = _setup(args.tiny, "float32" if cpu else "bfloat16", None if cpu else "cudnn")
    state = sharding.init_state(params, tx, 0, mesh)
    del params
    held = sharding.bytes_per_device(state)
    step = sharding.train_step(loss, tx, 0.9999, mesh, state, host_loop=False)
    batches = sharding.shard_batches(_batches(args.steps, args.per_gpu_batch * n, latent, ctx), mesh)

    t0 = time.perf_counter()
    state, metrics = step(state, batches, None)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, batches, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times)) / args.steps
    peaks = [float((d.memory_stats() or {}).get("peak_bytes_in_use", float("nan"))) for d in devices]
    return dict(gpus=n, kind=kind, mesh=setting, global_batch=args.per_gpu_batch * n, seconds_per_step=seconds,
                images_per_s=args.per_gpu_batch * n / seconds, first=first, state_bytes=[held[d] for d in devices],
                peak_bytes=peaks, loss=float(np.asarray(metrics["loss"])[-1]))


def check(args, counts) -> list[dict]:
    """Three steps of one global batch on one device and on each mesh: loss and parameter differences."""
    import jax

    from jaxdiff import sharding

    jax.config.update("jax_default_matmul_precision", "highest")
    tiny = args.tiny or args.check_model == "tiny"
    loss, tx, params, latent, ctx = _setup(tiny, "float32", None if tiny else "xla")
    batches = _batches(3, args.check_batch, latent, ctx, seed=1)

    def run(setting, devices):
        mesh = sharding.make_mesh(setting, devices)
        state = sharding.init_state(params, tx, 0, mesh)
        step = sharding.train_step(loss, tx, 0.9999, mesh, state, host_loop=False)
        state, metrics = step(state, sharding.shard_batches(batches, mesh), None)
        return jax.device_get(state.params), np.asarray(metrics["loss"], np.float64)

    ref_params, ref_loss = run("data=1,fsdp=1", jax.devices()[:1])
    gap = lambda x, y: max(float(np.max(np.abs(a - b)))
                           for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
    moved = gap(ref_params, params)
    rows = []
    for n in counts:
        if n == 1:
            continue
        for setting in (f"data=1,fsdp={n}", f"data={n},fsdp=1"):
            got_params, got_loss = run(setting, jax.devices()[:n])
            diff = gap(got_params, ref_params)
            rows.append(dict(mesh=setting, losses=ref_loss.tolist(),
                             loss_diff=float(np.max(np.abs(got_loss - ref_loss) / np.abs(ref_loss))),
                             param_diff=diff, largest_change=moved, param_diff_of_change=diff / moved))
            log(f"check {setting}: loss rel diff {rows[-1]['loss_diff']:.2e}, param diff {diff:.2e} "
                f"({diff / moved:.2e} of the largest change {moved:.2e})")
    return rows


def _worker_env(n: int, tiny: bool) -> dict:
    env = dict(os.environ)
    if tiny:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(n, 1)}").strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    return env


def _in_worker(args, what: str, n: int) -> dict | list:
    cmd = [sys.executable, "-m", "benchmarks.sd_train_scaling", "--worker", what, "--gpus", str(n),
           "--per-gpu-batch", str(args.per_gpu_batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--check-batch", str(args.check_batch), "--check-model", args.check_model]
    cmd += ["--tiny"] if args.tiny else []
    proc = subprocess.run(cmd, env=_worker_env(n, args.tiny), capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line.split(":")[0]] or ["?"]
        return {"error": errors[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], checks: list[dict], meta: dict) -> str:
    gib = 2.0**30
    one = next((r for r in rows if r.get("gpus") == 1 and "error" not in r), None)
    lines = [f"SD-1.5 U-Net full fine-tune, sharded: {meta['device']}, {meta['date']}; jax {meta['jax']}; "
             f"`{meta['command']}`", "",
             f"Weak scaling, {meta['per_gpu_batch']} images per GPU per step, 64x64x4 latents (512x512 images), "
             "bf16 compute over float32 master weights, AdamW + clipping + EMA.", "",
             "| GPUs | mesh | global batch | images/s | speed-up | efficiency | state per GPU (GiB) "
             "| peak per GPU (GiB) | first call (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['kind']} | - | failed: {r['error']} | | | | | |")
            continue
        speed = r["images_per_s"] / one["images_per_s"] if one else float("nan")
        lines.append(f"| {r['gpus']} | {r['mesh']} | {r['global_batch']} | {r['images_per_s']:.1f} | {speed:.2f}x "
                     f"| {speed / r['gpus']:.0%} | {max(r['state_bytes']) / gib:.2f} "
                     f"| {max(r['peak_bytes']) / gib:.1f} | {r['first']:.0f} |")
    if checks:
        lines += ["", f"Equality with one GPU ({meta['check_model']} U-Net, float32, XLA attention, highest matmul "
                  f"precision, global batch {meta['check_batch']}, three steps):", "",
                  "| mesh | losses (one GPU) | largest relative loss difference | largest parameter difference "
                  "| as a fraction of the largest change |", "| --- | --- | --- | --- | --- |"]
        for c in checks:
            if "error" in c:
                lines.append(f"| - | failed: {c['error']} | | | |")
                continue
            losses = ", ".join(f"{v:.6f}" for v in c["losses"])
            lines.append(f"| {c['mesh']} | {losses} | {c['loss_diff']:.1e} | {c['param_diff']:.1e} "
                         f"| {c['param_diff_of_change']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2", help="device counts to run, e.g. 1,2,4")
    p.add_argument("--kinds", default="fsdp,dp", help="fsdp, dp or both")
    p.add_argument("--per-gpu-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window (one scan)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-batch", type=int, default=4, help="global batch of the equality check")
    p.add_argument("--check-model", choices=("sd15", "tiny"), default="sd15",
                   help="the U-Net of the equality check: SD-1.5's (float32 with XLA attention compiles for "
                        "minutes per mesh) or the tiny test config")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net on simulated CPU devices")
    p.add_argument("--out", help="write the table (markdown) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        counts = [int(c) for c in args.gpus.split(",")]
        if any(c < 1 for c in counts):
            raise ValueError
    except ValueError:
        p.error(f"--gpus: expected device counts like 1,2,4, got {args.gpus!r}")
    kinds = [k.strip() for k in args.kinds.split(",")]
    if not set(kinds) <= {"fsdp", "dp"}:
        p.error(f"--kinds: expected fsdp, dp or fsdp,dp, got {args.kinds!r}")

    if args.worker == "measure-fsdp" or args.worker == "measure-dp":
        print(json.dumps(measure(args, counts[0], args.worker.split("-")[1])))
        return
    if args.worker == "check":
        print(json.dumps(check(args, list(range(1, counts[0] + 1)))))
        return

    rows = []
    for n in counts:
        for kind in (["fsdp"] if n == 1 else kinds):  # one device: both meshes are the same run
            log(f"{n} device(s), {kind}")
            r = _in_worker(args, f"measure-{kind}", n)
            rows.append({"gpus": n, "kind": kind, **r})
            log(json.dumps(r))
            if args.out:  # what finished so far, should a later run not
                _write(args.out, table(rows, [], _meta(args, argv)))
    checks = [] if args.no_check or max(counts) == 1 else _in_worker(args, "check", max(counts))
    if isinstance(checks, dict):
        checks = [checks]

    text = table(rows, checks, _meta(args, argv))
    print(text)
    if args.out:
        _write(args.out, text)
        _write(os.path.splitext(args.out)[0] + ".json", json.dumps({"rows": rows, "checks": checks}, indent=1))


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _meta(args, argv) -> dict:
    import jax

    return dict(device=_device_name(args), date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
                per_gpu_batch=args.per_gpu_batch, check_batch=args.check_batch, check_model=args.check_model,
                command="python -m benchmarks.sd_train_scaling " + " ".join(argv if argv is not None else sys.argv[1:]))


def _device_name(args) -> str:
    if args.tiny:
        return f"simulated CPU devices ({platform.processor() or platform.machine()})"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return f"{len([o for o in out if o.strip()])}x {out[0].strip()}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown device"


if __name__ == "__main__":
    main()
