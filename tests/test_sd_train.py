"""Stable Diffusion's training loss against diffusers and PyTorch autograd (tests/fixtures/make_sd_train_fixtures.py):
one step's loss and gradients on the tiny pipelines, epsilon (sd1pipe) and v-prediction (sd2pipe), plain, with
min-SNR-gamma and offset noise, and with a LoRA on the frozen U-Net; then what the loss draws at random."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff import lora, sd_train, trainer
from jaxdiff.pretrained import stable_diffusion
from jaxdiff.pretrained.keys import flax_path, to_flax
from jaxdiff.schedules import scaled_linear
from jaxdiff.train import Shard

HERE = os.path.join(os.path.dirname(__file__), "fixtures")


def fast_compile(fn, *args):
    """``fn(*args)`` compiled at XLA's -O0 (about half the compile time on the CPU; nothing here is timed)."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


@pytest.mark.parametrize("name", ["sd1pipe", "sd2pipe"])
def test_one_step_equals_diffusers_under_torch_autograd(name):
    sd = stable_diffusion.load(os.path.join(HERE, f"sd_tiny_{name}"))
    assert sd.prediction == {"sd1pipe": "epsilon", "sd2pipe": "v_prediction"}[name]
    ref = np.load(os.path.join(HERE, "sd_train", name, "step.npz"))
    adapter = lora.load(os.path.join(HERE, "sd_train", name, "lora", "pytorch_lora_weights.safetensors"), sd.params)
    ctx = np.where(ref["drop"][:, None, None], ref["empty"][None], ref["context"])
    t = ref["tau"].astype(np.int32) + 1  # diffusers' tau -> jaxdiff's t
    noise, offset_noise = ref["noise"], ref["noise"] + 0.1 * ref["offset"][:, None, None, :]
    apply = sd_train.unet_apply(sd.unet)
    with_lora = lora.apply_with(apply, sd.params["unet"], adapter)

    def losses_and_grads(unet_params, lora_weights):
        def loss(fn, p, n, **kw):
            return sd_train.denoising_loss(fn, p, sd.schedule, sd.prediction, ref["z0"], ctx, t, n, **kw)

        # min-SNR weights are constants per example: with the plain case's gradients and the weighted loss
        # equal to torch's, the weighted gradients are too, so that case is checked by its loss alone
        return {"full": jax.value_and_grad(lambda p: loss(apply, p, noise))(unet_params),
                "full_snr": (loss(apply, unet_params, offset_noise, snr_gamma=5.0), None),
                "lora": jax.value_and_grad(lambda w: loss(with_lora, w, noise))(lora_weights)}

    got = fast_compile(losses_and_grads, sd.params["unet"], adapter.weights)
    for case in ("full", "full_snr", "lora"):
        loss, grads = got[case]
        np.testing.assert_allclose(float(loss), float(ref[f"{case}/loss"]), rtol=2e-6, err_msg=case)
        if grads is None:
            continue
        keys = [k for k in ref.files if k.startswith(f"{case}/grad/")]
        assert len(keys) >= 6
        for k in keys:
            torch_key = k.split("/", 2)[2]
            if case == "lora":  # <module>.lora_A.weight (r, in) is A transposed; lora_B (out, r) is B transposed
                module, part = torch_key.rsplit(".", 2)[0], torch_key.rsplit(".", 2)[1]
                g = _leaf(grads["unet"], flax_path(module + ".weight")[:-1] + ({"lora_A": "A", "lora_B": "B"}[part],))
                want = ref[k].T
            else:
                path = flax_path(torch_key, grads["params"])
                g = _leaf(grads["params"], path)
                want = to_flax(path, ref[k], g.shape)
            scale = np.abs(want).max()
            assert scale > 0, k
            np.testing.assert_allclose(g, want, rtol=0, atol=2e-5 * scale, err_msg=f"{name} {k}")


def _fake_unet(params, z, tau, context):
    return jnp.zeros_like(z)


def test_the_draws_caption_dropout_timesteps_and_offset_noise():
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(4000))
    drop, t, noise = jax.jit(sd_train.draw, static_argnums=(1, 2, 3, 4))(keys, (4, 4, 3), 1000, 0.1, 0.5)
    drop, t, noise = np.asarray(drop), np.asarray(t), np.asarray(noise, np.float64)
    assert abs(drop.mean() - 0.1) < 0.02  # binomial sd 0.005
    assert t.min() >= 1 and t.max() <= 1000 and t.min() < 10 and t.max() > 990  # diffusers' tau 0..T-1, plus one
    # offset noise: one N(0, 0.5^2) draw per (example, channel) shared by its pixels: the per-channel means over
    # 16 pixels have variance 1/16 + 0.25; within a channel the pixels vary as N(0, 1)
    means = noise.mean(axis=(1, 2))
    assert abs(means.var() - (1 / 16 + 0.25)) < 0.03
    assert abs((noise - means[:, None, None]).var() * 16 / 15 - 1.0) < 0.03
    _, _, plain = sd_train.draw(keys[:500], (4, 4, 3), 1000, 0.1, 0.0)
    assert abs(np.asarray(plain).mean(axis=(1, 2)).var() - 1 / 16) < 0.02


def _fake_unet(params, z, tau, context):
    return jnp.zeros_like(z)


def test_the_loss_replaces_dropped_captions_by_the_empty_prompt():
    """A U-Net that returns its context's first value: the eps loss then tells how many examples saw the empty
    prompt."""
    sched = scaled_linear(1000)
    echo = lambda p, z, tau, c: jnp.broadcast_to(c[:, :1, :1, None].reshape(-1, 1, 1, 1), z.shape)
    z = jnp.zeros((512, 8, 8, 1))
    ctx = jnp.ones((512, 2, 3))
    # the empty prompt's states are 0 and the captions' 3: the loss is E[(0 - eps)^2] = 1 or E[(3 - eps)^2] = 10
    empty0 = np.zeros((2, 3), np.float32)
    for p_uncond, want in ((0.0, 10.0), (1.0, 1.0), (0.5, 5.5)):
        loss = sd_train.sd_loss(echo, sched, "epsilon", empty_context=empty0, p_uncond=p_uncond)
        got = float(jax.jit(lambda k, loss=loss: loss(None, z, 3 * ctx, k, Shard()))(jax.random.key(3)))
        assert abs(got - want) < 0.1 * want, (p_uncond, got)


def test_min_snr_weight_closed_form():
    abar = jnp.array([0.999, 0.5, 0.01])
    snr = np.array([999.0, 1.0, 1.0 / 99.0])
    np.testing.assert_allclose(sd_train.min_snr_weight(abar, 5.0, "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-4)
    np.testing.assert_allclose(sd_train.min_snr_weight(abar, 5.0, "v_prediction"), np.minimum(snr, 5) / (snr + 1),
                               rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prediction="sample"), "prediction must be one of"),
    (dict(p_uncond=1.5), "p_uncond must be in"),
    (dict(snr_gamma=0.0), "snr_gamma must be"),
    (dict(noise_offset=float("nan")), "noise_offset must be"),
])
def test_bad_settings_are_one_line(kwargs, message):
    args = dict(prediction="epsilon", empty_context=np.zeros((2, 3)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sd_train.sd_loss(_fake_unet, scaled_linear(10), args.pop("prediction"), **args)


class _TinyAttention(nn.Module):
    """Two projections named as a U-Net's attention names them, so a LoRA's targets find them."""

    @nn.compact
    def __call__(self, z, tau, y, context):
        h = nn.Dense(4, name="to_q")(z) + nn.Dense(4, name="to_k")(context.mean(axis=1))[:, None, None, :]
        return nn.Dense(z.shape[-1], name="to_out_0")(h) + 0.0 * tau[:, None, None, None]


def test_a_lora_trains_on_the_one_trainer_and_only_the_lora_moves():
    net = _TinyAttention()
    base = net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), None, jnp.zeros((1, 3, 5)))
    adapter = lora.init({"unet": base}, rank=2, alpha=4, key=jax.random.key(1))
    assert sorted(adapter.alphas["unet"]) == ["to_k", "to_out.0", "to_q"]
    apply = lora.apply_with(sd_train.unet_apply(net), base, adapter)
    loss_fn = sd_train.sd_loss(apply, scaled_linear(1000), "v_prediction", empty_context=np.zeros((3, 5)),
                               snr_gamma=5.0)

    class Batches:
        batch_size = 4

        def stack(self, start, count):
            rng = np.random.default_rng(start)
            return (rng.standard_normal((count, 4, 4, 4, 4)).astype(np.float32),
                    rng.standard_normal((count, 4, 3, 5)).astype(np.float32))

    config = trainer.TrainConfig(steps=3, batch_size=4, learning_rate=1e-2, warmup_steps=0, steps_per_dispatch=3)
    result = trainer.fit(None, loss_fn, Batches(), config, params=adapter.weights, progress=False)
    trained = adapter.replace(result.state.params)
    for name, (a, b) in trained.modules()["unet"].items():
        assert np.abs(np.asarray(b)).max() > 0, name  # B starts at zero: the LoRA learned
        assert not np.allclose(a, adapter.modules()["unet"][name][0]), name
    # the base is untouched, and the merged network is the base plus (alpha / r) A B
    merged = lora.merge({"unet": base}, trained)["unet"]["params"]["to_q"]["kernel"]
    a, b = trained.modules()["unet"]["to_q"]
    np.testing.assert_allclose(merged, base["params"]["to_q"]["kernel"] + 2.0 * np.asarray(a) @ np.asarray(b),
                               rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_changes_memory_not_numbers():
    sd = stable_diffusion.load(os.path.join(HERE, "sd_tiny_sd1pipe"))
    remat = sd.unet_spec.module(remat=True)
    rng = np.random.default_rng(0)
    z, ctx = rng.standard_normal((1, 8, 8, 4)).astype(np.float32), rng.standard_normal((1, 6, 32)).astype(np.float32)
    tau = np.array([500])
    loss = lambda m: lambda p: jax.numpy.sum(m.apply(p, z, tau, None, ctx) ** 2)
    def count(fn, name):
        return sum(e.primitive.name == name for e in jax.make_jaxpr(fn)(sd.params["unet"]).jaxpr.eqns)

    # each of the 2 down, the mid and the 2 up blocks is a checkpoint: its forward recomputed in the backward pass
    assert count(loss(remat), "remat2") == 5 and count(loss(sd.unet), "remat2") == 0
    same = jax.jit(lambda p: (remat.apply(p, z, tau, None, ctx), sd.unet.apply(p, z, tau, None, ctx)))
    a, b = same(sd.params["unet"])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_adamw_and_gradient_accumulation():
    from jaxdiff.train import OptimConfig, make_optimizer

    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    zero = {"w": jnp.zeros(3)}

    def run(tx, grads):
        state, params = tx.init(p), p
        for g in grads:
            upd, state = tx.update(g, state, params)
            params = jax.tree.map(lambda a, b: a + b, params, upd)
        return params["w"] - p["w"]

    # (the schedule's rate is 0 at the first update, even without warmup: each run starts with a zero one)
    # AdamW: a zero gradient leaves Adam's step at zero; the decoupled decay takes lr * wd * p
    tx = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5))
    np.testing.assert_allclose(run(tx, [zero, zero]), -0.1 * 0.5 * np.array([1.0, -2.0, 3.0]), rtol=1e-6)
    # accumulation over 3 steps: the update of the mean gradient, clipped as a whole
    grads = [{"w": jnp.array(g)} for g in ([3.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, -9.0])]
    cfg = dict(learning_rate=0.1, warmup_steps=0, grad_clip=1.0)
    acc, one = make_optimizer(OptimConfig(**cfg, grad_accum=3)), make_optimizer(OptimConfig(**cfg))
    got = run(acc, [zero] * 3 + grads)
    np.testing.assert_allclose(got, run(one, [zero, {"w": jnp.array([1.0, 2.0, -3.0])}]), rtol=1e-6)
    assert np.all(np.asarray(got) != 0)
    np.testing.assert_array_equal(run(acc, [zero] * 3 + grads[:2]), np.zeros(3))  # not applied before the third
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        trainer.TrainConfig(steps=1, batch_size=1, grad_accum=0)
    with pytest.raises(ValueError, match="weight_decay must be"):
        trainer.TrainConfig(steps=1, batch_size=1, weight_decay=-1.0)
    # a checkpoint written before these settings existed still agrees with a config that leaves them alone
    assert "grad_accum" not in trainer.TrainConfig(steps=1, batch_size=1).meaning()
    assert trainer.TrainConfig(steps=1, batch_size=1, grad_accum=4).meaning()["grad_accum"] == 4
