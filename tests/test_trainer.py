"""The library's training loop: exact resume, refusals that name the setting, nothing-to-do, progress,
and EMA samples that are right after a short run."""

import io

import jax
import jax.numpy as jnp
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
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "a" / "loss.csv").read_text() == (tmp_path / "b" / "loss.csv").read_text()
    assert len((tmp_path / "a" / "loss.csv").read_text().split()) == 7


def test_a_resume_refuses_what_changes_the_runs_meaning_naming_each_setting(tmp_path):
    run(tmp_path, config(steps=3))
    cases = [(dict(cfg=config(seed=1)), "train.seed: checkpoint has 0, this run has 1"),
             (dict(cfg=config(learning_rate=3e-3)), "train.learning_rate: checkpoint has 0.001, this run has 0.003"),
             (dict(cfg=config(batch_size=16)), "train.batch_size: checkpoint has 8, this run has 16"),
             (dict(cfg=config(), meta={"p_uncond": 0.2}), "meta.p_uncond: checkpoint has 0.1, this run has 0.2"),
             (dict(cfg=config(), spec=specs.LabelUNet(num_classes=2, channels=(8, 8), cond_dim=32,
                                                      image_shape=(8, 8, 1))),
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
    """Issue 12's newcomer run in miniature: 300 steps. The sampled (EMA) parameters must not be stuck
    near the initialisation: their samples cover most of the way from the initial parameters' to the
    trained parameters', in the mean brightness of each class's square and of the background. (A bar
    of "EMA within 0.1 of the trained" hinged on the seed: -0.13..+0.089 over four seed offsets.)"""
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

    init = distance(SPEC.init(cfg.seed))
    raw, ema = distance(result.state.params), distance(result.state.ema_params)
    assert raw < 1.0 < init, (raw, init)  # the model has learned something
    assert ema <= raw + 0.25 * (init - raw), (ema, raw, init)


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


def tiny_loss(params, x, y, key, shard):
    """A loss without a network, so these tests compile in moments."""
    return jnp.mean((params["w"] - x.astype(jnp.float32).mean() / 255.0) ** 2)


class Source:
    """A batch source of ``squares`` that can be told to misbehave."""

    def __init__(self, short=False, transform=None, interrupt_at=None):
        x, y = squares()
        self.inner, self.batch_size = data.Batches(x, y, 8, 0), 8
        self.short, self.transform, self.interrupt_at = short, transform, interrupt_at

    def stack(self, start, count):
        if start == self.interrupt_at:
            raise KeyboardInterrupt
        x, y = self.inner.stack(start, count - 1 if self.short else count)
        return self.transform(x, y) if self.transform else (x, y)


@pytest.mark.parametrize("source, msg", [
    (Source(short=True), r"batches.stack\(0, 2\) gave 1 batches of images .* expected 2"),
    (Source(transform=lambda x, y: (x / 255.0, y)), r"images of dtype float64 \(values 0..1\); expected uint8"),
    (Source(transform=lambda x, y: (x[:, :, :4], y)), r"images of shape \(4, 8, 1\) each; the spec's image_shape is "
                                                       r"\(8, 8, 1\)"),
    (Source(transform=lambda x, y: (x, y + 2)), r"labels 2..3; the spec has classes 0..1"),
    (Source(transform=lambda x, y: (x, y.astype(np.float32))), r"labels of dtype float32"),
])
def test_what_a_batch_source_gives_is_checked_before_the_first_step(source, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        trainer.fit(SPEC, tiny_loss, source, config(), params={"w": jnp.zeros(3)}, directory=tmp_path / "ck",
                    progress=False)
    assert not list((tmp_path / "ck").iterdir())  # refused before a step was counted or saved


def test_skipped_updates_are_reported_when_they_start_and_counted_at_the_end(capsys):
    nan_loss = lambda params, x, y, key, shard: tiny_loss(params, x, y, key, shard) * jnp.nan
    result = trainer.fit(SPEC, nan_loss, Source(), config(), params={"w": jnp.zeros(3)}, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert int(result.state.skipped) == 6 and len(err) == 2, err  # one warning for 3 dispatches, then the count
    assert "2 of the 2 updates of steps 1..2 skipped (non-finite loss or gradients" in err[0]
    assert "6 of 6 updates skipped" in err[1] and "every one" in err[1]
    np.testing.assert_array_equal(np.asarray(result.state.params["w"]), np.zeros(3))


def test_ctrl_c_says_where_the_run_stopped_and_a_resume_continues(tmp_path):
    with pytest.raises(trainer.Interrupted, match=r"interrupted after step 4; its newest checkpoint is step 3") as e:
        trainer.fit(SPEC, tiny_loss, Source(interrupt_at=4), config(steps_per_dispatch=1), params={"w": jnp.zeros(3)},
                    directory=tmp_path / "ck", progress=False)
    assert (e.value.step, e.value.checkpoint) == (4, 3) and isinstance(e.value, KeyboardInterrupt)
    resumed = trainer.fit(SPEC, tiny_loss, Source(), config(), params={"w": jnp.zeros(3)}, directory=tmp_path / "ck",
                          resume=True, progress=False)
    assert resumed.start_step == 3 and int(resumed.state.step) == 6


def test_a_damaged_loss_log_is_refused_on_resume_naming_file_and_line(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n1,0.5\n2,abc\n3,nan\n")
    with pytest.raises(ValueError, match=rf"^{path} line 3: expected 'step,loss' numbers, got '2,abc'"):
        trainer.LossLog(path, resume_step=2)
    path.write_text("step,loss\n1,0.5\n2,nan\n")  # a non-finite loss is a value, not damage
    assert trainer.LossLog(path, resume_step=2).rows == ["step,loss", "1,0.5", "2,nan"]


def test_frozen_parameters_enter_the_step_as_data_and_train_as_a_closure_over_them_does(tmp_path):
    # a LoRA-like split: the loss reads frozen base weights and trains a delta on top of them
    base = {"w0": jnp.asarray([0.3, -0.2, 0.1])}
    loss_over = lambda frozen: lambda p, x, y, key, shard: tiny_loss({"w": frozen["w0"] + p["d"]}, x, y, key, shard)
    fit = lambda loss, **kw: trainer.fit(None, loss, Source(), config(), params={"d": jnp.zeros(3)}, progress=False,
                                         **kw)
    closed = fit(loss_over(base))
    passed = fit(loss_over, frozen=base)
    np.testing.assert_array_equal(np.asarray(passed.state.params["d"]), np.asarray(closed.state.params["d"]))
    assert set(passed.state.params) == {"d"} and float(jnp.abs(passed.state.params["d"]).sum()) > 0
    # and the base is an argument of the compiled step, not a constant: another base, another result
    other = fit(loss_over, frozen={"w0": jnp.asarray([0.9, 0.9, 0.9])})
    assert not np.allclose(np.asarray(other.state.params["d"]), np.asarray(passed.state.params["d"]))


def test_the_next_batches_are_drawn_while_a_dispatch_runs_and_the_on_compiled_hook_fires_once(tmp_path):
    """One dispatch stays in flight: the source is asked for dispatch i + 1's batches before dispatch i's losses
    are read (the progress line reads them), except at a checkpoint, where everything is accounted first."""
    events = []

    class Recorded(Source):
        def stack(self, start, count):
            events.append(("stack", start))
            return super().stack(start, count)

    class Seen(trainer.Progress):
        def start(self, step, devices):
            self.t0 = 0.0

        def update(self, step, count, loss):
            events.append(("losses", step))

        def close(self):
            pass

    trainer.fit(SPEC, tiny_loss, Recorded(), config(steps=8, save_every=6), params={"w": jnp.zeros(3)},
                directory=tmp_path / "ck", progress=Seen("t", 8, 8), on_compiled=lambda: events.append(("compiled",)))
    assert events == [("stack", 0), ("compiled",), ("stack", 2), ("losses", 2), ("stack", 4), ("losses", 4),
                      ("losses", 6), ("stack", 6), ("losses", 8)]
