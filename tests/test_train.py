"""The shared training loop: exact resume, Ctrl-C, NaN handling, checkpoint safety, outputs.

Runs a tiny score model (a conv and a time embedding on 8x8 images) for a few dozen steps per test
so that resume can be checked bit for bit on the CPU.
"""
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinydiff as td
from tinydiff import nn, optim, train
from tinydiff.sde import VESDE

SDE = VESDE(25.0)


class TinyScore(nn.Module):
    """s(x, t) = conv2(silu(conv1(x) + W t)) / std(t): small, but a real score model."""

    def __init__(self, hidden=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.embed = nn.Linear(1, hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, x, t):
        n = x.shape[0]
        emb = self.embed(t.reshape(n, 1)).reshape(n, -1, 1, 1)
        h = (self.conv1(x) + emb).silu()
        return self.conv2(h) / SDE.marginal_std(t).reshape(n, 1, 1, 1)


def images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def make_trainer(out, epochs=3, backend="numpy", loss_fn=None, init_seed=0, lr=1e-2, config=None,
                 hidden=4, n=24, ema=True, **kw):
    nn.manual_seed(init_seed)
    model = TinyScore(hidden).to(backend)
    opt = optim.Adam(model.parameters(), lr=lr)
    sched = optim.LRScheduler(opt, optim.linear_warmup(5, start_factor=0.1))
    x, y = images(n)
    kw.setdefault("clip_grad", 1.0)
    return train.Trainer(model, opt, loss_fn or train.score_matching_loss(SDE), x, y,
                         out_dir=str(out), epochs=epochs, batch_size=5, seed=3,
                         ema=optim.EMA(model, 0.9) if ema else None, scheduler=sched,
                         config=config or {"lr": lr, "hidden": hidden, "epochs": epochs},
                         progress=False, **kw)


def temp_files(folder):
    """Hidden temporary files of interrupted saves (checkpoint or CSV), which must never remain."""
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def weights(trainer):
    return {k: v.copy() for k, v in trainer.model.state_dict().items()}


def assert_same_run(a, b):
    """Bit-identical losses, weights, EMA and optimizer state."""
    assert a.steps["loss"] == b.steps["loss"]
    assert a.steps["grad_norm"] == b.steps["grad_norm"]
    for (k, v), (k2, v2) in zip(weights(a).items(), weights(b).items()):
        assert k == k2 and np.array_equal(v, v2), k
    for k, v in a.ema.state_dict()["shadow"].items():
        assert np.array_equal(v, b.ema.state_dict()["shadow"][k]), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        assert np.array_equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    assert a.epoch_log == [dict(r, seconds=s["seconds"]) for r, s in zip(b.epoch_log, a.epoch_log)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """3 epochs (15 steps) without interruption: what every resumed run must reproduce."""
    t = make_trainer(tmp_path_factory.mktemp("ref"))
    t.fit()
    return t


# -- exact resume ------------------------------------------------------------------------------

def test_resume_at_epoch_boundary_is_bit_exact(tmp_path, reference_run):
    first = make_trainer(tmp_path, epochs=1)
    first.fit()
    assert first.step == 5 and first.steps["loss"] == reference_run.steps["loss"][:5]
    # a fresh process would build the model from another init: the checkpoint must override it
    resumed = make_trainer(tmp_path, epochs=3, init_seed=99)
    resumed.fit(resume=True)
    assert resumed.step == 15
    assert_same_run(resumed, reference_run)
    assert resumed.steps["lr"] == reference_run.steps["lr"]   # the warm-up schedule resumed too


def test_keyboard_interrupt_mid_step_saves_and_resumes_exactly(tmp_path, reference_run):
    calls = {"n": 0}
    base = train.score_matching_loss(SDE)

    def interrupting(model, x, y, rng):
        calls["n"] += 1
        loss = base(model, x, y, rng)      # draws this step's noise, then Ctrl-C arrives
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return loss
    t = make_trainer(tmp_path, loss_fn=interrupting)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    state = train.load_checkpoint(t.checkpoint_path)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (7, 1, 2)
    assert temp_files(tmp_path) == []
    resumed = make_trainer(tmp_path, init_seed=5)
    resumed.fit(resume=True)
    assert_same_run(resumed, reference_run)
    assert temp_files(tmp_path) == []


def test_sigint_stops_after_the_step_and_resumes_exactly(tmp_path, reference_run):
    calls = {"n": 0}
    base = train.score_matching_loss(SDE)

    def ctrl_c(model, x, y, rng):
        calls["n"] += 1
        if calls["n"] == 12:
            os.kill(os.getpid(), signal.SIGINT)   # as if the user pressed Ctrl-C now
        return base(model, x, y, rng)
    t = make_trainer(tmp_path, loss_fn=ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert signal.getsignal(signal.SIGINT) is before          # handler restored
    assert train.load_checkpoint(t.checkpoint_path)["step"] == 12   # the step in flight finished
    assert temp_files(tmp_path) == []
    resumed = make_trainer(tmp_path, init_seed=5)
    resumed.fit(resume=True)
    assert_same_run(resumed, reference_run)


# -- faults: a full disk, kill -9 during a save, Ctrl-C before any checkpoint -------------------

def test_full_disk_at_the_end_of_epoch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                         reference_run):
    t = make_trainer(tmp_path, epochs=3)
    real_savez, calls = np.savez, {"n": 0}

    def savez(f, *args, **kw):   # the second save (after epoch 2) meets a full disk mid-write
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, *args, **kw)
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(train.SaveError) as err:
        t.fit()
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and "after epoch 2" in msg
    assert "(1 epochs done, step 5) is kept" in msg and "--resume" in msg
    assert train.load_checkpoint(t.checkpoint_path)["epoch"] == 1        # the previous one, intact
    assert temp_files(tmp_path) == []
    rows = open(tmp_path / "loss_steps.csv").read().splitlines()
    assert len(rows) == 1 + 10            # the CSV logs of both epochs were still written
    monkeypatch.setattr(np, "savez", real_savez)
    resumed = make_trainer(tmp_path, init_seed=5)                       # space freed: resume
    resumed.fit(resume=True)
    assert_same_run(resumed, reference_run)


def test_full_disk_on_the_first_save_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    def savez(f, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(train.SaveError, match="no checkpoint exists yet.*without --resume"):
        make_trainer(tmp_path, epochs=1).fit()
    assert not os.path.exists(tmp_path / "checkpoint.npz") and temp_files(tmp_path) == []


def test_full_disk_for_the_logs_too_is_said(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, epochs=2)
    t.fit()
    t.epochs = 3

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    monkeypatch.setattr(train, "_write_csv", full)
    with pytest.raises(train.SaveError, match="the CSV logs could not be written either; the "
                                              r"previous checkpoint \(2 epochs done, step 10\)"):
        t.fit(resume=True)
    assert train.load_checkpoint(t.checkpoint_path)["epoch"] == 2 and temp_files(tmp_path) == []


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from tinydiff import checkpoint
    def savez(f, **arrays):          # write part of the file, then die as kill -9 would
        f.write(b"PK" + b"x" * 100000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    np.savez = savez
    checkpoint.save_checkpoint(sys.argv[1], {"w": np.zeros(10)})
""")


def test_kill_during_save_leaves_no_temp_file_after_the_next_save_or_load(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    train.save_checkpoint(path, {"w": np.ones(3)})
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(td.__file__)))}
    for _ in range(2):   # each killed save leaves its own debris, and clears the one before
        r = subprocess.run([sys.executable, "-c", KILLED_SAVE, path], env=env, timeout=120)
        assert r.returncode == -signal.SIGKILL
        assert len(temp_files(tmp_path)) == 1
    assert train.load_checkpoint(path)["w"].tolist() == [1, 1, 1]  # the last good one survived
    assert temp_files(tmp_path) == []                            # ... and loading cleared it
    subprocess.run([sys.executable, "-c", KILLED_SAVE, path], env=env, timeout=120)
    train.save_checkpoint(path, {"w": np.full(3, 2.0)})          # so does the next save
    assert temp_files(tmp_path) == [] and train.load_checkpoint(path)["w"].tolist() == [2, 2, 2]


def test_temp_file_of_a_live_process_is_left_alone(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    live = tmp_path / f".checkpoint.npz.tmp-{os.getppid()}"      # our parent is alive
    live.write_bytes(b"being written")
    train.save_checkpoint(path, {"w": np.ones(1)})
    assert live.exists()


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    t = make_trainer(tmp_path, epochs=1)

    def interrupted_update():    # Ctrl-C while the very first update is being applied
        raise KeyboardInterrupt
    monkeypatch.setattr(t.optimizer, "step", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    out = capsys.readouterr().out
    assert "nothing was saved" in out and "without --resume" in out
    assert "last good checkpoint" not in out and "--resume to continue" not in out
    assert not os.path.exists(t.checkpoint_path) and temp_files(tmp_path) == []
    assert "without --resume" in train.resume_advice(str(tmp_path))
    make_trainer(tmp_path / "b", epochs=1).fit()
    assert "with --resume" in train.resume_advice(str(tmp_path / "b"))


def test_resume_of_a_finished_run_says_what_to_pass(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    with pytest.raises(train.CheckpointError, match=r"already trained 1 of epochs=1.*--epochs 2"):
        make_trainer(tmp_path, epochs=1).fit(resume=True)


def test_same_losses_on_every_backend(tmp_path, backend, reference_run):
    t = make_trainer(tmp_path, epochs=1, backend=backend.name)
    t.fit()
    assert backend.owns(t.model.conv1.weight.data)
    np.testing.assert_allclose(t.steps["loss"], reference_run.steps["loss"][:5], rtol=1e-4)


# -- non-finite losses and gradients -----------------------------------------------------------

def poisoned(at_calls, where="loss"):
    calls = {"n": 0}
    base = train.score_matching_loss(SDE)

    def loss_fn(model, x, y, rng):
        calls["n"] += 1
        loss = base(model, x, y, rng)
        if calls["n"] in at_calls:
            if where == "loss":
                return loss * float("nan")
            w = model.conv2.bias                        # sqrt'(0) = inf: finite loss, NaN gradient
            return loss + (w * 0.0).sqrt().sum()
        return loss
    return loss_fn


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path, where):
    t = make_trainer(tmp_path, loss_fn=poisoned({8}, where))
    with pytest.raises(train.NonFiniteError) as err:
        t.fit()
    msg = str(err.value)
    assert ("loss is nan" if where == "loss" else "gradient norm is nan") in msg
    assert "epoch 2, step 8" in msg and "kept unchanged" in msg
    state = train.load_checkpoint(t.checkpoint_path)
    assert state["step"] == 5 and state["epoch"] == 1               # still the epoch-1 checkpoint
    for v in state["model"].values():
        assert np.isfinite(v).all()
    rows = open(tmp_path / "loss_steps.csv").read().splitlines()
    assert len(rows) == 1 + 8 and rows[-1].split(",")[2] == "nan"   # the bad step is logged


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_skip_counts_and_continues(tmp_path, reference_run):
    t = make_trainer(tmp_path, loss_fn=poisoned({3, 4}, "grad"), on_nonfinite="skip")
    history = t.fit()
    assert history["skipped"] == 2 and t.steps["skipped"][2:4] == [1, 1]
    assert t.epoch_log[0]["skipped"] == 2 and t.step == 15
    assert all(np.isfinite(v).all() for v in weights(t).values())
    # the first two steps match the clean run exactly; the weights then differ (2 updates fewer)
    assert t.steps["loss"][:2] == reference_run.steps["loss"][:2]
    assert not np.array_equal(weights(t)["conv1.weight"], weights(reference_run)["conv1.weight"])


def test_too_many_skips_in_a_row_stop(tmp_path):
    t = make_trainer(tmp_path, loss_fn=poisoned(set(range(2, 20)), "loss"), on_nonfinite="skip",
                     max_consecutive_skips=3)
    with pytest.raises(train.NonFiniteError, match="after 3 skipped steps in a row"):
        t.fit()
    assert t.skipped == 3
    assert not os.path.exists(t.checkpoint_path)   # no good epoch finished: nothing written


# -- checkpoints that do not fit ---------------------------------------------------------------

def test_checkpoint_from_another_model_or_config_is_refused(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    with pytest.raises(train.CheckpointError, match=r"hidden: checkpoint 4, now 6"):
        make_trainer(tmp_path, hidden=6).fit(resume=True)
    # the same config but other shapes (config lying about the model): the shapes are named
    with pytest.raises(train.CheckpointError, match=r"conv1.weight.*\(4, 1, 3, 3\)"):
        make_trainer(tmp_path, hidden=6, config={"lr": 1e-2, "hidden": 4}).fit(resume=True)
    with pytest.raises(train.CheckpointError, match="lr: checkpoint 0.01, now 0.02"):
        make_trainer(tmp_path, lr=2e-2).fit(resume=True)
    with pytest.raises(train.CheckpointError, match="num_images: checkpoint 24, now 20"):
        make_trainer(tmp_path, n=20).fit(resume=True)
    with pytest.raises(train.CheckpointError, match="EMA"):
        make_trainer(tmp_path, ema=False).fit(resume=True)
    with pytest.raises(train.CheckpointError, match="exists; pass resume=True"):
        make_trainer(tmp_path).fit()
    make_trainer(tmp_path, epochs=2).fit(resume=True)   # more epochs is the one allowed change


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(train.CheckpointError, match="no checkpoint at"):
        make_trainer(tmp_path).fit(resume=True)
    t = make_trainer(tmp_path, epochs=1)
    t.fit()
    blob = open(t.checkpoint_path, "rb").read()
    open(t.checkpoint_path, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(train.CheckpointError, match="corrupt or truncated"):
        make_trainer(tmp_path).fit(resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, epochs=1)
    t.fit()
    good = hashlib.md5(open(t.checkpoint_path, "rb").read()).hexdigest()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        t.save()
    assert hashlib.md5(open(t.checkpoint_path, "rb").read()).hexdigest() == good
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoint.npz", "config.json", "loss.png", "loss_epochs.csv", "loss_steps.csv"])


@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**130, 2**130), st.floats(allow_nan=False),
              st.text(max_size=5),
              st.builds(lambda s, d: np.arange(s, dtype=d), st.integers(0, 4),
                        st.sampled_from([np.float32, np.float64, np.int64]))),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                           st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), kids,
                                           max_size=3)),
    max_leaves=10))
def test_checkpoint_codec_round_trip(tmp_path_factory, tree):
    path = str(tmp_path_factory.mktemp("ck") / "c.npz")
    train.save_checkpoint(path, {"x": tree})
    back = train.load_checkpoint(path)["x"]

    def same(a, b):
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, dict):
            return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b
    assert same(tree, back)


# -- outputs -----------------------------------------------------------------------------------

def test_outputs_logs_plot_and_sample_grids(tmp_path):
    import matplotlib.image as mpimg
    seen = []

    def sample_fn(model, seed):
        seen.append(seed)
        return np.random.default_rng(seed).random((6, 1, 8, 8))
    t = make_trainer(tmp_path, epochs=2, sample_fn=sample_fn)
    t.fit()
    steps = open(tmp_path / "loss_steps.csv").read().splitlines()
    assert steps[0] == "step,epoch,loss,grad_norm,lr,skipped" and len(steps) == 11
    assert [float(r.split(",")[2]) for r in steps[1:]] == t.steps["loss"]
    epochs = open(tmp_path / "loss_epochs.csv").read().splitlines()
    assert len(epochs) == 3
    assert float(epochs[1].split(",")[2]) == pytest.approx(np.mean(t.steps["loss"][:5]))
    for name in ("loss.png", "samples/epoch_001.png", "samples/epoch_002.png"):
        img = mpimg.imread(str(tmp_path / name))
        assert img.ndim == 3 and img.shape[0] > 20 and img.std() > 0
    assert len(set(seen)) == 2        # a new, reproducible sample seed every epoch
    assert (tmp_path / "config.json").exists()


def test_samples_use_ema_weights_and_restore(tmp_path):
    t = make_trainer(tmp_path, epochs=1)
    t.fit()
    before = weights(t)
    got = {}

    def sample_fn(model, seed):
        got.update({k: v.copy() for k, v in model.state_dict().items()})
        assert not model.training and not td.is_grad_enabled()
        return np.zeros((1, 1, 8, 8))
    t.sample_fn = sample_fn
    t.sample(0)
    assert np.array_equal(got["conv1.weight"], t.ema.state_dict()["shadow"]["conv1.weight"])
    assert not np.array_equal(got["conv1.weight"], before["conv1.weight"])
    assert np.array_equal(weights(t)["conv1.weight"], before["conv1.weight"]) and t.model.training


def test_load_model_weights_for_sampling(tmp_path):
    t = make_trainer(tmp_path, epochs=1)
    t.fit()
    nn.manual_seed(7)
    fresh = TinyScore()
    train.load_model_weights(t.checkpoint_path, fresh, use_ema=False)
    assert np.array_equal(fresh.state_dict()["conv1.weight"], weights(t)["conv1.weight"])
    train.load_model_weights(t.checkpoint_path, fresh)
    assert np.array_equal(fresh.state_dict()["conv1.weight"],
                          t.ema.state_dict()["shadow"]["conv1.weight"])
    with pytest.raises(train.CheckpointError, match="does not fit"):
        train.load_model_weights(t.checkpoint_path, TinyScore(hidden=3))


def test_host_generator_is_backend_independent(backend):
    a = train.HostGenerator(backend, 5)
    b = train.HostGenerator("numpy", 5)
    z = a.normal((3, 4))
    assert backend.owns(z) and a.backend is backend
    np.testing.assert_array_equal(backend.to_host(z), b.normal((3, 4)))
    state = a.get_state()
    u = backend.to_host(a.uniform((5,), 0.1, 0.2))
    a.set_state(state)
    np.testing.assert_array_equal(backend.to_host(a.uniform((5,), 0.1, 0.2)), u)
    assert ((u >= 0.1) & (u <= 0.2)).all()


def test_label_dropout_for_classifier_free_guidance(backend):
    seen = []

    class Recorder(nn.Module):
        null_label = 10

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.ones((1,), np.float32), backend=backend.name)

        def forward(self, x, t, y):
            seen.append(backend.to_host(y).copy())
            return x * self.w
    x = backend.asarray(np.zeros((400, 1, 2, 2), np.float32))
    y = backend.asarray(np.arange(400) % 10)
    for p, expected in ((0.0, 0), (1.0, 400), (0.25, 100)):
        loss_fn = train.score_matching_loss(SDE, use_labels=True, label_dropout=p)
        loss_fn(Recorder(), x, y, train.HostGenerator(backend, 0))
        dropped = seen[-1] == 10
        kept = ~dropped
        assert np.array_equal(seen[-1][kept], (np.arange(400) % 10)[kept])
        # Binomial(400, 0.25): mean 100, sd 8.7; 5 sd either side
        assert abs(dropped.sum() - expected) <= 5 * np.sqrt(400 * p * (1 - p)), (p, dropped.sum())
    loss_fn(Recorder(), x, y, train.HostGenerator(backend, 0))
    assert np.array_equal(seen[-1], seen[-2])    # the draws come from the seeded generator
