"""Stable Diffusion's networks equal PyTorch's: tiny random-weight diffusers / transformers models
(tests/fixtures/sd_tiny_*, made by make_sd_fixtures.py) loaded into jaxdiff's modules give the saved
outputs; the textbook U-Net preset equals the network it replaced; configs we cannot compute are refused;
the real SD-1.5 / SD-2.1 configs give the real parameter counts.

Tolerance: max |ours - torch| <= 1e-5 * max |torch| for every output, float32. Measured: U-Net 6e-7 to
6.5e-6, VAE <= 1.4e-6, CLIP <= 3.2e-7. The U-Net's floor is its time embedding: sin(t * f) at t near 1000
in float32 moves by ~1e-4 when torch's and XLA's exp() round a frequency f one ulp apart (computing f in
float64 moves the errors around, 1.5e-6 to 6e-6, without removing them).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from jaxdiff.nets import layers
from jaxdiff.nets.layers import ShiftedGroupNorm, attention, nearest_resize, sinusoidal_embedding
from jaxdiff.nets.unet import textbook_params_from_legacy, textbook_unet
from jaxdiff.pretrained.configs import autoencoder_from_config, clip_text_from_config, unet_from_config
from jaxdiff.pretrained.weights import load_params

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
RTOL = 1e-5


def tiny(name):
    return os.path.join(FIXTURES, f"sd_tiny_{name}")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def close(ours, torch_out, rtol=RTOL):
    ours, torch_out = np.asarray(ours, np.float64), np.asarray(torch_out, np.float64)
    assert ours.shape == torch_out.shape
    err = np.abs(ours - torch_out).max() / np.abs(torch_out).max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def load(model, folder, file, *example):
    """The checked loader (every tensor accounted for) into a template that allocates nothing."""
    template = jax.eval_shape(model.init, jax.random.key(0), *example)
    return load_params(template, os.path.join(folder, file))


def unet_case(name, k):
    ref = np.load(os.path.join(tiny(name), "reference.npz"))
    get = lambda key: ref[f"unet{k}/{key}"] if f"unet{k}/{key}" in ref.files else None
    return ref, (get("x"), get("t"), get("y"), get("context"), get("context_mask"))


# ---- parity with PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, k", [("sd1", 0), ("sd1", 1), ("sd2", 0), ("wide", 0)])
def test_unet_equals_diffusers(name, k):
    ref, args = unet_case(name, k)
    model = unet_from_config(read_json(os.path.join(tiny(name), "unet", "config.json")))
    params = load(model, os.path.join(tiny(name), "unet"), "diffusion_pytorch_model.safetensors", *args)
    eps = jax.jit(model.apply)(params, *args)
    assert eps.dtype == jnp.float32
    close(eps, ref[f"unet{k}/eps"])


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_autoencoder_equals_diffusers(name):
    ref = np.load(os.path.join(tiny(name), "reference.npz"))
    vae = autoencoder_from_config(read_json(os.path.join(tiny(name), "vae", "config.json")))
    params = load(vae, os.path.join(tiny(name), "vae"), "diffusion_pytorch_model.safetensors", ref["vae/x"])
    mean, logvar = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode))(params, ref["vae/x"])
    close(mean, ref["vae/mean"])
    close(logvar, ref["vae/logvar"])
    close(jax.jit(lambda p, z: vae.apply(p, z, method=vae.decode))(params, ref["vae/z"]), ref["vae/decoded"])


@pytest.mark.parametrize("name", ["sd1", "sd2", "wide"])
def test_clip_text_equals_transformers(name):
    ref = np.load(os.path.join(tiny(name), "reference.npz"))
    clip = clip_text_from_config(read_json(os.path.join(tiny(name), "text_encoder", "config.json")))
    ids = ref["text/ids"]
    params = load(clip, os.path.join(tiny(name), "text_encoder"), "model.safetensors", ids)
    run = jax.jit(clip.apply, static_argnums=3)
    out = run(params, ids, None, True)
    close(out.last_hidden_state, ref["text/last_hidden_state"])
    close(out.pooler_output, ref["text/pooler_output"])
    close(np.stack(out.hidden_states), ref["text/hidden_states"])  # embeddings + every layer, for clip-skip
    masked = run(params, ids, ref["text/attention_mask"], False)
    close(masked.last_hidden_state, ref["text/masked_last_hidden_state"])
    close(masked.pooler_output, ref["text/masked_pooler_output"])
    # the padding mask changes the padded positions only where the text is shorter than the sequence
    assert not np.allclose(masked.last_hidden_state[0], out.last_hidden_state[0])


def test_fixtures_record_their_versions():
    for name in ("sd1", "sd2", "wide"):
        versions = read_json(os.path.join(tiny(name), "versions.json"))
        assert {"torch", "diffusers", "transformers", "safetensors"} <= set(versions)


# ---- the textbook network as a configuration of the same U-Net ------------------------------------------


@pytest.mark.parametrize("name", ["attn", "plain"])
def test_textbook_preset_equals_the_network_it_replaced(name):
    """Outputs saved from the U-Net of commit 7a6669d (make_textbook_unet_fixture.py), its parameters renamed."""
    ref = np.load(os.path.join(FIXTURES, "textbook_unet_legacy.npz"))
    cfg = json.loads(str(ref["configs"]))[name]
    model = textbook_unet(**cfg)
    prefix = f"{name}/params/params/"
    legacy = unflatten_dict({tuple(k[len(prefix):].split("/")): ref[k] for k in ref.files if k.startswith(prefix)})
    params = textbook_params_from_legacy(legacy, model)
    args = [ref[f"{name}/x"], ref[f"{name}/t"], ref[f"{name}/y"]]
    if f"{name}/context" in ref.files:
        args += [ref[f"{name}/context"], ref[f"{name}/context_mask"]]
    fresh = jax.eval_shape(model.init, jax.random.key(0), *args)
    assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(lambda a: a.shape, params)
    out = jax.jit(model.apply)(params, *args)
    # the same ops in the same order: bit-equal without attention; flax's MultiHeadDotProductAttention
    # became the one attention function, which rounds differently (6e-8)
    np.testing.assert_allclose(out, ref[f"{name}/out"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="legacy parameters"):
        textbook_params_from_legacy(legacy, textbook_unet(**{**cfg, "blocks_per_level": 3}))


def test_textbook_default_size_is_unchanged():
    """benchmarks/torch_twin.py mirrors this network: 2,372,673 parameters on 1-channel 28x28 images."""
    model = textbook_unet()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.ones((1,), jnp.int32),
                            jnp.zeros((1,), jnp.int32))
    assert sum(a.size for a in jax.tree.leaves(shapes)) == 2_372_673
    tree = shapes["params"]
    assert {"time_embedding", "class_embedding", "conv_in", "down_blocks_0", "up_blocks_1", "conv_out"} <= set(tree)


# ---- the real configs ------------------------------------------------------------------------------------


REAL = read_json(os.path.join(FIXTURES, "sd_real_configs.json"))


@pytest.mark.parametrize("version", ["sd15", "sd21"])
def test_real_configs_give_the_real_parameter_counts(version):
    """Shapes only (jax.eval_shape): nothing of the 1.3 billion parameters is allocated."""
    cfg, counts = REAL[version], REAL[version]["parameter_counts"]
    count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
    unet = unet_from_config(cfg["unet"])
    ctx = jnp.zeros((1, 77, cfg["unet"]["cross_attention_dim"]))
    shapes = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.ones((1,), jnp.int32), None,
                            ctx)
    assert count(shapes) == counts["unet"]
    # SD-1's 8 heads are 40..160 wide; SD-2's [5, 10, 20, 20] heads are 64 wide
    q = shapes["params"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert q.shape == (320, 320)
    vae = autoencoder_from_config(cfg["vae"])
    assert count(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))) == counts["vae"]
    text = clip_text_from_config(cfg["text_encoder"])
    assert count(jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))) == \
        counts["text_encoder"]


def test_heads_follow_diffusers_naming():
    """attention_head_dim is the number of heads (SD-1: 8 heads of 40 at 320 channels; SD-2: 5 heads of 64)."""
    assert unet_from_config(REAL["sd15"]["unet"]).num_heads == (8, 8, 8, 8)
    assert unet_from_config(REAL["sd21"]["unet"]).num_heads == (5, 10, 20, 20)


# ---- configs we do not compute are refused ---------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "image"), ("addition_time_embed_dim", 256), ("class_embed_type", "timestep"),
    ("time_cond_proj_dim", 256),
    ("dual_cross_attention", True), ("resnet_time_scale_shift", "scale_shift"), ("act_fn", "gelu"),
    ("only_cross_attention", [True, False, False, False]), ("encoder_hid_dim", 768), ("num_attention_heads", 8),
    ("time_embedding_type", "fourier"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("transformer_layers_per_block", [[1, 2], 1, 1, 1]), ("attention_type", "gated"), ("some_new_key", 1),
])
def test_unet_config_refuses_what_it_cannot_compute(key, value):
    with pytest.raises(ValueError, match=key):
        unet_from_config({**REAL["sd15"]["unet"], key: value})


@pytest.mark.parametrize("component, key, value", [
    ("vae", "act_fn", "relu"), ("vae", "down_block_types", ["DownEncoderBlock2D"] * 3),
    ("vae", "up_block_types", ["AttnUpDecoderBlock2D"] * 4), ("vae", "norm_type", "spatial"),
    ("text_encoder", "hidden_act", "gelu_new"), ("text_encoder", "model_type", "clip"),
    ("text_encoder", "pruned_heads", {"0": [1]}), ("text_encoder", "text_config", {}),
])
def test_vae_and_clip_configs_refuse_what_they_cannot_compute(component, key, value):
    build = autoencoder_from_config if component == "vae" else clip_text_from_config
    with pytest.raises(ValueError, match=key) as err:
        build({**REAL["sd15"][component], key: value})
    assert repr(value)[:20] in str(err.value)


def test_ignored_keys_do_not_change_the_network():
    cfg = REAL["sd15"]["unet"]
    noisy = {**cfg, "sample_size": 96, "dropout": 0.1, "_use_default_values": ["x"], "resnet_skip_time_act": True}
    assert unet_from_config(noisy) == unet_from_config(cfg)


# ---- dtype and layout ------------------------------------------------------------------------------------


def test_bf16_compute_with_float32_parameters():
    """Parameters stay float32 as loaded; convolutions and matmuls run in bf16; eps comes out float32
    and close to the float32 network's."""
    ref, args = unet_case("sd2", 0)
    cfg = read_json(os.path.join(tiny("sd2"), "unet", "config.json"))
    params = load(unet_from_config(cfg), os.path.join(tiny("sd2"), "unet"), "diffusion_pytorch_model.safetensors",
                  *args)
    model = unet_from_config(cfg, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(model.apply)(params, *args)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    # every conv but the last (eps, deliberately float32) computes in bf16
    assert len(convs) > 10 and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs[:-1])
    assert convs[-1].invars[0].aval.dtype == jnp.float32
    eps = jax.jit(model.apply)(params, *args)
    assert eps.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    close(eps, ref["unet0/eps"], rtol=5e-2)


def test_no_transposes_in_the_unet():
    """NHWC end to end: convolutions, norms and token reshapes need no transposes; only the attention
    function (jax.nn.dot_product_attention's XLA path) arranges its own operands."""
    _, args = unet_case("sd1", 0)
    model = unet_from_config(read_json(os.path.join(tiny("sd1"), "unet", "config.json")))
    params = load(model, os.path.join(tiny("sd1"), "unet"), "diffusion_pytorch_model.safetensors", *args)
    jaxpr = jax.make_jaxpr(model.apply)(params, *args).jaxpr
    transposes = [e for e in jaxpr.eqns if e.primitive.name == "transpose"]

    def in_attention(eqn):
        return any(f.function_name == "attention" and f.file_name.endswith(os.path.join("nets", "layers.py"))
                   for f in eqn.source_info.traceback.frames)

    assert transposes and all(in_attention(e) for e in transposes)


# ---- the shared blocks, against closed forms -------------------------------------------------------------


def test_sinusoidal_embedding_options():
    t = np.array([0, 1, 37, 999])
    for flip, shift in ((False, 0.0), (True, 0.0), (True, 1.0)):
        freqs = np.exp(-np.log(10_000.0) * np.arange(8) / (8 - shift))
        args = t[:, None] * freqs[None]
        halves = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
        ours = sinusoidal_embedding(jnp.asarray(t), 16, flip_sin_to_cos=flip, freq_shift=shift)
        np.testing.assert_allclose(ours, np.concatenate(halves, -1), atol=2e-4)  # float32 sin(999 f)
    assert sinusoidal_embedding(jnp.asarray(t), 7).shape == (4, 7)


def test_attention_function_against_float64():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 8)) for n in (5, 4, 4))
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)[:, None, None, :]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    ours = attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask))
    np.testing.assert_allclose(ours, want, atol=1e-5)


def _group_norm_float64(x, groups, eps, scale, bias):
    g = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = (*range(1, g.ndim - 2), g.ndim - 1)
    mean, var = g.mean(axes, keepdims=True), g.var(axes, keepdims=True)  # two passes, float64
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("offset", [0.0, 1e3])  # 1e3: mean >> std, where E[x^2] - E[x]^2 in float32 fails
def test_shifted_group_norm_against_float64(offset):
    rng = np.random.default_rng(0)
    # every (example, group) its own mean, so a shift shared across them, or taken from the wrong group, fails
    means = offset * (1 + np.arange(4)) * np.array([1, -1])[:, None]  # (B, groups)
    x = np.repeat(means, 2, axis=1)[:, None, None, :] + rng.standard_normal((2, 6, 5, 8)) * rng.uniform(0.5, 2.0, 8)
    x = x.astype(np.float32).astype(np.float64)  # the reference sees the float32 input the layer sees
    scale, bias = rng.standard_normal(8), rng.standard_normal(8)
    norm = ShiftedGroupNorm(num_groups=4, epsilon=1e-5)
    params = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    assert jax.tree.map(jnp.shape, norm.init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))) == \
        jax.tree.map(jnp.shape, params)  # flax GroupNorm's names and shapes: checkpoints load as before
    want = _group_norm_float64(x, 4, 1e-5, scale, bias)
    np.testing.assert_allclose(norm.apply(params, jnp.asarray(x, jnp.float32)), want, atol=2e-5)
    tokens = x.reshape(2, 30, 8)  # (B, L, C) inputs too
    np.testing.assert_allclose(norm.apply(params, jnp.asarray(tokens, jnp.float32)),
                               _group_norm_float64(tokens, 4, 1e-5, scale, bias), atol=2e-5)
    if offset:  # the one-pass variance without the shift loses the groups' variance to cancellation
        fast = layers.group_norm(8, jnp.float32, groups=4, eps=1e-5, fast_variance=True)
        assert np.abs(np.asarray(fast.apply(params, jnp.asarray(x, jnp.float32))) - want).max() > 1e-2


def test_shifted_group_norm_gradient_is_the_two_pass_gradient():
    rng = np.random.default_rng(1)
    x = jnp.asarray(5.0 + rng.standard_normal((2, 3, 3, 8)) * rng.uniform(0.5, 2.0, 8), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = ShiftedGroupNorm(num_groups=4, epsilon=1e-5)
    flax_two_pass = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)
    params = ours.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    grads = [jax.grad(lambda x, p, m=m: jnp.sum(m.apply(p, x) * w), (0, 1))(x, params) for m in (ours, flax_two_pass)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_odd_length_attention_takes_the_fused_forward_with_the_xla_gradient(monkeypatch):
    """Odd sequence lengths under implementation="cudnn" route to the fused-forward, XLA-gradient attention
    (cross-attention to 77 tokens on a GPU): its values and gradients must be plain attention's. Here every
    kernel asked for runs as XLA's, and which one was asked for is recorded."""
    real, asked, routed = jax.nn.dot_product_attention, [], []
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: asked.append(implementation) or real(*a, **kw))
    monkeypatch.setattr(layers, "cudnn_attention_fits", lambda q, mask=None, k=None: True)
    inner = layers._cudnn_forward_xla_gradient
    monkeypatch.setattr(layers, "_cudnn_forward_xla_gradient", lambda *a: routed.append(1) or inner(*a))
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 2, 8)), jnp.float32) for n in (6, 7, 7))
    w = jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32)
    plain = lambda q, k, v: jnp.sum(real(q, k, v) * w)
    fused = lambda q, k, v: jnp.sum(attention(q, k, v, implementation="cudnn") * w)
    np.testing.assert_allclose(fused(q, k, v), plain(q, k, v), rtol=1e-6)
    assert routed and asked == ["cudnn"], (routed, asked)
    asked.clear()
    for ours, want in zip(jax.grad(fused, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    assert asked.count("cudnn") == 1 and None in asked, asked  # the forward fused, the gradient XLA's
    routed.clear()
    asked.clear()
    attention(q[:, :6], k[:, :6], v[:, :6], implementation="cudnn")  # even lengths: the fused kernel itself
    assert not routed and asked == ["cudnn"]


def test_nearest_resize_follows_pytorch_indexing():
    x = jnp.arange(3 * 5, dtype=jnp.float32).reshape(1, 3, 5, 1)
    doubled = np.repeat(np.repeat(x[0, :, :, 0], 2, 0), 2, 1)
    np.testing.assert_array_equal(nearest_resize(x, (6, 10))[0, :, :, 0], doubled)
    # PyTorch: source index floor(i * in / out): 3 -> 5 rows takes 0, 0, 1, 1, 2
    np.testing.assert_array_equal(nearest_resize(x, (5, 5))[0, :, 0, 0], [0, 0, 5, 5, 10])
