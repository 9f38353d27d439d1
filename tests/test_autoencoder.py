import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import train
from jaxdiff.nets.autoencoder import Autoencoder, gaussian_kl


def test_shapes_28_to_4x8x8_and_back():
    ae = Autoencoder(channels=(8, 16, 16))
    x = jnp.zeros((2, 28, 28, 1))
    # shapes only: traced, not run (run op by op, XLA:CPU compiles every operation by itself)
    params = jax.eval_shape(ae.init, jax.random.key(0), x, jax.random.key(1))
    mean, logvar = jax.eval_shape(lambda p, x: ae.apply(p, x, method=Autoencoder.encode), params, x)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    assert jax.eval_shape(lambda p, z: ae.apply(p, z, method=Autoencoder.decode), params, mean).shape == (2, 28, 28, 1)


def test_gaussian_kl_against_numpy_closed_form():
    rng = np.random.default_rng(0)
    m, lv = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
    var = np.exp(lv)
    expected = 0.5 * np.sum((m**2 + var - 1 - np.log(var)).reshape(3, -1), axis=1)
    np.testing.assert_allclose(gaussian_kl(jnp.asarray(m), jnp.asarray(lv)), expected, rtol=1e-5)
    assert float(gaussian_kl(jnp.zeros((1, 4)), jnp.zeros((1, 4)))[0]) == 0.0


def test_autoencoder_learns_to_reconstruct_a_batch():
    ae = Autoencoder(channels=(8, 16, 16))
    x = np.zeros((8, 28, 28, 1), np.uint8)
    for i in range(8):  # simple shapes with structure to compress
        x[i, 4 + i : 20 + i // 2, 6:22 - i] = 255
    args = jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jax.random.key(1)
    # the initialisation runs once: compiled without XLA's backend optimisations, in a fifth of the time
    params = jax.jit(ae.init).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)
    tx = train.make_optimizer(train.OptimConfig(learning_rate=3e-3, warmup_steps=1))
    step = train.host_steps(jax.jit(train.make_train_step(train.vae_loss(ae), tx, 0.9)))  # XLA:CPU: no scan
    batches = (np.repeat(x[None], 60, 0), np.zeros((60, 8), np.int32))
    _, metrics = step(train.init_state(params, tx, 0), batches)
    loss = np.asarray(metrics["loss"])
    assert loss[-5:].mean() < 0.3 * loss[:5].mean(), loss[[0, -1]]
