"""The U-Net presets through the command line, end to end on tiny subsets: Fashion-MNIST
(conditional), CIFAR-10 (flips, RGB) and a user's image folder (class sub-folders, resized);
each writes the MNIST run's outputs, and `tinydiff sample` / `evaluate` read it back."""
import json
import os
import warnings

import numpy as np
import pytest

from tinydiff import cli, data

from conftest import data_dir

UNET_TINY = ["--base-channels", "8", "--heads", "2", "--limit", "32", "--batch-size", "16",
             "--sample-steps", "3", "--per-class", "1", "--num-samples", "4", "--no-progress",
             "--warmup", "2", "--epochs", "1"]

needs_data = pytest.mark.skipif(data_dir() is None, reason="needs ../shared/data (Fashion-MNIST, "
                                "CIFAR-10)")


def call(*argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _one_line_error(err, name):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err


@needs_data
def test_fashion_mnist_conditional_unet_run(tmp_path, capsys):
    import matplotlib.image as mpimg
    out = tmp_path / "fashion"
    assert call("train", "--preset", "fashion-mnist-cond", "--out", out, "--data", data_dir(),
                *UNET_TINY) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "unet-28s" and config["model_class"] == "UNet"
    # the per-class grid: 10 rows of 1 generated image, a band, then 10 rows of real ones
    grid = mpimg.imread(out / "samples" / "epoch_001.png")
    alone = 2 * (10 * 30 + 2)
    assert grid.shape[0] == 2 * alone + 2 * 6
    # the loss plot has the gradient norm beside the loss (three panels, wider than two)
    assert mpimg.imread(out / "loss.png").shape[1] > 1200
    npz = tmp_path / "s.npz"
    assert call("sample", out, "--labels", "1", "--num-samples", "3", "--steps", "3", "--out", npz,
                "--no-progress") == 0
    with np.load(npz) as f:
        assert f["images"].shape == (3, 1, 28, 28) and f["images"].dtype == np.float32
        assert f["labels"].tolist() == [1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capsys.readouterr()
        assert call("evaluate", out, "--samples", "20", "--sampler", "heun", "--steps", "2",
                    "--data", data_dir(), "--no-progress") == 0
    assert "U-Net unet-28s cond." in capsys.readouterr().out


@needs_data
def test_cifar10_unet_run_is_rgb_and_flips(tmp_path):
    out = tmp_path / "cifar"
    assert call("train", "--preset", "cifar10", "--out", out, "--data", data_dir(),
                *UNET_TINY) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hflip"] is True and config["dataset"] == "cifar-10"
    assert config["group_channels"] is None          # the model's default, 4 channels per group
    from tinydiff import experiments as E
    run = E.load_run(str(out))
    assert run.model.norm_out.num_groups == 2        # 8 base channels: 2 groups of 4
    npz = tmp_path / "c.npz"
    assert call("sample", out, "--num-samples", "2", "--steps", "3", "--out", npz,
                "--no-progress") == 0
    with np.load(npz) as f:
        assert f["images"].shape == (2, 3, 32, 32) and "labels" not in f.files


def _write_folder(root, sizes=((36, 40), (40, 36)), per_class=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs"]):
        os.makedirs(root / name)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_conditional_run_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "pets"
    _write_folder(folder)
    out = tmp_path / "run"
    tiny = [f for f in UNET_TINY if f not in ("--limit", "32")]
    assert call("train", "--preset", "folder-cond", "--dataset", f"folder:{folder}",
                "--image-size", "16", "--channel-mult", "1,2", "--attention", "none", "--out", out,
                "--group-channels", "1", *tiny) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["image_shape"] == [3, 16, 16] and config["num_classes"] == 2
    from tinydiff import experiments as E
    assert config["group_channels"] == 1 and E.load_run(str(out)).model.norm_out.num_groups == 8
    npz = tmp_path / "f.npz"
    assert call("sample", out, "--per-class", "2", "--steps", "3", "--out", npz,
                "--no-progress") == 0
    with np.load(npz) as f:
        assert f["images"].shape == (4, 3, 16, 16) and f["labels"].tolist() == [0, 0, 1, 1]
    # evaluation needs a classifier for such images: said in one line
    capsys.readouterr()
    assert call("evaluate", out, "--samples", "4") == 2
    _one_line_error(capsys.readouterr().err, "--classifier")


@pytest.mark.parametrize("argv, name", [
    (["--preset", "folder"], "--dataset folder:PATH"),
    (["--dataset", "folder:/no/such/folder"], "--dataset"),
    (["--dataset", "svhn"], "--dataset"),
    (["--image-size", "32"], "--image-size"),
    (["--model", "unet-99"], "--model"),
    (["--dataset", "cifar-10", "--model", "scorenet"], "28x28"),
    (["--preset", "fashion-mnist", "--attention", "5"], "attention"),
    (["--preset", "cifar10", "--channel-mult", "1,0"], "--channel-mult"),
    (["--preset", "cifar10", "--dropout", "1.5"], "--dropout"),
    (["--preset", "cifar10", "--group-channels", "0"], "--group-channels"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_unet_and_data_flags_are_one_line_errors(argv, name, tmp_path, capsys):
    assert call("train", "--out", tmp_path / "run", "--no-progress", *argv) == 2
    _one_line_error(capsys.readouterr().err, name)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_folder_with_no_class_subfolders_cannot_train_a_conditional_model(tmp_path, capsys,
                                                                         monkeypatch):
    from PIL import Image
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "cache"))
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(flat / f"{i}.png")
    assert call("train", "--preset", "folder-cond", "--dataset", f"folder:{flat}", "--out",
                tmp_path / "run", "--no-progress") == 2
    # (after the loader's own line saying what it read)
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[tinydiff.data]")]
    _one_line_error("\n".join(err), "sub-folder")
    assert data.image_folder_path(f"folder:{flat}") == str(flat)
