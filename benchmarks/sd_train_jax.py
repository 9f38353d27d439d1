"""jaxdiff's side of benchmarks/sd_train_speed: the step trainer.fit runs for Stable Diffusion, timed.

The step is ``train.make_train_step`` over ``sd_train.sd_loss`` (EMA of the trained weights included, as
trainer.fit keeps one), jitted with its state donated; for LoRA the loss runs ``lora.apply_with`` over the
frozen base U-Net, which enters the step as an argument.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.sd_speed import SD15_SCHEDULER, configs, random_params


def model_flops(make_step, state, batch, base) -> float | None:
    """XLA's count of the step's floating-point operations, from its unoptimised HLO lowered for the CPU
    with abstract shapes: the compiled GPU program hides convolutions and attention in cuDNN calls it does
    not count. Call it with a step of XLA attention and no rematerialisation: model FLOPs, not recomputed."""
    import jax

    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    try:
        lowered = jax.jit(make_step).trace(*map(abstract, (state, batch, base))).lower(lowering_platforms=("cpu",))
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops")) or None
    except Exception:  # an older jax without trace/lowering_platforms
        return None


def measure(args, mode: str, ckpt: bool, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdiff import lora, sd_train, specs, train
    from jaxdiff.pretrained.scheduler import schedule_from_config

    cpu = jax.default_backend() == "cpu"
    cfg = configs(args.tiny)["unet"]
    spec = specs.StableDiffusionUNet.from_config(cfg)
    dtype = jnp.float32 if cpu else jnp.bfloat16
    params = random_params(spec.template(), 0, np.float32)
    side = cfg.get("sample_size", 8) if args.tiny else args.size // 8
    channels = cfg.get("in_channels", 4)
    ctx_dim = cfg.get("cross_attention_dim", 768)
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    schedule = schedule_from_config(dict(SD15_SCHEDULER))
    empty = np.zeros((77, ctx_dim), np.float32)

    tx = train.make_optimizer(train.OptimConfig(learning_rate=1e-5, warmup_steps=1, weight_decay=1e-2))

    def loss_over(base, module):
        apply = sd_train.unet_apply(module)
        if mode == "lora":
            apply = lora.apply_with(apply, base, adapters)
        return sd_train.sd_loss(apply, schedule, "epsilon", empty_context=empty, p_uncond=0.1)

    if mode == "lora":  # the frozen base enters the step as an argument, not as constants of its program
        adapters = lora.init({"unet": params}, rank=args.lora_rank, alpha=args.lora_rank, key=jax.random.key(1))
        trained, base = adapters.weights, jax.device_put(params)
    else:
        trained, base = params, None
    def make_step(module):
        return lambda state, batch, base: train.make_train_step(loss_over(base, module), tx, 0.9999)(state, batch)

    step = jax.jit(make_step(spec.module(dtype, None if cpu else "cudnn", remat=ckpt)), donate_argnums=0)
    state = train.init_state(trained, tx, 0)
    rng = np.random.default_rng(0)
    batch_data = (jnp.asarray(rng.standard_normal((batch, side, side, channels), np.float32)),
                  jnp.asarray(rng.standard_normal((batch, 77, ctx_dim), np.float32)))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_data, base).compile()
    state, metrics = compiled(state, batch_data, base)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    for _ in range(args.steps - 1):
        state, metrics = compiled(state, batch_data, base)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch_data, base)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times)) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    out = dict(first=first, seconds=seconds, peak=float(stats.get("peak_bytes_in_use", float("nan"))),
               loss=float(metrics["loss"]))
    flops = model_flops(make_step(spec.module(dtype)), state, batch_data, base)
    if flops and args.peak_bf16:
        out["mfu"] = flops / seconds / (args.peak_bf16 * 1e12)
    if flops:
        out["flops_per_image"] = flops / batch
    return out
