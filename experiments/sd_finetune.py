"""Fine-tune Stable Diffusion (1.x, 2.x) on a folder of captioned images: the whole U-Net, or a LoRA.

    python -m experiments.sd_finetune --model path/to/stable-diffusion-v1-5 --data path/to/images \\
        --out runs/sd_ft --steps 2000 --batch-size 16 --validation-prompt "a photo of a red bicycle"
    python -m experiments.sd_finetune --model ... --data ... --lora-rank 4 --out runs/my_lora

--data is a Hugging Face ImageFolder (images and metadata.jsonl with file_name and text) or images with .txt
captions beside them (kohya-style, N_name repeat folders included); see jaxdiff.captioned. The autoencoder
and the text encoder stay frozen, so every image (and its mirror, unless --no-flip) is encoded once into a
latent cache in <out>/latent_cache with its caption's text states; training then reads only the cache.

Writes <out>/checkpoints (orbax; --resume continues exactly), loss.csv and loss.png, samples/step_N.png
(the validation prompts, one row each, every --sample-every steps, from the EMA weights) and at the end
either <out>/model (a diffusers folder: jaxdiff's and diffusers' from_pretrained both load it) or, with
--lora-rank, <out>/pytorch_lora_weights.safetensors (diffusers' load_lora_weights(<out>) and jaxdiff's
Pipeline.load_lora read it). --mesh data=D,fsdp=F splits the weights and optimizer state over F devices
(jaxdiff.sharding); on a TPU slice or GPU nodes, start the same command on every host (README).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments import common
from experiments.png import grid, write_png
from jaxdiff import captioned, distributed, lora, sampling, sd_train, sharding, trainer
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion

# the flag behind each setting a resume must match, besides common.FLAGS
FLAGS = {"meta.model": "--model", "meta.data": "--data", "meta.resolution": "--resolution",
         "meta.lora_rank": "--lora-rank", "meta.lora_alpha": "--lora-alpha", "meta.snr_gamma": "--snr-gamma",
         "meta.noise_offset": "--noise-offset", "meta.flip": "--no-flip", "meta.init_unet": "--init-unet",
         "train.weight_decay": "--weight-decay", "train.grad_accum": "--grad-accum"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder, or a hub id (online)")
    g.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16")
    g.add_argument("--init-unet", choices=["pretrained", "random"], default="pretrained",
                   help="random: train the U-Net from scratch from its config (the autoencoder and text "
                        "encoder as loaded)")
    g.add_argument("--data", required=True, help="a folder of captioned images (ImageFolder or .txt captions)")
    g.add_argument("--caption-column", default="text", help="metadata column holding the caption (default text)")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="an unreadable image or a missing caption: stop naming it, or skip it and count")
    g.add_argument("--resolution", type=common.positive_int, default=None,
                   help="square training size in pixels (default: the model's)")
    g.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=common.positive_int, default=1000)
    g.add_argument("--batch-size", type=common.positive_int, default=8, help="global batch (default 8)")
    g.add_argument("--lr", type=common.finite_float, default=None,
                   help="AdamW learning rate after warmup (default 1e-5; 1e-4 with --lora-rank)")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=common.finite_float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--grad-accum", type=common.positive_int, default=1, help="steps whose gradients are averaged")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved and sampled weights")
    g.add_argument("--p-uncond", type=common.probability, default=0.1,
                   help="captions dropped to the empty prompt, so classifier-free guidance works (default 0.1)")
    g.add_argument("--snr-gamma", type=common.finite_float, default=None, help="min-SNR-gamma loss weights")
    g.add_argument("--noise-offset", type=common.finite_float, default=0.0, help="offset noise (e.g. 0.05)")
    g.add_argument("--lora-rank", type=int, default=0, help="train a LoRA of this rank instead of the U-Net")
    g.add_argument("--lora-alpha", type=common.finite_float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each U-Net block in the backward pass: less memory, ~30%% more time")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype over float32 weights; auto = bf16 on GPU/TPU, f32 on CPU")
    g.add_argument("--mesh", default=None, help="data=D,fsdp=F: split weights and optimizer state over F devices")
    g.add_argument("--devices", type=common.device_count, default=0, help="devices (0 = all; one process only)")
    g.add_argument("--steps-per-dispatch", type=common.positive_int, default=10, help="steps per device call")
    g.add_argument("--seed", type=common.seed_int, default=0)
    g = p.add_argument_group("validation samples")
    g.add_argument("--validation-prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--sample-every", type=common.positive_int, default=500, help="draw them every N steps")
    g.add_argument("--per-prompt", type=common.positive_int, default=4, help="images per prompt")
    g.add_argument("--sampler", choices=tuple(sampling.SAMPLERS), default="dpm++")
    g.add_argument("--sample-steps", type=common.positive_int, default=25)
    g.add_argument("--gamma", type=common.finite_float, default=7.5, help="classifier-free guidance scale")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--out", default="runs/sd_finetune", help="output folder")
    g.add_argument("--save-every", type=common.positive_int, default=500, help="checkpoint every N steps")
    g.add_argument("--keep", type=common.positive_int, default=2, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    distributed.add_flags(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with common.cli(args) as out:
        run(args, out)


def check_flags(args) -> None:
    """Flags against each other and the devices, before the model is read."""
    if args.lora_rank < 0:
        raise common.Failure(f"--lora-rank must be >= 0 (0: train the whole U-Net), got {args.lora_rank}")
    if args.lora_rank and args.init_unet == "random":
        raise common.Failure("--lora-rank adapts a pretrained U-Net; --init-unet random trains one from scratch")
    if args.lora_alpha is not None and not args.lora_rank:
        raise common.Failure("--lora-alpha needs --lora-rank")
    if args.mesh is not None:  # a setting that does not fit the devices fails here, before encoding
        sharding.make_mesh(args.mesh, common.devices(args))


def check(args, sd) -> int:
    """Flags against the model, before anything is encoded or trained; returns the resolution."""
    resolution = args.resolution or sd.default_size[0]
    if resolution % sd.latent_factor:
        raise common.Failure(f"--resolution {resolution} must be a multiple of the autoencoder's "
                             f"{sd.latent_factor}")
    if args.validation_prompt and jax.process_count() > 1:
        common.note("validation samples are drawn in single-process runs only; none in this run")
    return resolution


def run(args, out):
    gpu = jax.default_backend() == "gpu"
    dtype = common.compute_dtype(args.dtype)
    check_flags(args)
    sd = stable_diffusion.load(args.model, dtype=dtype, attention="cudnn" if gpu else None, variant=args.variant)
    resolution = check(args, sd)
    images = captioned.scan(args.data, caption_column=args.caption_column, on_error=args.on_error)
    cache = build_cache(args, sd, images, out, resolution)
    batches = captioned.CachedBatches(images, cache, args.batch_size, args.seed, flip=not args.no_flip, text=True)
    unet = sd.unet_spec.module(dtype, "cudnn" if gpu else None, remat=args.gradient_checkpointing)
    empty = sd_train.empty_prompt_states(sd)
    settings = dict(p_uncond=args.p_uncond, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset)
    lr = args.lr if args.lr is not None else (1e-4 if args.lora_rank else 1e-5)
    config = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=lr,
                                 warmup_steps=args.warmup, ema_decay=args.ema, seed=args.seed,
                                 save_every=args.save_every, keep=args.keep,
                                 steps_per_dispatch=args.steps_per_dispatch, weight_decay=args.weight_decay,
                                 grad_accum=args.grad_accum)
    meta = {"model": str(args.model), "data": images.fingerprint(), "resolution": resolution,
            "flip": not args.no_flip, "init_unet": args.init_unet, "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha, **{k: v for k, v in settings.items()}}
    apply = sd_train.unet_apply(unet)
    if args.lora_rank:
        adapters = lora.init(sd.params, rank=args.lora_rank, alpha=args.lora_alpha, key=jax.random.key(args.seed))
        loss = lambda base: sd_train.sd_loss(lora.apply_with(apply, base, adapters), sd.schedule, sd.prediction,
                                             empty_context=empty, **settings)
        spec, params, frozen = None, adapters.weights, sd.params["unet"]
        what = f"LoRA rank {args.lora_rank} ({sum(a.size for a in jax.tree.leaves(params)):,} parameters)"
        unet_of = lambda weights: lora.merge(sd.params, adapters.replace(weights))["unet"]
    else:
        loss = sd_train.sd_loss(apply, sd.schedule, sd.prediction, empty_context=empty, **settings)
        spec, frozen = sd.unet_spec, None
        params = sd.params["unet"] if args.init_unet == "pretrained" else None
        what = f"the U-Net ({sd.unet_spec.num_params():,} parameters{', from scratch' if params is None else ''})"
        unet_of = lambda weights: weights
    what += f", {len(images)} captioned images at {resolution}x{resolution}"
    validate = Validation(args, sd, out, unet_of)
    every = (args.sample_every, validate) if validate.active else None
    result = common.fit(args, spec, loss, None, None, out, meta=meta, label="sd_finetune", params=params,
                        config=config, flags=FLAGS, batches=batches, what=what, mesh=args.mesh, frozen=frozen,
                        every=every)
    ema = result.state.ema_params
    if validate.active and int(result.state.step) % args.sample_every:
        validate(result.state, int(result.state.step))
    if not trainer.is_writer():
        return
    if args.lora_rank:
        path = out / "pytorch_lora_weights.safetensors"
        lora.save(path, adapters.replace(jax.device_get(ema)))
    else:
        path = out / "model"
        sd.save_pretrained(path, params={"unet": jax.device_get(ema)})
    print(f"done: {int(result.state.step)} steps ({common.speed(result)}); saved {path}", file=sys.stderr)


def build_cache(args, sd, images, out, resolution) -> captioned.LatentCache:
    """Latents (a draw from the autoencoder's posterior, scaled as the loss wants) and CLIP's text states
    of every image and caption, made once per (images, captions, resolution, flips, model)."""
    params = {"vae": sd.params["vae"], "text": sd.params["text"]}
    encode_jit = jax.jit(lambda p, x, key: sd.encode(p, x.astype(jnp.float32) / 127.5 - 1.0,
                                                     jax.random.split(key, x.shape[0])))
    text_jit = jax.jit(lambda p, ids: sd.condition().network(p, ids))
    drawn = iter(range(1 << 30))
    encode = lambda x: np.asarray(encode_jit(params, x, jax.random.key(next(drawn))), np.float32)
    tokenize = lambda captions: np.asarray(sd.tokenizer(list(captions))[0], np.int32)
    encode_text = lambda ids: np.asarray(text_jit(params, ids), np.float32)
    return captioned.LatentCache.build(images, epath.Path(out) / "latent_cache", encode, resolution=resolution,
                                       flips=not args.no_flip, tokenize=tokenize, encode_text=encode_text,
                                       key=f"{args.model}:{args.variant}")


class Validation:
    """Sample grids of the validation prompts from the EMA weights (rows: prompts; columns: seeds)."""

    def __init__(self, args, sd, out, unet_of):
        self.args, self.out, self.unet_of = args, epath.Path(out), unet_of
        self.active = bool(args.validation_prompt) and jax.process_count() == 1
        self.pipe = Pipeline.for_stable_diffusion(sd) if self.active else None
        self.params = sd.params

    def __call__(self, state, step: int) -> None:
        a = self.args
        self.pipe.params = {**self.params, "unet": self.unet_of(state.ema_params)}
        prompts = [q for q in a.validation_prompt for _ in range(a.per_prompt)]
        images = np.asarray(self.pipe(prompts, gamma=a.gamma, sampler=a.sampler, steps=a.sample_steps, seed=a.seed))
        if trainer.is_writer():
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            path = self.out / "samples" / f"step_{step:06d}.png"
            write_png(path, grid(images.reshape(len(a.validation_prompt), a.per_prompt, *images.shape[1:])))
            common.note(f"step {step}: samples in {path}")


if __name__ == "__main__":
    main()
