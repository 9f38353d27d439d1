"""Stable Diffusion training speed and memory, jaxdiff beside PyTorch/diffusers, on one GPU in one run.

    python -m benchmarks.sd_train_speed --out docs/sd_train_speed.md     # GPU: SD-1.5's U-Net, 512x512
    python -m benchmarks.sd_train_speed --tiny                          # CPU smoke run (CI)

SD-1.5's U-Net (859,520,964 parameters, random weights: speed does not depend on their values) trained
on cached latents (64x64x4 for 512x512 images) and cached text states (77x768), as a fine-tuning run
does once the latents and captions are encoded. One step: timesteps and noise drawn, the latents
noised, the U-Net's eps prediction against the noise (MSE), gradients, clipping at norm 1, AdamW.

- jaxdiff: float32 master weights, bf16 compute, cuDNN fused attention, the whole step one compiled
  program; "full" trains every U-Net weight, "lora" rank-4 adapters on to_q/to_k/to_v/to_out.0 with
  the base frozen; "+ckpt" rematerialises each U-Net block in the backward pass.
- PyTorch: diffusers' UNet2DConditionModel the way diffusers' train_text_to_image.py trains it
  (float32 weights under bf16 autocast, torch.optim.AdamW, clip_grad_norm_), eager and under
  torch.compile; LoRA through peft as train_text_to_image_lora.py does (base weights in bf16,
  adapters in float32); "+ckpt" is ``enable_gradient_checkpointing()``.

Each implementation and variant runs in its own process (its own allocator and peak memory). Reported: images/s
(median of --repeats timed windows of --steps steps after a warm-up window), the first step (compile
included) and the peak GPU memory. Ratios are jaxdiff's images/s over each row's at the same batch,
mode and checkpointing, from this one run.
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

from benchmarks.sd_speed import configs

IMPLS = ("jaxdiff", "torch-eager", "torch-compiled")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def log(msg: str) -> None:
    print(f"[sd_train_speed] {msg}", file=sys.stderr, flush=True)


def variants(args):
    """(mode, checkpointing, batch) triples to measure: --variant's one in a worker, else every one."""
    if args.variant:
        mode, ckpt, b = args.variant.split(":")
        return [(mode, bool(int(ckpt)), int(b))]
    return [(mode, ckpt, b) for mode in args.modes for ckpt in args.checkpointing for b in args.batches]


def latent_shape(args, unet_cfg):
    side = args.size // 8 if not args.tiny else unet_cfg.get("sample_size", 8)
    return side, side, unet_cfg.get("in_channels", 4)


# ----------------------------------------------------------------------------- PyTorch


def measure_torch(args, compiled: bool, mode: str, ckpt: bool, batch: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = configs(args.tiny)["unet"]
    h, w, c = latent_shape(args, cfg)
    ctx = cfg.get("cross_attention_dim", 768)
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).to(dev)
    if mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(torch.bfloat16 if dev == "cuda" else torch.float32)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    model = torch.compile(unet) if compiled else unet
    latents = torch.randn(batch, c, h, w, device=dev)
    text = torch.randn(batch, 77, ctx, device=dev)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=dev) ** 2, 0)

    def step():
        t = torch.randint(0, 1000, (batch,), device=dev)
        noise = torch.randn_like(latents)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            pred = model(noisy, t, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.steps - 1):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else float("nan")
    return dict(first=first, seconds=float(np.median(times)) / args.steps, peak=peak, loss=float(loss))


def run(args, impl: str) -> list[dict]:
    """Every variant of ``impl`` (one, in a worker); an out-of-memory is a result, not a crash."""
    rows = []
    for mode, ckpt, batch in variants(args):
        name = f"{mode}{'+ckpt' if ckpt else ''}"
        try:
            if impl == "jaxdiff":
                from benchmarks import sd_train_jax

                r = sd_train_jax.measure(args, mode, ckpt, batch)
            else:
                r = measure_torch(args, impl == "torch-compiled", mode, ckpt, batch)
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            rows.append(dict(mode=name, batch=batch, oom=True))
            log(f"{impl} {name} batch {batch}: out of memory")
            continue
        rows.append(dict(mode=name, batch=batch, **r))
        log(f"{impl} {name} batch {batch}: {batch / r['seconds']:.2f} images/s, first {r['first']:.1f}s, "
            f"peak {r['peak'] / 2**30:.2f} GiB")
    return rows


# ----------------------------------------------------------------------------- the table


def device_name(impl: str) -> str:
    if impl == "jaxdiff":
        import jax

        return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    import diffusers
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}"


def worker(args) -> None:
    rows = run(args, args.worker)
    with open(args.json, "w") as f:
        json.dump({"impl": args.worker, "rows": rows, "device": device_name(args.worker)}, f)


def table(results: dict, args) -> str:
    arch = "the tiny test U-Net (a CPU smoke run)" if args.tiny else "Stable Diffusion 1.5's U-Net"
    lines = [f"{arch}, random weights, {args.size}x{args.size} images as cached latents and text states; "
             f"AdamW, clipping at 1; LoRA rank {args.lora_rank}; median of {args.repeats} windows of {args.steps} "
             f"steps after a warm-up window. {platform.node() or 'host'}, {time.strftime('%Y-%m-%d')}.", ""]
    for impl, res in results.items():
        lines.append(f"- {impl}: {res.get('device', res.get('error', ''))}")
    # model FLOPs (no recomputation counted), the same for every implementation of a mode
    flops = {r["mode"]: r["flops_per_image"] for r in results.get("jaxdiff", {}).get("rows", [])
             if r.get("flops_per_image") and "+ckpt" not in r["mode"]}
    for mode, f in flops.items():
        lines.append(f"- {mode}: {f / 1e12:.3f} TFLOP per trained image (XLA's count of the step's unoptimised "
                     f"HLO, XLA attention, no rematerialisation); MFU against {args.peak_bf16} TFLOP/s bf16")
    lines += ["", "| implementation | mode | batch | images/s | s per step | first step s | peak GPU GiB | "
                  "jaxdiff images/s / this |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours = {(r["mode"], r["batch"]): r for r in results.get("jaxdiff", {}).get("rows", []) if "seconds" in r}
    for impl, res in results.items():
        for r in res.get("rows", []):
            if r.get("oom") or r.get("error"):
                what = "out of memory" if r.get("oom") else f"failed: {r['error']}"
                lines.append(f"| {impl} | {r['mode']} | {r['batch']} | {what} | | | | |")
                continue
            rate = r["batch"] / r["seconds"]
            mine = ours.get((r["mode"], r["batch"]))
            ratio = f"{(mine['batch'] / mine['seconds']) / rate:.2f}x" if mine else "-"
            f = flops.get(r["mode"].replace("+ckpt", ""))
            extra = f" ({rate * f / (args.peak_bf16 * 1e12):.0%} MFU)" if f and args.peak_bf16 else ""
            lines.append(f"| {impl} | {r['mode']} | {r['batch']} | {rate:.2f}{extra} | {r['seconds']:.3f} | "
                         f"{r['first']:.1f} | {r['peak'] / 2**30:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="jaxdiff,torch-eager,torch-compiled", help=f"comma-separated, from {IMPLS}")
    p.add_argument("--batches", default="8,16", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--modes", default="full,lora", type=lambda s: s.split(","))
    p.add_argument("--checkpointing", default="0,1", type=lambda s: [bool(int(v)) for v in s.split(",")],
                   help="0, 1 or 0,1: without and/or with gradient checkpointing")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--peak-bf16", type=float, default=None, help="measured bf16 matrix rate in TFLOP/s, for MFU")
    p.add_argument("--tiny", action="store_true", help="the tiny test U-Net on the CPU: a smoke run")
    p.add_argument("--out", default=None, help="write the table here (markdown)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.repeats = min(args.steps, 2), min(args.repeats, 1)
    if args.worker:
        return worker(args)
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown {impl!r}; expected some of {IMPLS}")
    results, text = {}, ""
    for impl in impls:
        res = results.setdefault(impl, {"rows": []})
        for mode, ckpt, batch in variants(args):
            variant, name = f"{mode}:{int(ckpt)}:{batch}", f"{mode}{'+ckpt' if ckpt else ''}"
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sd_train_speed_{os.getpid()}.json")
            cmd = [sys.executable, "-m", "benchmarks.sd_train_speed", "--worker", impl, "--variant", variant,
                   "--json", path, "--lora-rank", str(args.lora_rank), "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--size", str(args.size)] + (["--tiny"] if args.tiny else []) \
                + (["--peak-bf16", str(args.peak_bf16)] if args.peak_bf16 else [])
            log(f"{impl} {name} batch {batch} ...")
            try:
                done = subprocess.run(cmd, timeout=args.timeout, stdout=sys.stderr)  # its log on our stderr
                if done.returncode:
                    res["rows"].append(dict(mode=name, batch=batch, error=f"exit status {done.returncode}"))
                else:
                    with open(path) as f:
                        one = json.load(f)
                    res["rows"] += one["rows"]
                    res["device"] = one["device"]
            except subprocess.TimeoutExpired:
                res["rows"].append(dict(mode=name, batch=batch, error=f"no result within {args.timeout}s"))
            text = table(results, args)
            if args.out:  # after every variant, so a cut-short run keeps what it measured
                with open(args.out, "w") as f:
                    f.write(text)
    print(text)


if __name__ == "__main__":
    main()
