"""Model specs: a JSON round trip for every kind, one registry, and a non-default schedule that comes
back from a checkpoint as it went in."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff import data, host, schedules, specs, train, trainer
from jaxdiff.pipeline import Pipeline

SD_PIPE = Path(__file__).parent / "fixtures" / "sd_tiny_sd1pipe"


def every_spec():
    cosine = schedules.ScheduleSpec("cosine", 400, s=0.01, max_beta=0.99)
    return [specs.LabelUNet(num_classes=3, channels=(8, 16), attention_levels=(1,), schedule=cosine),
            specs.SuperRes(channels=(8, 16)),
            specs.LatentUNet(channels=(8, 16), latent_shape=(8, 8, 4), latent_scale=0.7),
            specs.NoisyClassifier(channels=(8, 16)), specs.EvalClassifier(channels=(8, 16)),
            specs.Autoencoder(channels=(8, 8, 8)), specs.ContrastiveText(vocab=("a", "b"), width=16),
            *(cls.from_config(json.loads((SD_PIPE / part / "config.json").read_text()))
              for cls, part in [(specs.StableDiffusionUNet, "unet"), (specs.StableDiffusionAutoencoder, "vae"),
                                (specs.CLIPText, "text_encoder")]),
            specs.CLIPTextWithProjection.from_config(json.loads(
                (SD_PIPE.parent / "sdxl_tiny_base" / "text_encoder_2" / "config.json").read_text()))]


@pytest.mark.parametrize("spec", every_spec(), ids=lambda s: s.kind)
def test_every_kind_round_trips_through_json_and_builds(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["kind"] == spec.kind and specs.from_dict(d) == spec
    template = spec.template()  # shapes only
    if isinstance(spec, specs.Pretrained):
        return  # initialised from checkpoints, and the loader checks every tensor against this template
    params = spec.init(0)
    assert jax.tree.structure(template) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(params), strict=True))


def test_the_registry_holds_every_kind_once():
    assert sorted(specs.REGISTRY) == sorted(s.kind for s in every_spec())


def test_the_default_main_job_model_keeps_its_size():
    assert specs.LabelUNet().num_params() == 2_372_673  # what benchmarks/torch_twin.py mirrors


@pytest.mark.parametrize("bad, msg", [({"kind": "gan"}, "not a model spec: kind 'gan'"), ([1], "not a model spec"),
                                      ({"kind": "label_unet", "width": 3}, r"unknown settings \['width'\]"),
                                      ({"kind": "label_unet", "schedule": {"kind": "sigmoid", "num_timesteps": 3}},
                                       "schedule")])
def test_bad_dicts_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        specs.from_dict(bad)


def test_a_cosine_checkpoint_loads_back_with_its_cosine_schedule(tmp_path):
    spec = specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=16, image_shape=(8, 8, 1),
                           schedule=schedules.ScheduleSpec("cosine", 200, s=0.02, max_beta=0.99))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 16).astype(np.int32)
    loss = train.diffusion_loss(spec.eps_model(spec.module()), spec.build_schedule(), p_uncond=0.1, null_label=2)
    cfg = trainer.TrainConfig(steps=2, batch_size=8, steps_per_dispatch=2, warmup_steps=1)
    trainer.fit(spec, loss, data.Batches(x, y, 8, 0), cfg, directory=tmp_path / "checkpoints", progress=False)
    pipe = Pipeline.from_checkpoint(tmp_path)
    expected = schedules.cosine(200, 0.02, 0.99)
    assert pipe.schedule.spec == expected.spec and pipe.schedule.num_timesteps == 200
    np.testing.assert_array_equal(pipe.schedule.alpha_bars, expected.alpha_bars)
    assert pipe([0, 1], steps=3).shape == (2, 8, 8, 1)


def test_on_an_accelerator_the_init_runs_once_on_the_host_and_gives_the_cpu_paths_parameters(monkeypatch):
    """Where the default backend is an accelerator (simulated: jax.default_backend says "gpu"), spec.init runs as
    one program on the host's CPU (its key sent there) and hands back uncommitted arrays on the default device,
    equal to the CPU path's; under a trace (spec.template's eval_shape) it stays a trace; a network over
    HOST_LIMIT values is drawn where it will run (nothing sent to the host)."""
    spec = specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=16, image_shape=(8, 8, 1))
    on_cpu = spec.init(3)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    sent, put = [], jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: (sent.append(a or k), put(x, *a, **k))[1])

    def check(params, count):
        assert len(sent) == count and jax.tree.structure(params) == jax.tree.structure(on_cpu)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(on_cpu), strict=True):
            assert isinstance(a, jax.Array) and not a.committed
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)  # -O0 vs -O3: ulps

    check(spec.init(3), 1)
    assert sent[0] == (host.cpu(),)
    shapes = jax.eval_shape(lambda: spec.init(0))
    assert [s.shape for s in jax.tree.leaves(shapes)] == [a.shape for a in jax.tree.leaves(on_cpu)]
    monkeypatch.setattr(host, "HOST_LIMIT", 100)
    check(spec.init(3), 1)
