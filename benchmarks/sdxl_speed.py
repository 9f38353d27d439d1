"""SDXL base speed, jaxdiff beside diffusers, on one GPU in one run.

    python -m benchmarks.sdxl_speed --out docs/sdxl_speed.md     # GPU: SDXL base at 1024x1024, batch 1 and 4
    python -m benchmarks.sdxl_speed --tiny                       # CPU smoke run

The SDXL base 1.0 architecture (tests/fixtures/sdxl_real_configs.json: U-Net 2,567,463,684 parameters, two text
encoders, the force_upcast VAE) with random weights: speed does not depend on their values. One call = prompts
tokenized by both tokenizers, both encoders, 30 steps of DPM-Solver++ with classifier-free guidance (gamma 5, the
guidance pair as one batch), latents decoded, uint8 images on the host. jaxdiff: bf16 weights and compute, cuDNN
fused attention, the VAE in float32 (force_upcast), the whole call one compiled program. diffusers'
StableDiffusionXLPipeline in float16 (its VAE cast to float32 for decoding and back by the pipeline, as
force_upcast asks): eager with PyTorch's SDPA attention, and with its U-Net channels-last and
torch.compile(mode="reduce-overhead", fullgraph=True). Each implementation in its own process; reported as
benchmarks.sd_speed reports.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from benchmarks.sd_speed import (
    FIXTURES,
    Rows,
    parser,
    random_params,
    results_table,
    run_impls,
    timed,
    worker,
)

TOKENIZERS = (os.path.join(FIXTURES, "sd_tokenizer", "sd1"), os.path.join(FIXTURES, "sd_tokenizer", "sd2"))
IMPLS = ("jaxdiff", "jaxdiff-xla-attention", "diffusers-eager", "diffusers-compiled")
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
GAMMA = 5.0


def configs(tiny: bool) -> dict:
    """config.json of each part and the scheduler: SDXL base 1.0's, or the tiny test pipeline's."""
    folder = os.path.join(FIXTURES, "sdxl_tiny_base")
    read = lambda part, name="config.json": json.load(open(os.path.join(folder, part, name)))
    scheduler = read("scheduler", "scheduler_config.json")  # SDXL base's Euler config, as the fixture holds it
    if tiny:
        parts = {p: read(p) for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    else:
        real = json.load(open(os.path.join(FIXTURES, "sdxl_real_configs.json")))["sdxl_base"]
        parts = {p: real[p] for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return {**parts, "scheduler": scheduler}


def log(msg: str) -> None:
    print(f"[sdxl_speed] {msg}", file=sys.stderr, flush=True)


def run_jaxdiff(args, attention) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxdiff import specs
    from jaxdiff.pipeline import Pipeline
    from jaxdiff.pretrained.sdxl import StableDiffusionXL
    from jaxdiff.pretrained.tokenizer import load_tokenizer

    cfg = configs(args.tiny)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    parts = {"unet": specs.StableDiffusionUNet.from_config(cfg["unet"]),
             "vae": specs.StableDiffusionAutoencoder.from_config(cfg["vae"]),
             "text": specs.CLIPText.from_config(cfg["text_encoder"]),
             "text_2": specs.CLIPTextWithProjection.from_config(cfg["text_encoder_2"])}
    t0 = time.perf_counter()
    params = {k: random_params(s.template(), i, dtype) for i, (k, s) in enumerate(parts.items())}
    jax.block_until_ready(params)
    log(f"parameters made in {time.perf_counter() - t0:.1f}s")
    sd = StableDiffusionXL(parts["unet"], parts["vae"], parts["text"], parts["text_2"], params,
                           load_tokenizer(TOKENIZERS[0]), load_tokenizer(TOKENIZERS[1]), cfg["scheduler"],
                           {"force_zeros_for_empty_prompt": True}, dtype=dtype, attention=attention)
    pipe = Pipeline.for_stable_diffusion(sd)
    rows = Rows(args)
    for b in args.batches:
        call = lambda b=b: np.asarray(pipe([PROMPT] * b, gamma=GAMMA, sampler="dpm++", steps=args.steps, seed=0,
                                           height=args.size, width=args.size))
        first, sec = timed(call, args.repeats)
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(dict(batch=b, first=first, seconds=sec, peak=stats.get("peak_bytes_in_use", float("nan"))))
        log(f"{'jaxdiff' if attention else 'jaxdiff-xla-attention'} batch {b}: {sec:.3f}s per call, first {first:.1f}s")
    return rows


def run_diffusers(args, compiled: bool) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = configs(args.tiny)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_") and k not in ("architectures",
                                                                                          "model_type")}
    with torch.device(dev):  # random initialisation on the device
        unet = UNet2DConditionModel(**clean(cfg["unet"]))
        vae = AutoencoderKL(**clean(cfg["vae"]))
        text = CLIPTextModel(CLIPTextConfig(**clean(cfg["text_encoder"])))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clean(cfg["text_encoder_2"])))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZERS[0]),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZERS[1]), unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(cfg["scheduler"]), add_watermarker=False).to(dev, dtype)
    # the VAE stays float16: with force_upcast the pipeline itself casts it to float32 to decode, and back
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    rows = Rows(args)
    for b in args.batches:
        def call(b=b):
            with torch.no_grad():
                out = pipe([PROMPT] * b, num_inference_steps=args.steps, guidance_scale=GAMMA, height=args.size,
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


def table(results: dict, args) -> str:
    arch = "the tiny SDXL test pipeline (a CPU smoke run)" if args.tiny else "SDXL base 1.0 architecture"
    return results_table(results, f"{arch}, random weights, {args.size}x{args.size}, {args.steps} steps of "
                         f"DPM-Solver++ with classifier-free guidance (gamma {GAMMA}), both text encoders and "
                         f"decoding included; median of {args.repeats} calls after the first. "
                         f"{platform.node() or 'host'}, {time.strftime('%Y-%m-%d')}.")


def main(argv=None) -> None:
    args = parser(__doc__, IMPLS, batches="1,4", steps=30, size=1024, timeout=1200).parse_args(argv)
    if args.tiny:
        args.size, args.steps = 32, min(args.steps, 3)
    if args.worker:
        return worker(args, run_jaxdiff, run_diffusers)
    run_impls(args, "benchmarks.sdxl_speed", IMPLS, table)


if __name__ == "__main__":
    main()
