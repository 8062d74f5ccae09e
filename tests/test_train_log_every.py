"""Trainer(log_every=N): one host read per N steps, the same run bit for bit, and a non-finite
step still never reaches the weights (it is undone on the device and the next read stops); and
Trainer(flat_parameters=True), the default: the model's parameters are views into one flat
buffer, also after a resume."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_flat import assert_views as assert_flat  # noqa: E402
from test_train import SDE, assert_same_run, make_trainer, poisoned, weights  # noqa: E402
from tinydiff import train  # noqa: E402
from tinydiff.testing import strict_cupy  # noqa: E402


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    t = make_trainer(tmp_path_factory.mktemp("every"), epochs=3)
    t.fit()
    return t


@pytest.mark.parametrize("n", [2, 4, 100])
def test_log_every_n_is_the_same_run(tmp_path, every_step, n):
    t = make_trainer(tmp_path, epochs=3, log_every=n)
    t.fit()
    assert t.step == 15 and not t._pending
    assert_same_run(t, every_step)
    assert t.steps["lr"] == every_step.steps["lr"]
    rows = open(tmp_path / "loss_steps.csv").read().splitlines()
    assert len(rows) == 1 + 15                          # every step is still logged


def test_log_every_reads_once_per_n_steps_on_a_device(tmp_path):
    t = make_trainer(tmp_path, epochs=1, backend="strict", log_every=5, n=25)
    x, y = next(train._data.batches(t.images, 5, backend="strict", labels=t.labels))
    before = strict_cupy.SYNCS["count"]
    for _ in range(4):
        assert t.train_step(x, y) is None               # deferred: no sync
    assert strict_cupy.SYNCS["count"] == before
    t.train_step(x, y)
    rows = t.flush_log()                                # the one read of five steps
    assert strict_cupy.SYNCS["count"] == before + 1 and len(rows) == 5 and t.step == 5
    assert all(np.isfinite(r[0]) for r in rows)


def test_resume_with_log_every_is_bit_exact(tmp_path, every_step):
    make_trainer(tmp_path, epochs=1, log_every=3).fit()
    resumed = make_trainer(tmp_path, epochs=3, init_seed=99, log_every=3)
    resumed.fit(resume=True)
    assert_same_run(resumed, every_step)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_nonfinite_step_is_undone_and_stops_the_run(tmp_path, every_step, where):
    t = make_trainer(tmp_path, loss_fn=poisoned({8}, where), log_every=4)
    with pytest.raises(train.NonFiniteError) as err:
        t.fit()
    msg = str(err.value)
    assert ("loss is nan" if where == "loss" else "gradient norm is nan") in msg
    assert "epoch 2, step 8" in msg and "kept unchanged" in msg
    state = train.load_checkpoint(t.checkpoint_path)
    assert state["step"] == 5                           # still the epoch-1 checkpoint
    rows = open(tmp_path / "loss_steps.csv").read().splitlines()
    assert len(rows) == 1 + 8 and rows[-1].split(",")[2] == "nan"
    assert t.steps["loss"][:7] == every_step.steps["loss"][:7]
    # the weights in memory are those after step 7: step 8 was undone on the device
    ref = make_trainer(tmp_path / "ref", epochs=3)
    stop = {"n": 0}
    base = train.score_matching_loss(SDE)

    def seven(model, x, y, rng):
        stop["n"] += 1
        if stop["n"] == 8:
            raise KeyboardInterrupt
        return base(model, x, y, rng)
    ref.loss_fn = seven
    with pytest.raises(KeyboardInterrupt):
        ref.fit()
    for (k, a), b in zip(weights(t).items(), weights(ref).values()):
        assert np.isfinite(a).all() and np.array_equal(a, b), k
    for k, v in t.ema.state_dict()["shadow"].items():
        assert np.array_equal(v, ref.ema.state_dict()["shadow"][k]), k


def test_skipping_needs_log_every_1(tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite='skip' needs log_every=1"):
        make_trainer(tmp_path, on_nonfinite="skip", log_every=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="log_every must be an integer >= 1"):
            make_trainer(tmp_path, log_every=bad)


def test_trainer_flattens_and_a_resumed_run_keeps_the_views(tmp_path):
    ref = make_trainer(tmp_path / "ref", epochs=2)
    ref.fit()
    assert_flat(ref.model)
    first = make_trainer(tmp_path / "run", epochs=1)
    first.fit()
    second = make_trainer(tmp_path / "run", epochs=2)
    second.fit(resume=True)
    assert_flat(second.model)
    assert_same_run(ref, second)
    plain = make_trainer(tmp_path / "plain", epochs=2, flat_parameters=False)
    plain.fit()
    assert getattr(next(plain.model.parameters()), "_flat", None) is None
    np.testing.assert_allclose(plain.steps["loss"], ref.steps["loss"], rtol=1e-5)
