"""The library's training loop: exact resume, refusals that name the setting, nothing-to-do, progress,
and EMA samples that are right after a short run."""

import io

import jax
import numpy as np
import pytest

from jaxdiff import data, specs, train, trainer
from jaxdiff.pipeline import Pipeline

SPEC = specs.LabelUNet(num_classes=2, channels=(8, 16), cond_dim=32, image_shape=(8, 8, 1))


def squares(n=64, seed=0):
    """8x8 images: class 0 a bright square top-left, class 1 bottom-right, on black."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    x = np.zeros((n, 8, 8, 1), np.uint8)
    for i, c in enumerate(y):
        x[i, 4 * c : 4 * c + 4, 4 * c : 4 * c + 4] = 255
    return x, y


def loss_fn(spec=SPEC):
    return train.diffusion_loss(spec.eps_model(spec.module()), spec.build_schedule(), p_uncond=0.1, null_label=2)


def config(**kw):
    return trainer.TrainConfig(**{**dict(steps=6, batch_size=8, warmup_steps=1, save_every=3, steps_per_dispatch=2),
                                  **kw})


def run(tmp, cfg, resume=False, meta=None, spec=SPEC, images=None, **kw):
    x, y = images or squares()
    return trainer.fit(spec, loss_fn(spec), data.Batches(x, y, cfg.batch_size, cfg.seed), cfg, directory=tmp / "ck",
                       resume=resume, meta=meta or {"p_uncond": 0.1}, loss_log=tmp / "loss.csv", progress=False, **kw)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    straight = run(tmp_path / "a", config())
    run(tmp_path / "b", config(steps=3))
    resumed = run(tmp_path / "b", config(), resume=True)
    assert resumed.start_step == 3 and int(resumed.state.step) == 6 and resumed.trained_steps == 3
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "a" / "loss.csv").read_text() == (tmp_path / "b" / "loss.csv").read_text()
    assert len((tmp_path / "a" / "loss.csv").read_text().split()) == 7


def test_a_resume_refuses_what_changes_the_runs_meaning_naming_each_setting(tmp_path):
    run(tmp_path, config(steps=3))
    cases = [(dict(cfg=config(seed=1)), "train.seed: checkpoint has 0, this run has 1"),
             (dict(cfg=config(learning_rate=3e-3)), "train.learning_rate: checkpoint has 0.001, this run has 0.003"),
             (dict(cfg=config(batch_size=16)), "train.batch_size: checkpoint has 8, this run has 16"),
             (dict(cfg=config(), meta={"p_uncond": 0.2}), "meta.p_uncond: checkpoint has 0.1, this run has 0.2"),
             (dict(cfg=config(), spec=specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=32, image_shape=(8, 8, 1))),
              r"spec.channels: checkpoint has \[8, 16\], this run has \[8, 8\]")]
    for kw, msg in cases:
        cfg = kw.pop("cfg")
        with pytest.raises(trainer.ConfigMismatch, match=msg):
            run(tmp_path, cfg, resume=True, **kw)
    # what may change between the halves: length, checkpoint cadence, steps per dispatch
    assert int(run(tmp_path, config(steps=5, save_every=5, steps_per_dispatch=1), resume=True).state.step) == 5


def test_an_existing_run_needs_resume_and_a_finished_one_has_nothing_to_do(tmp_path):
    run(tmp_path, config(steps=4))
    with pytest.raises(trainer.RunExists, match="already holds checkpoints"):
        run(tmp_path, config(steps=4))
    before = (tmp_path / "loss.csv").read_text()
    done = run(tmp_path, config(steps=2), resume=True)
    assert done.trained_steps == 0 and int(done.state.step) == 4
    assert (tmp_path / "loss.csv").read_text() == before  # nothing rewritten


@pytest.mark.parametrize("bad, msg", [(dict(steps=0), "steps must be a positive integer"),
                                      (dict(batch_size=2.5), "batch_size must be a positive integer"),
                                      (dict(learning_rate=float("nan")), "learning_rate"),
                                      (dict(ema_decay=1.0), "ema_decay"), (dict(seed=-1), "seed"),
                                      (dict(warmup_steps=-1), "warmup_steps")])
def test_config_checks(bad, msg):
    with pytest.raises(ValueError, match=msg):
        config(**bad)


def test_the_batches_must_be_the_configured_size(tmp_path):
    x, y = squares()
    with pytest.raises(ValueError, match="the batches hold 4 examples, the config says batch_size 8"):
        trainer.fit(SPEC, loss_fn(), data.Batches(x, y, 4, 0), config(), progress=False)


def test_progress_speaks_before_the_first_dispatch_and_leaves_the_compile_out_of_the_rate(monkeypatch):
    clock = iter([0.0, 100.0, 102.0, 104.0])  # start, first dispatch (compile), then 2 s per 2 steps
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = trainer.Progress("train", total=8, batch_size=10, stream=out)
    p.start(0, 1)
    assert "compiling" in out.getvalue()  # before anything has run
    p.update(2, 2, 0.5)
    assert "first 2 steps (with compile) took 100.0s" in out.getvalue()
    p.update(4, 2, 0.4)
    p.update(6, 2, 0.3)
    last = out.getvalue().strip().splitlines()[-1]
    # 4 steps in 4 s after the compile: 1 step/s, 10 img/s, 2 steps left -> 2 s (not 100+ s)
    assert "6/8" in last and "10 img/s" in last and "2s left" in last, last


def test_ema_samples_are_as_close_to_the_data_as_the_raw_parameters_after_a_short_run(tmp_path):
    """Issue 12's newcomer run in miniature: 300 steps. The sampled (EMA) parameters must give
    samples no further from the data than the trained parameters do, in the mean brightness of
    each class's square and of the background."""
    x, y = squares(256)
    cfg = trainer.TrainConfig(steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=20, steps_per_dispatch=100)
    result = trainer.fit(SPEC, loss_fn(), data.Batches(x, y, 32, 0), cfg, progress=False)

    def distance(params):
        pipe = Pipeline.for_labels(SPEC, SPEC.module(), jax.device_get(params))
        labels = np.repeat([0, 1], 64)
        imgs = pipe.sample(labels, gamma=1.0, steps=10, seed=0).reshape(128, 8, 8)
        err = 0.0
        for c in (0, 1):
            mine = imgs[labels == c]
            square = np.zeros((8, 8), bool)
            square[4 * c : 4 * c + 4, 4 * c : 4 * c + 4] = True
            err += abs(mine[:, square].mean() - 1.0) + abs(mine[:, ~square].mean() + 1.0)
        return err

    raw, ema = distance(result.state.params), distance(result.state.ema_params)
    assert raw < 1.0, raw  # the model has learned something
    assert ema <= raw + 0.1, (ema, raw)


def test_the_loss_log_rewrites_on_flush_and_a_resume_drops_rows_past_its_checkpoint(tmp_path):
    path = tmp_path / "loss.csv"
    log = trainer.LossLog(path, every_s=3600)
    log.append(1, [0.5, 0.25])
    assert path.read_text() == "step,loss\n"  # not rewritten at every dispatch
    log.flush()
    assert path.read_text() == "step,loss\n1,0.500000\n2,0.250000\n"
    resumed = trainer.LossLog(path, resume_step=1, every_s=0)
    assert path.read_text() == "step,loss\n1,0.500000\n"
    resumed.append(2, [0.125])
    assert path.read_text() == "step,loss\n1,0.500000\n2,0.125000\n" and not (tmp_path / "loss.csv.tmp").exists()
