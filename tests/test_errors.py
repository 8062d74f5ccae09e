"""Every mistake and fault of issue 13, one row each: what it raises (or exits with), and that the
one-line message names the argument, flag or file. Library calls raise the named exception type;
script flags exit 2 before any data is loaded, print no traceback and leave the disk as it was.
(The fault tests, a full disk, kill -9 during a save and Ctrl-C, are in test_train.py.)"""
import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tinydiff as td
from tinydiff import Tensor, data, metrics, optim, sampling, train
from tinydiff.models import ScoreNet
from tinydiff.models.classifier import shipped_weights_path
from tinydiff.nn import Parameter
from tinydiff.sde import VESDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDE = VESDE(25.0)


def zero_score(x, t):
    return x * 0


def nan_score(x, t):
    return x * np.nan


def params():
    p = Parameter(np.ones(3, np.float32))
    p.grad = np.ones(3, np.float32)
    return [p]


def tiny_trainer(tmp, **kw):
    from test_train import make_trainer
    return make_trainer(tmp, **kw)


def scorenet(channels=(4, 8, 8, 8), **kw):
    return ScoreNet(SDE.marginal_std, channels=channels, embed_dim=8, num_groups=(2, 2, 2, 2),
                    decoder_groups=2, **kw)


X = np.zeros((2, 1, 28, 28), np.float32)
EM = sampling.euler_maruyama

LIBRARY = [
    # (id, call, exception, words the message must contain)
    ("clip max_norm < 0", lambda tmp: optim.clip_grad_norm_(params(), -1), ValueError, ["max_norm", "-1"]),
    ("clip max_norm = 0", lambda tmp: optim.clip_grad_norm_(params(), 0.0), ValueError, ["max_norm", "> 0"]),
    ("clip max_norm nan", lambda tmp: optim.clip_grad_norm_(params(), float("nan")), ValueError, ["max_norm"]),
    ("adam lr nan", lambda tmp: optim.Adam(params(), lr=float("nan")), ValueError, ["lr", "nan"]),
    ("trainer epochs 0", lambda tmp: tiny_trainer(tmp, epochs=0), ValueError, ["epochs", ">= 1", "0"]),
    ("trainer epochs -3", lambda tmp: tiny_trainer(tmp, epochs=-3), ValueError, ["epochs"]),
    ("trainer clip -1", lambda tmp: tiny_trainer(tmp, clip_grad=-1.0), ValueError, ["clip_grad"]),
    ("trainer sample_every 0", lambda tmp: tiny_trainer(tmp, sample_every=0), ValueError, ["sample_every"]),
    ("sample_fn steps 0", lambda tmp: train.make_sample_fn(SDE, "em", 0), ValueError,
     ["make_sample_fn('em')", "num_steps"]),
    ("sample_fn n 0", lambda tmp: train.make_sample_fn(SDE, "pc", 10, (0, 1, 28, 28)), ValueError,
     ["shape"]),
    ("em eps 0", lambda tmp: EM(zero_score, SDE, (2, 3), 10, eps=0.0), ValueError, ["eps", "(0, T"]),
    ("em eps > T", lambda tmp: EM(zero_score, SDE, (2, 3), 10, eps=2.0), ValueError, ["eps"]),
    ("em eps < 0", lambda tmp: EM(zero_score, SDE, (2, 3), 10, eps=-1e-3), ValueError, ["eps"]),
    ("em num_steps 1", lambda tmp: EM(zero_score, SDE, (2, 3), 1), ValueError, ["num_steps", ">= 2"]),
    ("pc num_steps 0", lambda tmp: sampling.predictor_corrector(zero_score, SDE, (2, 3), 0),
     ValueError, ["num_steps"]),
    ("pc snr 0", lambda tmp: sampling.predictor_corrector(zero_score, SDE, (2, 3), 5, snr=0),
     ValueError, ["snr"]),
    ("shape with 0", lambda tmp: EM(zero_score, SDE, (0, 3), 10), ValueError, ["shape"]),
    ("score wrong shape", lambda tmp: EM(lambda x, t: x[:, :1], SDE, (2, 3), 5), ValueError,
     ["score_fn returned shape (2, 1)", "(2, 3)"]),
    ("score broadcastable", lambda tmp: EM(lambda x, t: t, SDE, (2, 2), 5), ValueError,
     ["score_fn returned shape (2,)"]),
    ("ode rtol 0", lambda tmp: sampling.ode_sampler(zero_score, SDE, (2, 3), rtol=0, atol=0),
     ValueError, ["rtol", "> 0"]),
    ("ode atol nan", lambda tmp: sampling.ode_sampler(zero_score, SDE, (2, 3), atol=float("nan")),
     ValueError, ["atol"]),
    ("ode NaN score", lambda tmp: sampling.ode_sampler(nan_score, SDE, (2, 3)), FloatingPointError,
     ["NaN", "score"]),
    ("likelihood NaN x", lambda tmp: sampling.log_likelihood(
        lambda x, t: x * 0, np.full((2, 3), np.nan, np.float32), SDE), ValueError, ["NaN", "x"]),
    ("bpd 0..255 floats", lambda tmp: sampling.bits_per_dim(
        lambda x, t: x * 0, np.full((2, 3), 200.0, np.float32), SDE), ValueError, ["[0, 1]", "255"]),
    ("bpd uint8", lambda tmp: sampling.bits_per_dim(lambda x, t: x * 0, np.zeros((2, 3), np.uint8), SDE),
     ValueError, ["dtype uint8", "255"]),
    ("metrics 0..255 floats", lambda tmp: metrics.prepare_images(np.linspace(0, 255, 2 * 784).reshape(
        2, 28, 28).astype(np.float32)), metrics.MetricError, ["[0, 1]", "255"]),
    ("tensor of strings", lambda tmp: Tensor(np.array(["a", "b"])), TypeError, ["dtype <U1"]),
    ("tensor of objects", lambda tmp: Tensor(np.array([object()])), TypeError, ["dtype object"]),
    ("tensor from str list", lambda tmp: Tensor(["1", "x"]), TypeError, ["numbers"]),
    ("scorenet t nan", lambda tmp: scorenet()(X, np.array([0.5, np.nan], np.float32)), ValueError,
     ["t must be finite", "nan"]),
    ("scorenet t 0", lambda tmp: scorenet()(X, 0.0), ValueError, ["t must be finite and > 0"]),
    ("scorenet fractional labels", lambda tmp: scorenet(num_classes=10)(X, 0.5, np.array([1.0, 2.5])),
     ValueError, ["labels", "fractional"]),
    ("scorenet label out of range", lambda tmp: scorenet(num_classes=10)(X, 0.5, np.array([1, 11])),
     ValueError, ["labels must lie in 0..10"]),
]


@pytest.mark.parametrize("case", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_refuses_with_a_one_line_message(case, tmp_path):
    _, call, exc, words = case
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(exc) as err:
        call(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert sorted(os.listdir(tmp_path)) == before          # nothing written


def test_library_accepts_what_it_should():
    # the checks must not refuse good values: integral float labels, a float t, 0-d arrays
    scorenet(num_classes=10)(X, 0.5, np.array([1.0, 10.0]))
    optim.clip_grad_norm_(params(), 1e-3)
    metrics.prepare_images(np.full((2, 28, 28), 1.2, np.float32))   # a sampler's overshoot: clipped


def test_predictor_corrector_with_a_zero_score_stays_finite():
    rng = td.get_backend("numpy").default_rng(0)
    x = sampling.predictor_corrector(zero_score, SDE, (64, 4), num_steps=20, rng=rng)
    assert np.isfinite(x).all()
    # a zero score leaves only the predictor's noise: the variance of the prior plus the
    # integral of g^2 over [eps, T], i.e. about twice std(T)^2 (Langevin adds nothing)
    expected = SDE.marginal_std(1.0) ** 2 * 2
    assert 0.5 * expected < x.var() < 1.6 * expected


# -- files that are not what they claim -------------------------------------------------------------

def test_checkpoint_files_that_are_not_checkpoints(tmp_path):
    rand = tmp_path / "random.npz"
    rand.write_bytes(np.random.default_rng(0).bytes(5000))
    good = str(tmp_path / "good.npz")
    train.save_checkpoint(good, {"model": {"w": np.ones(3)}, "config": {}})
    cut = tmp_path / "cut.npz"
    cut.write_bytes(open(good, "rb").read()[:300])
    for path in (rand, cut):
        for load in (train.load_checkpoint, train.read_config):
            with pytest.raises(train.CheckpointError) as err:
                load(str(path))
            msg = str(err.value)
            assert str(path) in msg and "not a tinydiff checkpoint" in msg and "truncated" in msg
            assert "allow_pickle" not in msg and "\n" not in msg
    with pytest.raises(train.CheckpointError, match="is a classifier weights file.*load_classifier"):
        train.load_checkpoint(shipped_weights_path("mnist"))
    with pytest.raises(train.CheckpointError, match="is a folder"):
        train.load_checkpoint(str(tmp_path))


def test_checkpoint_of_another_architecture_names_the_setting(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    train.save_checkpoint(path, {"model": scorenet((4, 8, 8, 8)).state_dict(), "ema": None,
                                 "config": {"channels": "4,8,8,8", "embed_dim": 8, "lr": 1e-3}})
    with pytest.raises(train.CheckpointError) as err:
        train.load_model_weights(path, scorenet((2, 4, 4, 4)))
    msg = str(err.value)
    assert "trained with channels=[4, 8, 8, 8], you asked for [2, 4, 4, 4]" in msg
    assert "strict=False" not in msg and "conv1.weight" not in msg and "\n" not in msg
    train.load_model_weights(path, scorenet((4, 8, 8, 8)))   # the right one loads


# -- data folders --------------------------------------------------------------------------------

@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    from test_data import make_fake_mnist
    monkeypatch.setenv("TINYDIFF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYDIFF_OFFLINE", "1")
    make_fake_mnist(str(tmp_path / "data" / "mnist"), monkeypatch)
    return tmp_path / "data" / "mnist"


def test_gunzipped_idx_file_says_the_gz_is_expected(fake_mnist):
    gz = fake_mnist / "t10k-images-idx3-ubyte.gz"
    raw = fake_mnist / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte but t10k-images-idx3-ubyte.gz "
                                             r"\(the gzip-compressed file\) is expected"):
        data.load_mnist("test")
    shutil.move(str(raw), str(gz))        # the raw bytes under the .gz name
    with pytest.raises(data.DataError, match="not gzip-compressed"):
        data.load_mnist("test")


def test_file_of_another_data_set_or_split_is_named(fake_mnist, monkeypatch):
    train_images = fake_mnist / "train-images-idx3-ubyte.gz"
    shutil.copy(fake_mnist / "t10k-images-idx3-ubyte.gz", train_images)
    with pytest.raises(data.DataError, match="this is the MNIST file t10k-images-idx3-ubyte.gz, not "
                                             "the MNIST file train-images-idx3-ubyte.gz"):
        data.load_mnist("train")
    from test_data import write_idx
    write_idx(str(train_images), np.zeros((7, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match=r"this is not the MNIST training images file: its IDX "
                                             r"header says shape \(7, 28, 28\)"):
        data.load_mnist("train")
    monkeypatch.setitem(data.DATASETS["fashion-mnist"]["md5"], "train-images-idx3-ubyte.gz",
                        hashlib.md5(train_images.read_bytes()).hexdigest())
    with pytest.raises(data.DataError, match="this is the Fashion-MNIST file"):
        data.load_mnist("train")


def test_offline_advice_does_not_say_download_and_offline_0_allows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYDIFF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "cache"))
    asked = []

    def no_network(url, timeout=None):
        asked.append(url)
        raise OSError("unreachable (test)")
    monkeypatch.setattr(data, "urlopen", no_network)
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("TINYDIFF_OFFLINE", value)
        with pytest.raises(data.DataError) as err:
            data.fetch("mnist", "t10k-labels-idx1-ubyte.gz")
        assert "download" not in str(err.value).lower() and "TINYDIFF_OFFLINE" in str(err.value)
    assert asked == []
    for value in ("0", "false", "no", ""):
        monkeypatch.setenv("TINYDIFF_OFFLINE", value)
        with pytest.raises(data.DataError, match="could not download"):
            data.fetch("mnist", "t10k-labels-idx1-ubyte.gz")
    assert len(asked) == 4 * len(data.DATASETS["mnist"]["mirrors"])


# -- script flags: exit 2 before any data is loaded, nothing written ---------------------------

def load_script(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLF, QUALITY, BENCH = ("examples/train_classifier.py", "benchmarks/quality.py",
                       "benchmarks/bench_scorenet.py")
FLAGS = [
    (CLF, ["--epochs", "0"], "--epochs"), (CLF, ["--epochs", "-2"], "--epochs"),
    (CLF, ["--batch-size", "0"], "--batch-size"), (CLF, ["--lr", "-1"], "--lr"),
    (CLF, ["--lr", "nan"], "--lr"), (CLF, ["--limit", "0"], "--limit"),
    (CLF, ["--test-limit", "x"], "--test-limit"), (CLF, ["--seed", "-1"], "--seed"),
    (CLF, ["--dataset", "imagenet"], "--dataset"), (CLF, ["--backend", "tpu"], "--backend"),
    (CLF, ["--data", "/nonexistent/folder"], "--data"), (CLF, ["--data-root", "/nonexistent"], "--data"),
    (CLF, ["--out", "{tmp}"], "--out"), (CLF, ["--out", "{file}/x.npz"], "--out"),
    (CLF, ["--out", "a.npz", "--ship"], "--ship"),
    (BENCH, ["--repeats", "0"], "--repeats"), (BENCH, ["--gap-ms", "-1"], "--gap-ms"),
    (BENCH, ["--backend", "tpu"], "--backend"),
    # quality.py is `tinydiff evaluate` now: its flags are in the CLI's own table (test_cli.py)
]


@pytest.mark.parametrize("script,argv,flag", FLAGS, ids=[f"{s.split('/')[-1]} {' '.join(a)}" for s, a, _ in FLAGS])
def test_script_flags_exit_2_before_anything(script, argv, flag, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "ckpt.npz").write_bytes(b"not read before the flags are checked")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file", ckpt=tmp_path / "ckpt.npz") for a in argv]
    mod = load_script(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags"))
    shipped = hashlib.sha256(open(shipped_weights_path("mnist"), "rb").read()).hexdigest()
    with pytest.raises(SystemExit) as exit_:
        mod.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument" in err and flag in err, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz", "file"]
    assert hashlib.sha256(open(shipped_weights_path("mnist"), "rb").read()).hexdigest() == shipped


def run_script(rel, *argv, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "TINYDIFF_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, rel), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_scripts_print_one_line_not_a_traceback(tmp_path):
    r = run_script(CLF, "--epochs", "0", cwd=tmp_path)                 # a flag: argparse, exit 2
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--epochs" in r.stderr
    bad = tmp_path / "random.npz"
    bad.write_bytes(np.random.default_rng(1).bytes(4000))
    r = run_script(QUALITY, str(bad), cwd=tmp_path)                     # a file: exit 1, one line
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and str(bad) in r.stderr
    r = run_script(CLF, "--data", str(tmp_path), "--limit", "8", cwd=tmp_path)   # no data there
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not found" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["random.npz"]              # nothing written


def test_train_classifier_writes_under_runs_by_default(monkeypatch, tmp_path):
    mod = load_script(CLF)
    args = mod.parse_args([])
    assert args.out is None and not args.ship
    monkeypatch.chdir(tmp_path)
    written = {}
    monkeypatch.setattr(mod, "save_classifier", lambda model, path, **k: written.setdefault("p", path) and "0")
    monkeypatch.setattr(mod, "fit", lambda *a, **k: None)
    monkeypatch.setattr(mod, "accuracy", lambda *a, **k: 0.5)
    images = (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8))
    monkeypatch.setattr(mod.data, "load_dataset", lambda *a, **k: images)
    monkeypatch.setattr(mod.os.path, "getsize", lambda p: 1024)
    mod.run(mod.parse_args(["--epochs", "1"]))
    assert written["p"] == os.path.join("runs", "classifier_mnist.npz")
    assert not os.path.abspath(written["p"]).startswith(os.path.dirname(shipped_weights_path("mnist")))


def test_resuming_another_run_is_one_line_without_strict_advice(tmp_path):
    tiny_trainer(tmp_path, epochs=1).fit()
    with pytest.raises(train.CheckpointError) as err:
        tiny_trainer(tmp_path, lr=2e-2).fit(resume=True)
    assert "\n" not in str(err.value) and "lr: checkpoint 0.01, now 0.02" in str(err.value)
    with pytest.raises(train.CheckpointError) as err:    # a config that does not name the change
        tiny_trainer(tmp_path, hidden=6, config={"lr": 1e-2, "hidden": 4}).fit(resume=True)
    msg = str(err.value)
    assert "\n" not in msg and "strict=False" not in msg and "5 mis-shaped" in msg
