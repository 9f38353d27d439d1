"""Section 10.5.2: a pretrained Stable Diffusion (1.x, 2.x or SDXL, diffusers folder or hub id) from prompts to
PNGs, in pure JAX: text encoding, the whole sampling loop and decoding in one compiled program.

    python -m experiments.sd_text2img --model path/to/stable-diffusion-v1-5 --prompt "a red bicycle" \\
        --negative "blurry" --out runs/sd

Writes <out>/<index>.png per image and grid.png (rows = prompts, columns = --per-prompt images), and prints
the first call's time (compile included) and the time per image after it. With --image (a PNG or JPEG) and
--strength, image-to-image; with --mask too (white = repaint) and an inpainting folder, inpainting. On a GPU
the default compute is bfloat16 with cuDNN's fused attention.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments import common
from experiments.png import grid, write_png
from jaxdiff import sampling
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import walks


def read_image(path, mode: str = "RGB", flag: str = "--image") -> np.ndarray:
    """An image file (PNG, JPEG, ...) -> uint8 (H, W, 3), or (H, W) for mode "L" (grey, as diffusers reads
    masks), through Pillow (matplotlib's own dependency, in the 'experiments' extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{flag} needs Pillow: pip install 'jaxdiff[experiments]'") from None
    try:
        with epath.Path(path).open("rb") as f:
            return np.asarray(Image.open(f).convert(mode))
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: cannot be read as an image ({err})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder, or a hub id (online)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--negative", default=None, help="what to steer away from (default: the empty prompt)")
    p.add_argument("--per-prompt", type=common.positive_int, default=1, help="images per prompt")
    p.add_argument("--gamma", type=common.finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's, 7.5 for SD 1.x/2.x, 5 for SDXL)")
    p.add_argument("--prompt-2", default=None, help="SDXL: the prompt for the second text encoder (default --prompt)")
    p.add_argument("--negative-2", default=None, help="SDXL: the negative for the second text encoder")
    p.add_argument("--sampler", choices=(*walks.supported(), *sampling.SAMPLERS), default="auto", metavar="NAME",
                   help="auto (the folder's scheduler, as diffusers runs it), an A1111 name such as 'DPM++ 2M' or "
                        "'PLMS', a diffusers walk (pndm, unipc, ...), or one of jaxdiff's own samplers "
                        f"({', '.join(sampling.SAMPLERS)}); default auto")
    p.add_argument("--steps", type=common.positive_int, default=None,
                   help="sampler steps (default: diffusers' 50 for auto and the diffusers walks, else the sampler's)")
    p.add_argument("--seed", type=common.seed_int, default=0)
    p.add_argument("--height", type=common.positive_int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=common.positive_int, default=None, help="image width (default: the model's)")
    p.add_argument("--image", default=None, help="a PNG to start from (image-to-image)")
    p.add_argument("--strength", type=common.finite_float, default=None,
                   help="how far image-to-image departs, in (0, 1] (default 0.8, inpainting 1, SDXL inpainting "
                        "0.9999; needs --image)")
    p.add_argument("--mask", default=None, help="a PNG of the region to repaint, white (inpainting; needs --image)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype; auto = bf16 on GPU/TPU, f32 on CPU (float16: not on the CPU)")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                   help="attention kernel; auto = cuDNN's fused attention on a GPU, XLA elsewhere")
    p.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16")
    p.add_argument("--repeats", type=int, default=1, help="timed calls after the first (for the time per image)")
    p.add_argument("--out", default="runs/sd_text2img", help="output folder")
    args = p.parse_args(argv)
    with common.cli(args.out) as out:
        run(args, out)


def run(args, out):
    gpu = jax.default_backend() == "gpu"
    attention = {"auto": "cudnn" if gpu else None, "xla": None, "cudnn": "cudnn"}[args.attention]
    t0 = time.perf_counter()
    dtype = common.compute_dtype(args.dtype) if args.dtype != "float16" else jnp.float16
    pipe = Pipeline.from_pretrained(args.model, dtype=dtype, attention=attention, variant=args.variant)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompts = [q for q in args.prompt for _ in range(args.per_prompt)]
    image = read_image(args.image) if args.image else None
    mask = read_image(args.mask, "L", "--mask") if args.mask else None
    kwargs = dict(gamma=args.gamma, sampler=args.sampler, steps=args.steps, seed=args.seed, height=args.height,
                  width=args.width, image=image, strength=args.strength)
    if mask is not None:  # only then, so that a pipeline without inpainting is called as before
        kwargs["mask"] = mask
    if args.prompt_2 is not None:
        kwargs["prompt_2"] = [args.prompt_2] * len(prompts)
    if args.negative_2 is not None:
        kwargs["negative_2"] = args.negative_2
    t0 = time.perf_counter()
    images = np.asarray(pipe(prompts, args.negative, **kwargs))
    first = time.perf_counter() - t0
    used = pipe.last_sampling
    print(used["line"])
    per_image = float("nan")
    if args.repeats > 0:
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            images = np.asarray(pipe(prompts, args.negative, **kwargs))
        per_image = (time.perf_counter() - t0) / (args.repeats * len(prompts))
    for i, img in enumerate(images):
        write_png(out / f"{i:03d}.png", img)
    write_png(out / "grid.png", grid(images.reshape(len(args.prompt), args.per_prompt, *images.shape[1:])))
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    gamma = pipe.default_gamma if args.gamma is None else args.gamma
    print(f"done: {len(images)} images {images.shape[1]}x{images.shape[2]}, {used['sampler']} {used['steps']} steps, "
          f"gamma {gamma:g}; first call {first:.1f}s (compile included), {per_image:.3f}s per image after it "
          f"({device}, {jnp.dtype(dtype).name}); outputs in {out}")


if __name__ == "__main__":
    main()
