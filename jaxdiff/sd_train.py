"""Stable Diffusion's training loss, for ``jaxdiff.trainer.fit``: the U-Net learns eps (or v) of VAE latents
noised under the checkpoint's own schedule, conditioned on CLIP text states. The autoencoder and CLIP are
frozen, so their outputs are cached: a batch is (latents already scaled by the VAE's ``scaling_factor``,
text states)::

    sd = stable_diffusion.load("sd-folder")                               # or built from component configs
    loss = sd_train.sd_loss(sd_train.unet_apply(sd.unet), sd.schedule, sd.prediction,
                            empty_context=sd_train.empty_prompt_states(sd), snr_gamma=5.0)
    result = trainer.fit(sd.unet_spec, loss, batches_of_latents_and_states, config, params=sd.params["unet"])

What it computes is diffusers' ``train_text_to_image.py``: diffusers timesteps tau uniform in 0..T-1 (jaxdiff's
t = tau + 1), the target the scheduler's ``prediction_type`` names (eps, or v = sqrt(abar) eps - sqrt(1 - abar)
z0), the MSE averaged over every element, or with ``snr_gamma`` per example weighted by min(SNR, gamma) / SNR
(eps) or min(SNR, gamma) / (SNR + 1) (v) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting"); ``noise_offset`` adds offset * N(0, 1) per (example, channel) to the noise. Each caption is
replaced by the empty prompt's states with probability ``p_uncond`` so classifier-free guidance works.
Mixed precision is the module's: float32 parameters, ``dtype`` compute (``module(jnp.bfloat16)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule, add_noise, expand_to

PREDICTIONS = ("epsilon", "v_prediction")


def unet_apply(module):
    """``apply(params, z_t, tau, context) -> output`` of a Stable Diffusion U-Net module (diffusers' tau)."""
    return lambda params, z, tau, context: module.apply(params, z, tau, None, context)


def empty_prompt_states(sd, params=None) -> np.ndarray:
    """The text encoder's states (L, D) for the empty prompt "": what a dropped caption becomes."""
    params = sd.params if params is None else params
    condition = sd.condition()
    return np.asarray(condition.network(params, condition.null(1)), np.float32)[0]


def min_snr_weight(alpha_bar, gamma: float, prediction: str):
    """Per-example loss weight of min-SNR-gamma: min(snr, gamma) / snr for eps targets, / (snr + 1) for v,
    with snr = abar / (1 - abar)."""
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1.0)


def denoising_loss(apply_fn, params, schedule: Schedule, prediction: str, z0, context, t, noise, *,
                   snr_gamma: float | None = None):
    """The loss for given draws: ``t`` (B,) jaxdiff timesteps in 1..T (the U-Net reads t - 1), ``noise`` like z0
    (offset noise already added), ``context`` (B, L, D) after caption dropout. No randomness: what a parity
    test holds to PyTorch."""
    z_t = add_noise(schedule, z0, t, noise)
    out = apply_fn(params, z_t, t - 1, context).astype(jnp.float32)
    abar = schedule.alpha_bar(t)
    if prediction == "epsilon":
        target = noise
    else:
        target = expand_to(jnp.sqrt(abar), z0) * noise - expand_to(jnp.sqrt(1.0 - abar), z0) * z0
    err = (out - target) ** 2
    if snr_gamma is None:
        return jnp.mean(err)
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return jnp.mean(per_example * min_snr_weight(abar, snr_gamma, prediction))


def check_settings(prediction: str, p_uncond: float, snr_gamma, noise_offset: float) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (the scheduler's prediction_type), "
                         f"got {prediction!r}")
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    if snr_gamma is not None and not (np.isfinite(snr_gamma) and snr_gamma > 0):
        raise ValueError(f"snr_gamma must be a finite number > 0 or None, got {snr_gamma!r}")
    if not (np.isfinite(noise_offset) and noise_offset >= 0):
        raise ValueError(f"noise_offset must be a finite number >= 0, got {noise_offset!r}")


def draw(keys, shape, num_timesteps: int, p_uncond: float, noise_offset: float = 0.0):
    """Per example, from its key: (caption dropped with probability ``p_uncond``, jaxdiff's t uniform in
    1..T, noise of ``shape`` plus ``noise_offset`` * one N(0, 1) draw per channel)."""
    def one(k):
        kd, kt, kn, ko = jax.random.split(k, 4)
        offset = jax.random.normal(ko, (shape[-1],))
        return (jax.random.bernoulli(kd, p_uncond), jax.random.randint(kt, (), 1, num_timesteps + 1),
                jax.random.normal(kn, shape) + noise_offset * offset)

    return jax.vmap(one)(keys)


def sd_loss(apply_fn, schedule: Schedule, prediction: str, *, empty_context, p_uncond: float = 0.1,
            snr_gamma: float | None = None, noise_offset: float = 0.0):
    """``loss_fn(params, latents, context, key, shard)`` for ``trainer.fit``; the batch is (latents (B, h, w, C)
    scaled by the VAE's scaling_factor, text states (B, L, D)). ``apply_fn(params, z_t, tau, context)``: the
    U-Net (``unet_apply``), or a LoRA over a frozen U-Net (``jaxdiff.lora.apply_with``). Per example, from
    its key: caption dropout to ``empty_context`` (L, D) with probability ``p_uncond``, tau uniform in
    0..T-1, the noise and the offset noise's per-channel draw."""
    check_settings(prediction, p_uncond, snr_gamma, noise_offset)
    empty = jnp.asarray(empty_context, jnp.float32)
    T = schedule.num_timesteps

    def loss_fn(params, latents, context, key, shard):
        z0 = jnp.asarray(latents, jnp.float32)
        if context.shape[1:] != empty.shape:
            raise ValueError(f"text states have shape {context.shape[1:]} per example; the empty prompt's "
                             f"have {empty.shape}")
        drop, t, noise = draw(shard.keys(key, z0.shape[0]), z0.shape[1:], T, p_uncond, noise_offset)
        ctx = jnp.where(drop[:, None, None], empty[None].astype(context.dtype), context)
        return denoising_loss(apply_fn, params, schedule, prediction, z0, ctx, t, noise, snr_gamma=snr_gamma)

    return loss_fn
