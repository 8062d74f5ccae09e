"""examples/mnist_uncond.py end to end on a tiny ScoreNet and a few dozen images: outputs, exact
resume, sample-only, refused resumes, --help, and the clear error of --backend cupy without a GPU.

Uses real MNIST via data_dir() when present, else small generated IDX files.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import tinydiff as td
from tinydiff import cli, data, experiments, train
from conftest import data_dir, make_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "mnist_uncond.py")
TINY = ["--channels", "4,4,4,4", "--embed-dim", "16", "--limit", "48", "--batch-size", "16",
        "--sample-steps", "3", "--num-samples", "4", "--no-progress", "--warmup", "2"]


def load_example():
    spec = importlib.util.spec_from_file_location("mnist_uncond", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture
def mnist_root(tmp_path_factory, monkeypatch):
    """A folder with mnist/: the real one, or generated IDX files registered with their MD5s."""
    monkeypatch.setenv("TINYDIFF_OFFLINE", "1")
    if data_dir() is not None:
        return data_dir()
    root = tmp_path_factory.mktemp("fake_data")
    for name, md5 in make_fake_mnist(str(root)).items():
        monkeypatch.setitem(data.DATASETS["mnist"]["md5"], name, md5)
    return str(root)


def run(example, out, root, *extra):
    return example.main(["--out", str(out), "--data", root, *TINY, *extra])


def test_train_outputs_resume_and_sample_only(example, mnist_root, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "run"
    assert run(example, out, mnist_root, "--epochs", "1") == 0
    for name in ("checkpoint.npz", "config.json", "loss_steps.csv", "loss_epochs.csv", "loss.png",
                 "samples/epoch_001.png", "samples_heun-sde.png", "samples_heun-sde.npz"):
        assert (out / name).is_file(), name
    state = train.load_checkpoint(str(out / "checkpoint.npz"))
    assert (state["epoch"], state["step"]) == (1, 3)             # 48 images / batch 16
    assert state["config"]["recipe"] == "fast" and state["ema"] is not None
    assert len((out / "loss_steps.csv").read_text().splitlines()) == 1 + 3
    with np.load(out / "samples_heun-sde.npz") as f:       # the fast recipe's sampler
        assert f["samples"].shape == (4, 1, 28, 28) and np.isfinite(f["samples"]).all()
        assert str(f["sampler"]) == "heun-sde" and int(f["sample_steps"]) == 3
    img = mpimg.imread(str(out / "samples_heun-sde.png"))
    assert img.shape[0] == img.shape[1] > 56                       # a 2x2 grid, upscaled

    # resume to 2 epochs == an uninterrupted 2-epoch run, bit for bit; settings come from the checkpoint
    assert example.main(["--out", str(out), "--resume", "--epochs", "2", "--data", mnist_root,
                         "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert run(example, straight, mnist_root, "--epochs", "2") == 0
    resumed, full = (train.load_checkpoint(str(p / "checkpoint.npz")) for p in (out, straight))
    assert resumed["step"] == 6 and np.array_equal(resumed["steps"]["loss"], full["steps"]["loss"])
    for k, v in full["model"].items():
        assert np.array_equal(resumed["model"][k], v), k
    assert (out / "samples" / "epoch_002.png").is_file()

    # sample only, with another sampler; the checkpoint is left alone
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert example.main(["--out", str(out), "--sample-only", "--sampler", "pc", "--bpd", "3",
                         "--data", mnist_root]) == 0
    with np.load(out / "samples_pc.npz") as f:
        assert f["samples"].shape == (4, 1, 28, 28) and str(f["sampler"]) == "pc"
    line = [ln for ln in capsys.readouterr().out.splitlines() if "bits/dim" in ln][0]
    assert "(3 images)" in line and 0 < float(line.split(": ")[1].split()[0]) < 100
    assert (out / "checkpoint.npz").read_bytes() == before

    # a resume that changes the trajectory is refused with the difference named
    capsys.readouterr()
    assert example.main(["--out", str(out), "--resume", "--lr", "0.5", "--data", mnist_root]) == 1
    assert f"lr: checkpoint {experiments.RECIPES['fast']['lr']}, now 0.5" in capsys.readouterr().err
    assert example.main(["--out", str(tmp_path / "none"), "--sample-only"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def _config(argv, preset="mnist"):
    """The configuration the example's flags resolve to (no checkpoint involved)."""
    args = cli.train_parser("mnist_uncond.py", preset).parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if k in experiments.DEFAULTS
                or k in experiments.RECIPES["fast"] or k in experiments.PRESETS["mnist"]}
    return experiments.resolve_config(explicit, default_preset=preset)


def test_recipes_and_explicit_flags(tmp_path):
    config = _config(["--recipe", "reference", "--out", str(tmp_path)])
    assert (config["lr"], config["batch_size"], config["ema"], config["warmup"]) == (1e-4, 32, 0.0, 0)
    config = _config(["--recipe", "reference", "--lr", "3e-4", "--batch-size", "8"])
    assert (config["lr"], config["batch_size"], config["recipe"]) == (3e-4, 8, "reference")
    fast = _config([])
    assert fast["recipe"] == "fast" and fast["optimizer"] == "adam" and not fast["conditional"]
    assert fast["attention"] == [] and fast["channels"] == [32, 64, 128, 256]
    assert (fast["noise"], fast["sampler"], fast["sample_steps"]) == ("lognormal", "heun-sde", 250)
    reference = _config(["--recipe", "reference"])     # the tutorial's: uniform times, EM 500
    assert (reference["noise"], reference["sampler"], reference["sample_steps"]) == ("uniform", "em", 500)
    cond = _config([], preset="mnist-cond")
    assert (cond["recipe"], cond["optimizer"], cond["schedule"], cond["conditional"]) == \
        ("cond", "adamw", "cosine-then-constant", True)
    assert cond["attention"] == [5, 2] and cond["clip"] == 1.0 and cond["p_uncond"] == 0.1


def script(*args):
    """Run the example in a fresh interpreter (tinydiff importable from this checkout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_documents_every_flag():
    out = script("--help")
    assert out.returncode == 0
    for flag in ("--backend", "--epochs", "--batch-size", "--lr", "--seed", "--out", "--sampler",
                 "--sample-steps", "--resume", "--sample-only", "--recipe", "--limit"):
        assert flag in out.stdout, flag


@pytest.mark.skipif(td.probe_cupy() is None, reason="a working GPU is present")
def test_cupy_without_gpu_is_a_clear_error(tmp_path):
    out = script("--backend", "cupy", "--out", str(tmp_path / "r"))
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "--backend numpy" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 3
    assert not (tmp_path / "r").exists()     # nothing started
