"""Latent diffusion through the command line, end to end on tiny subsets of real Fashion-MNIST:
the autoencoder run (fashion-ae), the latent run on its codes (fashion-latent-cond, codes cached
once), sampling to the pixel .npz contract, evaluation with the shipped classifier, and the
refusals (no autoencoder, not an autoencoder, another code shape)."""
import json
import shutil
import warnings

import numpy as np
import pytest

from tinydiff import cli, experiments

from conftest import data_dir

needs_data = pytest.mark.skipif(data_dir() is None, reason="needs ../shared/data (Fashion-MNIST)")

AE_TINY = ["--base-channels", "4", "--limit", "32", "--batch-size", "16", "--warmup", "2",
           "--epochs", "1", "--no-progress"]
LATENT_TINY = ["--base-channels", "8", "--heads", "2", "--limit", "32", "--batch-size", "16",
               "--sample-steps", "3", "--per-class", "1", "--warmup", "2", "--epochs", "1",
               "--no-progress"]


def call(*argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _one_line_error(err, name):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An autoencoder run and a latent run on it (trained once for this file)."""
    if data_dir() is None:
        pytest.skip("needs ../shared/data (Fashion-MNIST)")
    root = tmp_path_factory.mktemp("latent")
    ae, lat = root / "ae", root / "lat"
    assert call("train", "--preset", "fashion-ae", "--out", ae, "--data", data_dir(), *AE_TINY) == 0
    assert call("train", "--preset", "fashion-latent-cond", "--autoencoder", ae, "--out", lat,
                "--data", data_dir(), *LATENT_TINY) == 0
    return root, ae, lat


@needs_data
def test_autoencoder_run_writes_its_pictures_and_scale(runs):
    import matplotlib.image as mpimg
    _, ae, _ = runs
    for name in ("checkpoint.npz", "loss.png", "loss_epochs.csv", "encoded.png",
                 "samples/epoch_001.png"):
        assert (ae / name).exists(), name
    config = json.loads((ae / "config.json").read_text())
    assert config["model"] == "autoencoder" and config["model_class"] == "Autoencoder"
    # reconstructions above their originals: two rows of 8, a band, two rows of 8
    grid = mpimg.imread(ae / "samples" / "epoch_001.png")
    assert grid.shape[0] == 2 * (2 * (2 * 30 + 2) + 6)
    # encoded.png: originals, the two code channels, reconstructions (4 rows of 8)
    assert mpimg.imread(ae / "encoded.png").shape[:2] == (2 * (4 * 30 + 2), 2 * (8 * 30 + 2))
    model, digest = experiments.load_autoencoder(ae)
    assert model.latent_shape == (2, 7, 7) and float(model.latent_scale) != 1.0
    assert digest == experiments.checkpoint_hash(ae / "checkpoint.npz")


@needs_data
def test_latent_run_caches_codes_samples_and_evaluates(runs, tmp_path, capsys):
    root, ae, lat = runs
    config = json.loads((lat / "config.json").read_text())
    assert config["image_shape"] == [2, 7, 7] and config["latent"] is True
    assert config["autoencoder_hash"] == experiments.checkpoint_hash(ae / "checkpoint.npz")
    with np.load(lat / "latents.npz") as f:
        codes = f["latents"]
        assert codes.shape == (32, 2, 7, 7) and str(f["key"]).startswith(config["autoencoder_hash"])
    # the run's own samples are decoded images
    with np.load(lat / "samples_heun-sde.npz") as f:
        assert f["images"].shape == (10, 1, 28, 28)
    # training on: the codes are read back, not encoded again
    capsys.readouterr()
    assert call("train", "--preset", "fashion-latent-cond", "--autoencoder", ae, "--out", lat,
                "--data", data_dir(), "--resume", *LATENT_TINY[:-3], "--epochs", "2",
                "--no-progress") == 0
    assert "read from" in capsys.readouterr().out
    npz = tmp_path / "trousers.npz"
    assert call("sample", lat, "--labels", "1", "--num-samples", "3", "--steps", "3", "--out", npz,
                "--no-progress") == 0
    with np.load(npz) as f:
        images = f["images"]
        assert images.shape == (3, 1, 28, 28) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1 and f["labels"].tolist() == [1, 1, 1]
        assert f["latents"].shape == (3, 2, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capsys.readouterr()
        assert call("evaluate", lat, "--samples", "20", "--sampler", "heun", "--steps", "2",
                    "--data", data_dir(), "--no-progress") == 0
    row = capsys.readouterr().out
    assert "latent U-Net unet-latent cond." in row and "cond. acc." in row


@needs_data
def test_another_code_shape_is_refused(runs, capsys):
    root, ae, lat = runs
    ae4 = root / "ae4"
    assert call("train", "--preset", "fashion-ae", "--latent-channels", "4", "--out", ae4,
                "--data", data_dir(), *AE_TINY) == 0
    capsys.readouterr()
    assert call("train", "--preset", "fashion-latent-cond", "--autoencoder", ae4, "--out", lat,
                "--data", data_dir(), "--resume", *LATENT_TINY[:-3], "--epochs", "5",
                "--no-progress") == 2
    _one_line_error(capsys.readouterr().err, "2x7x7 codes")
    # an autoencoder replaced under a trained latent run: sampling refuses in one line
    moved = root / "lat_moved"
    shutil.copytree(lat, moved)
    config = json.loads((moved / "config.json").read_text())
    from tinydiff.checkpoint import load_checkpoint, save_checkpoint
    state = load_checkpoint(str(moved / "checkpoint.npz"))
    state["config"] = {**state["config"], "autoencoder": str(ae4)}
    save_checkpoint(str(moved / "checkpoint.npz"), state)
    assert config["autoencoder"] == str(ae)
    assert call("sample", moved, "--num-samples", "2", "--steps", "2", "--no-progress") == 1
    _one_line_error(capsys.readouterr().err, "4x7x7 codes")


@needs_data
def test_a_retrained_autoencoder_is_refused(runs, capsys):
    """An autoencoder trained further under a latent run: resuming and sampling refuse it (its
    checkpoint's hash changed), before any code is encoded again."""
    from tinydiff.checkpoint import load_checkpoint, save_checkpoint
    root, ae, _ = runs
    retrained = root / "ae_retrained"
    shutil.copytree(ae, retrained)
    assert call("train", "--out", retrained, "--resume", "--epochs", "2", "--data", data_dir(),
                "--no-progress") == 0
    again = root / "lat_again"
    assert call("train", "--preset", "fashion-latent-cond", "--autoencoder", ae, "--out", again,
                "--data", data_dir(), *LATENT_TINY) == 0
    state = load_checkpoint(str(again / "checkpoint.npz"))
    state["config"] = {**state["config"], "autoencoder": str(retrained)}
    save_checkpoint(str(again / "checkpoint.npz"), state)
    codes = (again / "latents.npz").read_bytes()
    capsys.readouterr()
    assert call("train", "--out", again, "--resume", "--epochs", "2", "--data", data_dir(),
                "--no-progress") == 2
    _one_line_error(capsys.readouterr().err, "retrained?")
    assert (again / "latents.npz").read_bytes() == codes
    assert call("sample", again, "--num-samples", "2", "--steps", "2", "--no-progress") == 1
    _one_line_error(capsys.readouterr().err, "retrained?")


@pytest.mark.parametrize("argv, name", [
    (["--preset", "fashion-latent-cond"], "--autoencoder RUN_DIR"),
    (["--preset", "fashion-mnist", "--autoencoder", "."], "--autoencoder applies"),
    (["--preset", "fashion-ae", "--corruption", "rotate"], "--corruption"),
    (["--preset", "fashion-ae", "--latent-noise", "-1"], "--latent-noise"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_latent_flags_are_one_line_errors(argv, name, tmp_path, capsys):
    assert call("train", "--out", tmp_path / "run", "--no-progress", *argv) == 2
    _one_line_error(capsys.readouterr().err, name)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@needs_data
def test_not_an_autoencoder_and_sampling_an_autoencoder_are_refused(runs, tmp_path, capsys):
    _, ae, lat = runs
    assert call("train", "--preset", "fashion-latent-cond", "--autoencoder", lat, "--out",
                tmp_path / "x", "--no-progress") == 2
    _one_line_error(capsys.readouterr().err, "is not an autoencoder")
    assert call("sample", ae, "--no-progress") == 2
    _one_line_error(capsys.readouterr().err, "is an autoencoder run")


@needs_data
def test_evaluate_scores_an_autoencoders_reconstructions(runs, capsys):
    from tinydiff import data, metrics
    from tinydiff.models.autoencoder import decode_all, encode_all
    _, ae, _ = runs
    capsys.readouterr()
    assert call("evaluate", ae, "--samples", "40", "--no-progress") == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| fashion-mnist")]
    assert len(line) == 1 and "2x7x7 codes, 8x" in line[0], line
    # the printed PSNR is that of the reconstructions of the same 40 test images
    model, _ = experiments.load_autoencoder(ae)
    test_x, test_y = data.load_dataset("fashion-mnist", "test", data_dir(), verbose=False)
    picked = metrics.select(test_x, 40, 0)
    recon = decode_all(model, encode_all(model, picked))
    mse = float(np.mean((recon - experiments.to_unit(picked)) ** 2))
    assert f"PSNR {10 * np.log10(1 / mse):.2f} dB" in line[0]
    # flags of score models are refused in one line
    assert call("evaluate", ae, "--guidance", "2", "--no-progress") == 2
    _one_line_error(capsys.readouterr().err, "--guidance")


@needs_data
def test_the_example_trains_both_runs_and_draws_trousers(tmp_path, monkeypatch):
    import importlib.util
    import os
    monkeypatch.setenv("TINYDIFF_DATA", data_dir())
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "fashion_latent.py")
    spec = importlib.util.spec_from_file_location("fashion_latent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--root", str(tmp_path), *LATENT_TINY]) == 0
    with np.load(tmp_path / "fashion_latent_cond" / "trousers.npz") as f:
        assert f["images"].shape == (8, 1, 28, 28) and set(f["labels"].tolist()) == {1}
    with np.load(tmp_path / "fashion_latent_cond" / "per_class.npz") as f:
        assert f["images"].shape == (80, 1, 28, 28)
