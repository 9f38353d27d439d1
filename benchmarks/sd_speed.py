"""Stable Diffusion speed, jaxdiff beside diffusers, on one GPU in one run.

    python -m benchmarks.sd_speed --out docs/sd_speed.md          # GPU: SD-1.5 at 512x512, batch 1 and 8
    python -m benchmarks.sd_speed --tiny                          # CPU smoke run (CI)

The SD-1.5 architecture (U-Net 859,520,964 parameters, autoencoder 83,653,863, text encoder 123,060,480)
with random weights: speed does not depend on their values. One call = prompts tokenized, encoded, 50
steps of DPM-Solver++ with classifier-free guidance (the guidance pair as one batch), latents decoded,
uint8 images on the host. jaxdiff: bf16 weights and compute, cuDNN fused attention where it applies, the
whole call one compiled program. diffusers' StableDiffusionPipeline in float16: eager with PyTorch's
SDPA attention, and with its U-Net channels-last and torch.compile(mode="reduce-overhead",
fullgraph=True). Each implementation runs in its own process (its own allocator and peak memory);
reported: seconds per call (median of --repeats after the first), images/s, the first call (compile
included) and peak GPU memory. Ratios are images/s of jaxdiff over each, from this one run.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER = os.path.join(FIXTURES, "sd_tokenizer", "sd1")  # a small CLIP-format vocabulary: ids < 1000
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      trained_betas=None, clip_sample=False)
# the speed levers of issue 21, in the order they landed; "jaxdiff-levers:N" runs with the first N of them
# (the rest undone by undo_levers), so one run measures each against the code before it
LEVERS = ("cross-attention on cuDNN", "one-pass GroupNorm", "no DotMerger in the loop")
IMPLS = ("jaxdiff", "jaxdiff-xla-attention", "diffusers-eager", "diffusers-compiled",
         *(f"jaxdiff-levers:{n}" for n in range(len(LEVERS))))
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def configs(tiny: bool) -> dict:
    """config.json of each part: SD-1.5's, or the tiny test pipeline's."""
    if tiny:
        folder = os.path.join(FIXTURES, "sd_tiny_sd1pipe")
        read = lambda part: json.load(open(os.path.join(folder, part, "config.json")))
        return {"unet": read("unet"), "vae": read("vae"), "text_encoder": read("text_encoder")}
    real = json.load(open(os.path.join(FIXTURES, "sd_real_configs.json")))["sd15"]
    return {k: real[k] for k in ("unet", "vae", "text_encoder")}


class Rows(list):
    """A worker's result rows, written to its --json file as each one lands: a worker stopped by --timeout
    still reports the batches it measured."""

    def __init__(self, args):
        super().__init__()
        self.args = args

    def append(self, row) -> None:
        super().append(row)
        save_json(self.args.json, {"impl": self.args.worker, "rows": list(self),
                                   "device": device_name(self.args.worker)})


def save_json(path: str, value) -> None:
    """Whole or not at all: a worker stopped mid-write leaves the previous file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def timed(call, repeats: int):
    """(first call's seconds, median seconds of ``repeats`` more); ``call`` must block until done."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


# ----------------------------------------------------------------------------- jaxdiff


def random_params(template, seed: int, dtype):
    """Normal(0, 0.02) parameters of the template's shapes, in ``dtype`` (as fp16 checkpoints are stored).
    Each leaf is a window, at a random offset, of one pool of 2**24 draws made on the host: speed does not
    depend on the values, and drawing SDXL's 2.6 billion afresh took 75 s. (flax's init would run a forward
    pass per part and compile every initializer.)"""
    import jax

    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(1 << 24, np.float32)).astype(dtype)

    def draw(leaf):
        n = int(np.prod(leaf.shape))
        start = int(rng.integers(pool.size))
        flat = np.resize(np.roll(pool, -start), n) if n > pool.size - start else pool[start:start + n]
        return jax.device_put(flat.reshape(leaf.shape))

    return jax.tree.map(draw, template)


def undo_levers(keep: int) -> None:
    """Put back the code before LEVERS[keep:]: XLA attention for odd sequence lengths (CLIP's 77 tokens),
    flax's two-pass GroupNorm in the pretrained blocks, XLA's DotMerger in the sampling program."""
    import flax.linen as nn

    from jaxdiff import pipeline
    from jaxdiff.nets import autoencoder, layers, unet

    if keep < 1:
        fits = layers.cudnn_attention_fits
        layers.cudnn_attention_fits = lambda q, mask=None, k=None: (
            fits(q, mask, k) and not q.shape[1] % 2 and (k is None or not k.shape[1] % 2))
    if keep < 2:
        group_norm = layers.group_norm
        two_pass = lambda features, dtype, *, groups=None, eps=1e-6, fast_variance=True, name=None: (
            group_norm(features, dtype, groups=groups, eps=eps, name=name) if fast_variance else
            nn.GroupNorm(num_groups=groups or (min(32, features // 4) or 1), epsilon=eps, dtype=dtype,
                         use_fast_variance=False, name=name))
        for module in (layers, unet, autoencoder):  # each bound the name at import
            if hasattr(module, "group_norm"):
                module.group_norm = two_pass
    if keep < 3:
        pipeline.LOOP_COMPILER_OPTIONS = {}


def run_jaxdiff(args, attention) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxdiff import specs
    from jaxdiff.pipeline import Pipeline
    from jaxdiff.pretrained.stable_diffusion import StableDiffusion
    from jaxdiff.pretrained.tokenizer import load_tokenizer

    cfg = configs(args.tiny)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    parts = {"unet": specs.StableDiffusionUNet.from_config(cfg["unet"]),
             "vae": specs.StableDiffusionAutoencoder.from_config(cfg["vae"]),
             "text": specs.CLIPText.from_config(cfg["text_encoder"])}
    t0 = time.perf_counter()
    params = {k: random_params(s.template(), i, dtype) for i, (k, s) in enumerate(parts.items())}
    jax.block_until_ready(params)
    made = time.perf_counter() - t0
    sd = StableDiffusion(parts["unet"], parts["vae"], parts["text"], params, load_tokenizer(TOKENIZER),
                         dict(SD15_SCHEDULER), dtype=dtype, attention=attention)
    pipe = Pipeline.for_stable_diffusion(sd)
    rows = Rows(args)
    for b in args.batches:
        call = lambda b=b: np.asarray(pipe([PROMPT] * b, gamma=7.5, sampler="dpm++", steps=args.steps, seed=0,
                                       height=args.size, width=args.size))
        first, sec = timed(call, args.repeats)
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(dict(batch=b, first=first, seconds=sec, peak=stats.get("peak_bytes_in_use", float("nan"))))
        if b == args.batches[0]:
            log(f"parameters made in {made:.1f}s")
        log(f"{args.worker} batch {b}: {sec:.3f}s per call, first {first:.1f}s")
    return rows


# ----------------------------------------------------------------------------- diffusers


def run_diffusers(args, compiled: bool) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = configs(args.tiny)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    with torch.device(dev):  # random initialisation on the device: seconds, not a minute on the host
        unet = UNet2DConditionModel(**clean(cfg["unet"]))
        vae = AutoencoderKL(**clean(cfg["vae"]))
        text = CLIPTextModel(CLIPTextConfig(**clean(cfg["text_encoder"])))
    sched = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    rows = Rows(args)
    for b in args.batches:
        def call(b=b):
            with torch.no_grad():
                out = pipe([PROMPT] * b, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                           width=args.size, output_type="np").images
            (out * 255).round().astype(np.uint8)
            if dev == "cuda":
                torch.cuda.synchronize()

        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first, sec = timed(call, args.repeats)
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else float("nan")
        rows.append(dict(batch=b, first=first, seconds=sec, peak=peak))
        log(f"diffusers-{'compiled' if compiled else 'eager'} batch {b}: {sec:.3f}s per call, first {first:.1f}s")
    return rows


# ----------------------------------------------------------------------------- the table


def log(msg: str) -> None:
    print(f"[sd_speed] {msg}", file=sys.stderr, flush=True)


def worker(args, run_jaxdiff=run_jaxdiff, run_diffusers=run_diffusers) -> None:
    """One implementation's measurements into --json; sdxl_speed passes its own runners."""
    impl = args.worker
    if impl.startswith("jaxdiff-levers:"):
        undo_levers(int(impl.split(":")[1]))
    if impl.startswith("jaxdiff"):
        rows = run_jaxdiff(args, None if impl == "jaxdiff-xla-attention" else "cudnn")
    else:
        rows = run_diffusers(args, compiled=impl == "diffusers-compiled")
    if not rows:  # nothing measured (no batches): still say what it ran on
        save_json(args.json, {"impl": impl, "rows": [], "device": device_name(impl)})


def device_name(impl: str) -> str:
    if impl.startswith("jaxdiff"):
        import jax

        return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import diffusers

    return f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}"


def table(results: dict, args) -> str:
    arch = "the tiny test pipeline (a CPU smoke run)" if args.tiny else "Stable Diffusion 1.5 architecture"
    return results_table(results, f"{arch}, random weights, {args.size}x{args.size}, {args.steps} steps of "
                         f"DPM-Solver++ with classifier-free guidance (gamma 7.5), text encoding and decoding "
                         f"included; median of {args.repeats} calls after the first. {platform.node() or 'host'}, "
                         f"{time.strftime('%Y-%m-%d')}.")


def results_table(results: dict, heading: str) -> str:
    """The markdown of ``run_impls``' results: what each implementation ran on, then a row per (implementation,
    batch) with jaxdiff's images/s over that row's at the same batch."""
    lines = [heading, ""]
    for impl, res in results.items():
        lines.append(f"- {impl}: {res.get('device', res.get('error', ''))}")
    lines += ["", "| implementation | batch | s per call | images/s | s per image | first call s | peak GPU GiB | "
                  "jaxdiff images/s / this |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours = {r["batch"]: r for r in results.get("jaxdiff", {}).get("rows", [])}
    for impl, res in results.items():
        for r in res.get("rows", []):
            rate = r["batch"] / r["seconds"]
            mine = ours.get(r["batch"])
            ratio = f"{(mine['batch'] / mine['seconds']) / rate:.2f}x" if mine else "-"
            lines.append(f"| {impl} | {r['batch']} | {r['seconds']:.3f} | {rate:.2f} | "
                         f"{r['seconds'] / r['batch']:.3f} | {r['first']:.1f} | {r['peak'] / 2**30:.2f} | {ratio} |")
        if "error" in res:
            lines.append(f"| {impl} | - | failed: {res['error']} | | | | | |")
    return "\n".join(lines) + "\n"


def parser(doc: str, impls, *, batches: str, steps: int, size: int, timeout: int) -> argparse.ArgumentParser:
    """The flags of sd_speed and sdxl_speed, with each one's defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="jaxdiff,diffusers-eager,diffusers-compiled",
                   help=f"comma-separated, from {', '.join(impls)}")
    p.add_argument("--batches", default=batches, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--size", type=int, default=size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the tiny test pipeline on the CPU: a smoke run")
    p.add_argument("--out", default=None, help="write the table here (markdown)")
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per implementation")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = parser(__doc__, IMPLS, batches="1,8", steps=50, size=512, timeout=900).parse_args(argv)
    if args.tiny:
        args.size, args.steps = 32, min(args.steps, 3)
    if args.worker:
        return worker(args)
    run_impls(args, "benchmarks.sd_speed", IMPLS, table)


def run_impls(args, module: str, impls, table) -> None:
    """Each implementation of ``args.impls`` in its own process (``python -m module --worker IMPL``), its
    log on our stderr; the table rewritten after each one, so a cut-short run keeps what it measured."""
    results = {}
    for impl in args.impls.split(","):
        if impl not in impls:
            raise SystemExit(f"--impls: unknown {impl!r}; expected some of {impls}")
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{module.split('.')[-1]}_{os.getpid()}_{impl}.json")
        cmd = [sys.executable, "-m", module, "--worker", impl, "--json", path,
               "--batches", ",".join(map(str, args.batches)), "--steps", str(args.steps), "--size", str(args.size),
               "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
        print(f"[{module.split('.')[-1]}] {impl} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, stdout=sys.stderr)
            error = f"exit status {done.returncode} (its log is above)" if done.returncode else None
        except subprocess.TimeoutExpired:
            error = f"stopped at {args.timeout}s"
        results[impl] = {}
        if os.path.exists(path):  # what it measured, even if it was stopped later
            with open(path) as f:
                results[impl] = json.load(f)
            os.remove(path)
        if error:
            results[impl]["error"] = error if results[impl].get("rows") else f"no result ({error})"
        text = table(results, args)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    print(text)


if __name__ == "__main__":
    main()
