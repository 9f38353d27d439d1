"""Stable Diffusion trained from scratch on captioned Fashion-MNIST, then taught a new word with a LoRA.

Every part is the diffusers / transformers class Stable Diffusion uses, built from a config: AutoencoderKL,
CLIPTextModel (with a CLIP-format BPE tokenizer whose vocabulary covers the captions), UNet2DConditionModel
and a DDPMScheduler config (SD's scaled-linear betas, eps targets). Stages, each checkpointed under --out
(rerun with --resume):

  autoencoder/  the KL autoencoder on the images (32x32 RGB: the 28x28 grey images padded by 2 black pixels
                and replicated over R, G, B) -> 8x8x4 latents; reconstruction + a small KL. Its
                scaling_factor is then set as diffusers' is: 1 / the latents' standard deviation.
  unet/         the U-Net and the text encoder trained together by the diffusion loss (jaxdiff.sd_train's
                loss; the text encoder is not pretrained: it learns from the diffusion loss alone) on the
                cached latents, each image captioned from its label with a random template ("a photo of a
                sneaker", "a picture of a boot", ...), 10% of captions dropped to the empty prompt for CFG.
  model/        the diffusers folder (save_pretrained): jaxdiff's and diffusers' from_pretrained load it.
  dreambooth/   20 training images of one class (--new-class) captioned "a photo of a <--new-word>", a word the
                model never saw; experiments.sd_finetune trains a LoRA of the U-Net on them (the text encoder
                stays frozen): <out>/dreambooth/run/pytorch_lora_weights.safetensors.

The saved folder is then loaded back with Pipeline.from_pretrained and judged by the evaluation classifier of
docs/QUALITY.md (jaxdiff.judge; grey 28x28 crops of the samples): class accuracy of "a photo of a {class}" for
every class, and of "a photo of a <word>" (judged as --new-class) before and after the LoRA, with every
class's prompt again after it (what the LoRA did to the rest). Writes prompts.png (rows: the ten class prompts,
then the new word before and after the LoRA), results.md (the table) and results.json.

    python -m experiments.sd_from_scratch --data-dir /usr/share/datasets/fashion-mnist --out runs/sd_from_scratch
    (a stage cut short, e.g. by a time limit: the same command with --resume continues from its checkpoints)
    python -m experiments.sd_from_scratch --tiny --out /tmp/sd_tiny     # CPU plumbing check: tiny models, few steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments import common, sd_finetune
from experiments.png import write_png
from jaxdiff import captions, data, distributed, sd_train, specs, train, trainer
from jaxdiff.judge import Judge
from jaxdiff.pipeline import Pipeline
from jaxdiff.pretrained import stable_diffusion
from jaxdiff.pretrained.stable_diffusion import StableDiffusion
from jaxdiff.pretrained.tokenizer import CLIPTokenizer

DATASET = "fashion_mnist"
SIZE, PAD = 32, 2  # 28x28 images padded to 32x32: the U-Net halves the 8x8 latents once
EVAL_TEMPLATE = "a photo of a {name}"
MAX_TOKENS = 16  # the longest caption is 9 tokens with the start and end tokens
# SD 1.x's training schedule, as a DDPMScheduler config
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
             "timestep_spacing": "leading", "steps_offset": 1}


# sizes --------------------------------------------------------------------------------------------------------


def configs(tiny: bool) -> dict:
    """The component configs (diffusers' and transformers' keys). Full: what one GPU trains in minutes."""
    ch_vae, ch_unet, groups, width, layers = ((8, 16, 16), (16, 32), 8, 32, 1) if tiny else \
        ((32, 64, 128), (64, 128), 32, 128, 2)
    # tiny: cross-attention at the inner level only, no attention in the autoencoder (less to compile)
    attn_down = ["DownBlock2D", "CrossAttnDownBlock2D"] if tiny else ["CrossAttnDownBlock2D"] * 2
    return {
        "vae": {"block_out_channels": list(ch_vae), "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": groups, "in_channels": 3, "out_channels": 3, "sample_size": SIZE,
                "scaling_factor": 1.0, "mid_block_add_attention": not tiny},
        "unet": {"block_out_channels": list(ch_unet), "layers_per_block": 1 if tiny else 2,
                 "down_block_types": attn_down,
                 "up_block_types": [b.replace("Down", "Up") for b in reversed(attn_down)],
                 "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": 2 if tiny else 4,
                 "cross_attention_dim": width, "norm_num_groups": groups, "in_channels": 4, "out_channels": 4,
                 "sample_size": SIZE // 4},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                         "num_attention_heads": 2 if tiny else 4, "max_position_embeddings": MAX_TOKENS,
                         "hidden_act": "quick_gelu"},
    }


TINY_STEPS = dict(ae_steps=4, unet_steps=4, lora_steps=2, judge_steps=2, batch_size=8, per_class=2, sample_steps=2,
                  train_images=256, lora_images=4, lora_batch=4, steps_per_dispatch=2)


# the tokenizer ------------------------------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each byte 0..255: printable Latin-1 bytes stand for themselves,
    the others take the code points from 256 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\xa1"), ord("\xac") + 1)) \
        | set(range(ord("\xae"), ord("\xff") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none is listed."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1), key=lambda i: ranks.get((symbols[i], symbols[i + 1]), 1 << 30))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def word_tokenizer(words, max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIP tokenizer (byte-level BPE, the files transformers' CLIPTokenizer reads) whose vocabulary holds
    every byte and each of ``words`` as one token, so any text tokenizes and the captions' words are whole.
    Each word's merges are added after the earlier words' and join what those leave of it, so no later
    merge changes an earlier word."""
    base = byte_symbols()
    vocab = {s: i for i, s in enumerate(base + [s + "</w>" for s in base])}
    merges, ranks = [], {}
    for word in dict.fromkeys(w.lower() for w in words):
        chars = [base[b] for b in word.encode("utf-8")]
        pieces = _bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokens = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}
    tok = CLIPTokenizer(vocab, merges, special_tokens={k: {"content": v, "normalized": False}
                                                       for k, v in tokens.items()}, max_length=max_length)
    split = [w for w in dict.fromkeys(words) if len(tok.tokens(w)) != 3]  # start, the word, end
    if split:
        raise AssertionError(f"the tokenizer splits {split}")  # a fault of the construction above
    return tok


def caption_words(new_word: str) -> list[str]:
    return sorted({w for t in captions.all_texts(DATASET) for w in t.split()} | {new_word})


# data -------------------------------------------------------------------------------------------------------


def to_rgb32(images) -> np.ndarray:
    """(N, 28, 28, 1) uint8 -> (N, 32, 32, 3): padded with black (the background), grey on R, G, B."""
    x = np.pad(np.asarray(images), ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    return np.repeat(x, 3, axis=-1)


def to_judged(images) -> np.ndarray:
    """(N, 32, 32, 3) uint8 samples -> (N, 28, 28, 1) as the judge reads: the centre, the mean of R, G, B."""
    x = np.asarray(images, np.float32)[:, PAD : SIZE - PAD, PAD : SIZE - PAD].mean(-1, keepdims=True)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def caption_table(tok, templates) -> np.ndarray:
    """Token ids (classes + 1, templates, L): each class in each template; the last row the empty prompt."""
    n = len(captions.CLASS_NAMES[DATASET])
    texts = [[captions.caption(DATASET, y, t) for t in templates] for y in range(n)] + [[""] * len(templates)]
    return tok([t for row in texts for t in row])[0].reshape(n + 1, len(templates), -1)


# training -----------------------------------------------------------------------------------------------------


def joint_loss(unet, text, schedule, prediction: str, ids_table, p_uncond: float):
    """The diffusion loss of ``jaxdiff.sd_train`` with the text encoder trained by it too: parameters
    {"unet", "text"}, batches (latents, labels); each example's caption a random template of its label's
    row in ``ids_table``, or the empty prompt (the table's last row) with probability ``p_uncond``."""
    sd_train.check_settings(prediction, p_uncond, None, 0.0)
    table = jnp.asarray(ids_table)
    empty, templates = table.shape[0] - 1, table.shape[1]
    apply = sd_train.unet_apply(unet)

    def loss_fn(params, latents, labels, key, shard):
        z0 = latents.astype(jnp.float32)
        keys = shard.keys(key, z0.shape[0])
        drop, t, noise = sd_train.draw(keys, z0.shape[1:], schedule.num_timesteps, p_uncond)
        pick = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, templates))(keys)
        ids = table[jnp.where(drop, empty, labels), pick]
        context = text.apply(params["text"], ids).last_hidden_state
        return sd_train.denoising_loss(apply, params["unet"], schedule, prediction, z0, context, t, noise)

    return loss_fn


def stage_config(args, steps: int, lr: float, batch: int | None = None) -> trainer.TrainConfig:
    return trainer.TrainConfig(steps=steps, batch_size=batch or args.batch_size, learning_rate=lr,
                               warmup_steps=min(200, steps // 10), ema_decay=args.ema, seed=args.seed,
                               save_every=steps, keep=1, steps_per_dispatch=min(args.steps_per_dispatch, steps))


def train_autoencoder(args, cfg, images, out, dtype):
    """The KL autoencoder's EMA parameters, and its spec with scaling_factor = 1 / std of the latents."""
    spec = specs.StableDiffusionAutoencoder.from_config(cfg)
    loss = train.vae_loss(spec.module(dtype), kl_weight=args.kl_weight)
    config = stage_config(args, args.ae_steps, args.lr)
    result = common.fit(args, spec, loss, None, None, out / "autoencoder", meta={"kl_weight": args.kl_weight},
                        label="autoencoder", config=config, stage=True,
                        batches=data.Batches(images, np.zeros(len(images), np.int32), config.batch_size, args.seed),
                        what=f"AutoencoderKL {tuple(cfg['block_out_channels'])}, {spec.num_params():,} parameters, "
                             f"{len(images)} images 32x32 -> 8x8x4")
    params = jax.device_get(result.state.ema_params)
    ae = spec.module()
    encode = jax.jit(lambda x: ae.apply(params, data.to_float(x), method="encode"))
    decode = jax.jit(lambda z: ae.apply(params, z, method="decode"))
    sub = images[:2000]
    mean, logvar = encode(sub)
    mse = float(np.mean((np.asarray(decode(mean)) - data.to_float(sub)) ** 2))
    std = float(np.asarray(mean).std())
    common.note(f"autoencoder: reconstruction MSE {mse:.4f} (pixels in [-1, 1]) on {len(sub)} training images; "
                f"latent std {std:.3f} -> scaling_factor {1 / std:.4f}")
    spec = specs.StableDiffusionAutoencoder.from_config({**cfg, "scaling_factor": round(1.0 / std, 5)})
    return spec, params, {"ae_mse": mse, "scaling_factor": 1.0 / std}


def encode_latents(sd, images, seed: int, chunk: int = 2000) -> np.ndarray:
    """Scaled latents of uint8 images: one draw from the encoder's posterior each (as the SD scripts cache)."""
    fn = jax.jit(lambda p, x, key: sd.encode(p, data.to_float(x), jax.random.split(key, x.shape[0])))
    return np.concatenate([np.asarray(fn(sd.params, images[i : i + chunk], jax.random.key(seed + i)), np.float32)
                           for i in range(0, len(images), chunk)])


# judging ----------------------------------------------------------------------------------------------------


def class_prompts() -> list[str]:
    return [captions.caption(DATASET, y, EVAL_TEMPLATE) for y in range(len(captions.CLASS_NAMES[DATASET]))]


def sample(pipe, prompts, args, seed: int) -> np.ndarray:
    return np.asarray(pipe(prompts, gamma=args.gamma, sampler="dpm++", steps=args.sample_steps, seed=seed))


def judge_classes(pipe, judge, args, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Class accuracy of "a photo of a {class}" samples, --per-class each; and the per-class accuracies."""
    asked = np.repeat(np.arange(10), args.per_class)
    images = sample(pipe, [class_prompts()[y] for y in asked], args, seed)
    hit = judge.logits(to_judged(images)).argmax(-1) == asked
    return float(hit.mean()), hit.reshape(10, -1).mean(1), images


def judge_word(pipe, judge, args, target: int, seed: int) -> tuple[float, list[int], np.ndarray]:
    """Share of "a photo of a <word>" samples the judge calls class ``target``, and how many it calls each
    class (as many samples as judge_classes draws, so the sampler's compiled program is reused)."""
    images = sample(pipe, [word_prompt(args)] * (10 * args.per_class), args, seed)
    called = judge.logits(to_judged(images)).argmax(-1)
    return float(np.mean(called == target)), np.bincount(called, minlength=10).tolist(), images


def word_prompt(args) -> str:
    return f"a photo of a {args.new_word}"


# the run ----------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with Fashion-MNIST's IDX .gz files")
    p.add_argument("--tiny", action="store_true", help="tiny models and a few steps of each stage: the CPU "
                                                       "plumbing check (sets the step, batch and sample flags)")
    g = p.add_argument_group("training")
    g.add_argument("--ae-steps", type=common.positive_int, default=2000, help="autoencoder steps")
    g.add_argument("--unet-steps", type=common.positive_int, default=5000, help="U-Net + text encoder steps")
    g.add_argument("--batch-size", type=common.positive_int, default=256)
    g.add_argument("--lr", type=common.finite_float, default=1e-3, help="Adam learning rate of both stages")
    g.add_argument("--ema", type=float, default=0.999)
    g.add_argument("--kl-weight", type=common.finite_float, default=1e-4)
    g.add_argument("--p-uncond", type=common.probability, default=0.1)
    g.add_argument("--train-images", type=common.positive_int, default=60000, help="training images used")
    g.add_argument("--steps-per-dispatch", type=common.positive_int, default=100)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    g.add_argument("--devices", type=common.device_count, default=0, help="devices (0 = all; one process only)")
    g.add_argument("--seed", type=common.seed_int, default=0)
    g = p.add_argument_group("the new word (LoRA)")
    g.add_argument("--new-word", default="sks", help="the word taught (default sks)")
    g.add_argument("--new-class", choices=[n for n, _ in captions.CLASS_NAMES[DATASET]], default="bag",
                   help="the class whose images it is taught from (default bag)")
    g.add_argument("--lora-images", type=common.positive_int, default=20)
    g.add_argument("--lora-steps", type=common.positive_int, default=400)
    g.add_argument("--lora-rank", type=common.positive_int, default=8)
    g.add_argument("--lora-lr", type=common.finite_float, default=1e-3)
    g.add_argument("--lora-batch", type=common.positive_int, default=20)
    g = p.add_argument_group("judging")
    g.add_argument("--eval-classifier", default="runs/eval_fashion_mnist",
                   help="the evaluation classifier's folder (trained there first if absent)")
    g.add_argument("--judge-steps", type=common.positive_int, default=3000)
    g.add_argument("--per-class", type=common.positive_int, default=100, help="samples per prompt judged")
    g.add_argument("--gamma", type=common.finite_float, default=3.0, help="classifier-free guidance scale")
    g.add_argument("--sample-steps", type=common.positive_int, default=20, help="DPM-Solver++ steps")
    g.add_argument("--out", default="runs/sd_from_scratch")
    g.add_argument("--resume", action="store_true", help="continue each stage from its checkpoints in --out")
    distributed.add_flags(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.tiny:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in TINY_STEPS.items():
            if k not in given:
                setattr(args, k, v)
    with common.cli(args) as out:
        run(args, out)


def run(args, out):
    t_start = time.perf_counter()
    if jax.process_count() > 1:
        raise common.Failure("sd_from_scratch runs in one process (its stages are small); start it once")
    gpu = jax.default_backend() == "gpu"
    dtype = common.compute_dtype(args.dtype)
    cfg = configs(args.tiny)
    target = [n for n, _ in captions.CLASS_NAMES[DATASET]].index(args.new_class)
    if args.lora_batch > args.lora_images:
        raise common.Failure(f"--lora-batch {args.lora_batch} is more than --lora-images {args.lora_images}")
    images28, labels = data.load(DATASET, "train", args.data_dir)
    test28, test_labels = data.load(DATASET, "test", args.data_dir)
    images28, labels = images28[: args.train_images], labels[: args.train_images]
    images = to_rgb32(images28)
    timings, results = {}, {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}

    # 1. the autoencoder
    t0 = time.perf_counter()
    vae_spec, vae_params, ae_stats = train_autoencoder(args, cfg["vae"], images, out, dtype)
    results.update(ae_stats)
    timings["autoencoder"] = time.perf_counter() - t0

    # 2. + 3. the tokenizer, then the U-Net and the text encoder trained together on cached latents
    t0 = time.perf_counter()
    tok = word_tokenizer(caption_words(args.new_word))
    unet_spec = specs.StableDiffusionUNet.from_config(cfg["unet"])
    text_spec = specs.CLIPText.from_config({**cfg["text_encoder"], "vocab_size": len(tok.vocab),
                                            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                            "pad_token_id": tok.pad_token_id})
    params = {"unet": unet_spec.init(args.seed), "text": text_spec.init(args.seed + 1), "vae": vae_params}
    sd = StableDiffusion(unet_spec, vae_spec, text_spec, params, tok, dict(SCHEDULER))
    latents = encode_latents(sd, images, args.seed)
    table = caption_table(tok, captions.TRAIN_TEMPLATES[DATASET])
    loss = joint_loss(unet_spec.module(dtype), text_spec.module(dtype), sd.schedule, sd.prediction, table,
                      args.p_uncond)
    config = stage_config(args, args.unet_steps, args.lr)
    n_unet, n_text = unet_spec.num_params(), text_spec.num_params()
    result = common.fit(args, None, loss, None, None, out / "unet", label="unet+text",
                        meta={"configs": {"unet": cfg["unet"], "text": text_spec.config_dict()},
                              "p_uncond": args.p_uncond, "images": len(images), "scaling": vae_spec.config_dict()},
                        params={"unet": params["unet"], "text": params["text"]}, config=config, stage=True,
                        batches=data.Batches(latents, labels, config.batch_size, args.seed),
                        what=f"UNet2DConditionModel {tuple(cfg['unet']['block_out_channels'])} ({n_unet:,} "
                             f"parameters) and CLIPTextModel ({n_text:,}) from scratch, {len(images)} captioned "
                             f"latents 8x8x4")
    timings["unet"] = time.perf_counter() - t0
    trained = jax.device_get(result.state.ema_params)

    # 4. the diffusers folder
    model = out / "model"
    sd.save_pretrained(model, params={"unet": trained["unet"], "text": trained["text"]})
    common.note(f"saved the pipeline: {model}")

    # 5. judged: samples of every class prompt from the folder loaded back
    t0 = time.perf_counter()
    judge = Judge.train_or_load(args.eval_classifier, images28, labels, dataset=DATASET, steps=args.judge_steps,
                                seed=args.seed)
    real = min(2000, len(test28))
    results["judge_real"] = judge.accuracy(test28[:real], test_labels[:real])
    folder_sd = stable_diffusion.load(str(model), dtype=dtype)
    recon = np.asarray(jax.jit(lambda p, x: folder_sd.decode(p, folder_sd.encode(
        p, data.to_float(x), jax.random.split(jax.random.key(0), x.shape[0]))))(folder_sd.params,
                                                                                to_rgb32(test28[:real])))
    results["judge_recon"] = judge.accuracy(to_judged(data.to_uint8(recon)), test_labels[:real])
    pipe = Pipeline.for_stable_diffusion(folder_sd)
    results["classes"], per_class, class_images = judge_classes(pipe, judge, args, args.seed + 1)
    results["per_class"] = [float(a) for a in per_class]
    results["word_before"], results["word_before_called"], before_images = judge_word(pipe, judge, args, target,
                                                                                      args.seed + 2)
    timings["judge"] = time.perf_counter() - t0
    common.note(f"judged: class accuracy of '{EVAL_TEMPLATE}' samples {results['classes']:.4f}; "
                f"'{word_prompt(args)}' judged {args.new_class}: {results['word_before']:.4f} before the LoRA")

    # 6. the new word: a LoRA from --lora-images images of the class, by the fine-tune CLI
    t0 = time.perf_counter()
    folder = out / "dreambooth" / "images"
    pick = np.flatnonzero(labels == target)[: args.lora_images]
    if len(pick) < args.lora_batch:
        raise common.Failure(f"--lora-batch {args.lora_batch}: only {len(pick)} training images of {args.new_class}")
    write_caption_folder(folder, images[pick], word_prompt(args))
    run_out = out / "dreambooth" / "run"
    ft = sd_finetune.parser().parse_args([
        "--model", str(model), "--data", str(folder), "--out", str(run_out), "--lora-rank", str(args.lora_rank),
        "--steps", str(args.lora_steps), "--batch-size", str(args.lora_batch), "--lr", str(args.lora_lr),
        "--warmup", str(min(50, args.lora_steps // 10)), "--ema", "0.99", "--weight-decay", "0",
        "--steps-per-dispatch", str(min(50, args.lora_steps)), "--save-every", str(args.lora_steps),
        "--dtype", args.dtype, "--seed", str(args.seed), *(["--resume"] if args.resume else [])])
    run_out.mkdir(parents=True, exist_ok=True)
    lora_file = run_out / "pytorch_lora_weights.safetensors"
    try:
        sd_finetune.run(ft, run_out)
    except common.NothingToDo:  # --resume of a run whose LoRA was trained and saved
        if not lora_file.exists():
            raise
        common.note(f"LoRA: already trained ({lora_file})")
    pipe.load_lora(str(lora_file))
    results["word_after"], results["word_after_called"], after_images = judge_word(pipe, judge, args, target,
                                                                                   args.seed + 2)
    results["classes_after"], per_class_after, _ = judge_classes(pipe, judge, args, args.seed + 1)
    results["per_class_after"] = [float(a) for a in per_class_after]
    timings["lora"] = time.perf_counter() - t0
    common.note(f"'{word_prompt(args)}' judged {args.new_class}: {results['word_before']:.4f} before the LoRA, "
                f"{results['word_after']:.4f} after; class prompts {results['classes']:.4f} -> "
                f"{results['classes_after']:.4f}")

    timings["total"] = time.perf_counter() - t_start
    results.update(seconds=timings, unet_steps=int(result.state.step), params={"unet": n_unet, "text": n_text},
                   gpu=gpu)
    write_outputs(args, out, results, class_images, before_images, after_images)
    print(f"done: {timings['total']:.0f}s on {results['device']}; class accuracy {results['classes']:.4f}, "
          f"'{word_prompt(args)}' {results['word_before']:.4f} -> {results['word_after']:.4f}; outputs in {out}")


def write_caption_folder(folder, images, caption: str) -> None:
    """An ImageFolder: PNGs and metadata.jsonl naming each with its caption. Files that already hold what
    they would get are left alone: the fine-tune's --resume checks the folder's modification times."""
    from PIL import Image

    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        path = folder / f"{i:03d}.png"
        if not (path.exists() and np.array_equal(np.asarray(Image.open(path).convert("RGB")), img)):
            write_png(path, img)
        rows.append(json.dumps({"file_name": path.name, "text": caption}))
    meta, text = folder / "metadata.jsonl", "\n".join(rows) + "\n"
    if not (meta.exists() and meta.read_text() == text):
        meta.write_text(text)


def write_outputs(args, out, r, class_images, before, after) -> None:
    cols = min(8, args.per_class)
    rows = [class_images.reshape(10, args.per_class, *class_images.shape[1:])[:, :cols],
            before[None, :cols], after[None, :cols]]
    common.save_grid(out / "prompts.png", np.concatenate(rows).reshape(-1, *class_images.shape[1:]), 12, cols)
    names = [n for n, _ in captions.CLASS_NAMES[DATASET]]
    s = r["seconds"]
    lines = [
        f"Device: {r['device']}. Wall: {s['total']:.0f} s in all (autoencoder {s['autoencoder']:.0f} s, U-Net + "
        f"text encoder {s['unet']:.0f} s, judging {s['judge']:.0f} s, LoRA and its judging {s['lora']:.0f} s; "
        f"compilation included).",
        f"Sampling: DPM-Solver++ {args.sample_steps} steps, guidance {args.gamma:g}, {args.per_class} samples per "
        f"prompt. Judge: {r['judge_real']:.4f} on real test images, {r['judge_recon']:.4f} on their "
        f"autoencoder reconstructions (the ceiling); autoencoder MSE {r['ae_mse']:.4f}.", "",
        "| prompt | judged as | accuracy |", "| --- | --- | --- |",
        f"| `{EVAL_TEMPLATE}`, every class | its class | **{r['classes']:.4f}** |",
        *[f"| `{EVAL_TEMPLATE.format(name=n)}` | {n} | {a:.2f} |" for n, a in zip(names, r["per_class"], strict=True)],
        f"| `{word_prompt(args)}`, before the LoRA | {args.new_class} | **{r['word_before']:.4f}** |",
        f"| `{word_prompt(args)}`, after the LoRA | {args.new_class} | **{r['word_after']:.4f}** |",
        f"| `{EVAL_TEMPLATE}`, every class, after the LoRA | its class | {r['classes_after']:.4f} |", "",
        f"What the judge called the `{word_prompt(args)}` samples (counts per class, {', '.join(names)}): before "
        f"{r['word_before_called']}, after {r['word_after_called']}.",
    ]
    if trainer.is_writer():
        (out / "results.md").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
