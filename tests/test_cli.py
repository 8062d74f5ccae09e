"""The command line end to end on a tiny subset (train, sample to .npz with the documented keys,
evaluate with a guidance sweep), and a table of bad values: each is refused with exit code 2 (1
for faults found later), one line naming the flag, no traceback, before any data is loaded, and
without touching what is already on disk.
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tinydiff import cli, data, train
from conftest import data_dir, make_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--channels", "4,4,8,8", "--embed-dim", "8", "--heads", "2", "--limit", "32",
        "--batch-size", "16", "--sample-steps", "3", "--per-class", "1", "--num-samples", "4",
        "--no-progress", "--warmup", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The real data folder, or generated MNIST files (their checksums registered)."""
    if data_dir() is not None:
        yield data_dir()
        return
    folder = str(tmp_path_factory.mktemp("fake_data"))
    saved = dict(data.DATASETS["mnist"]["md5"])
    data.DATASETS["mnist"]["md5"].update(make_fake_mnist(folder, (("train", 64), ("test", 32))))
    yield folder
    data.DATASETS["mnist"]["md5"].clear()
    data.DATASETS["mnist"]["md5"].update(saved)


def call(*argv):
    """cli.main in this process: (exit code); argparse's exits become codes too."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    """One tiny conditional and one tiny unconditional run, trained through the command line."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, preset in (("cond", "mnist-cond"), ("uncond", "mnist")):
        out[name] = str(base / name)
        assert call("train", "--preset", preset, "--out", out[name], "--data", root, *TINY) == 0
    return out


def test_train_writes_per_class_grids_and_records_the_preset(runs):
    import matplotlib.image as mpimg

    state = train.load_checkpoint(os.path.join(runs["cond"], "checkpoint.npz"))
    config = state["config"]
    assert (config["preset"], config["recipe"], config["conditional"]) == ("mnist-cond", "cond", True)
    assert config["attention"] == [5, 2] and config["optimizer"] == "adamw"
    assert "label_embed.weight" in state["model"] and "attn3.qkv.weight" in state["model"]
    grid = mpimg.imread(os.path.join(runs["cond"], "samples", "epoch_001.png"))
    # one image per class, one row per class: a 10 x 1 grid (28 px + 2 padding, upscaled 2x)
    assert grid.shape[0] == 2 * (10 * 30 + 2) and grid.shape[1] == 2 * (30 + 2)
    with np.load(os.path.join(runs["cond"], "samples_em.npz")) as f:
        assert np.array_equal(f["labels"], np.arange(10))
        assert f["images"].min() >= 0 and f["images"].max() <= 1
    assert "label_embed.weight" not in train.load_checkpoint(
        os.path.join(runs["uncond"], "checkpoint.npz"))["model"]


def test_sample_writes_the_documented_npz(runs, tmp_path, capsys):
    out = tmp_path / "nines.npz"
    assert call("sample", runs["cond"], "--labels", "9,2", "--num-samples", "6", "--steps", "3",
                "--guidance", "2", "--out", out, "--no-progress") == 0
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
        assert images.shape == (6, 1, 28, 28) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1
        assert labels.tolist() == [9, 9, 9, 2, 2, 2] and float(f["guidance"]) == 2.0
        assert int(f["nfe"]) == 3 and str(f["sampler"]) == "em"
    assert (tmp_path / "nines.png").is_file()
    # the same seed gives the same images; --per-class K gives K of each class
    assert call("sample", runs["cond"], "--labels", "9,2", "--num-samples", "6", "--steps", "3",
                "--guidance", "2", "--out", tmp_path / "again.npz", "--no-progress") == 0
    assert np.array_equal(np.load(tmp_path / "again.npz")["images"], images)
    assert call("sample", runs["cond"], "--per-class", "2", "--steps", "3", "--out",
                tmp_path / "pc.npz", "--grid", tmp_path / "grid.png", "--no-progress") == 0
    assert np.array_equal(np.load(tmp_path / "pc.npz")["labels"], np.repeat(np.arange(10), 2))
    # an unconditional run: images only, no labels
    assert call("sample", runs["uncond"], "--num-samples", "3", "--steps", "3", "--out",
                tmp_path / "u.npz", "--no-progress") == 0
    with np.load(tmp_path / "u.npz") as f:
        assert "labels" not in f.files and f["images"].shape == (3, 1, 28, 28)


def test_evaluate_prints_rows_and_a_guidance_sweep(runs, root, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # 20 samples < 128 feature dimensions
        capsys.readouterr()
        assert call("evaluate", runs["cond"], "--samples", "20", "--steps", "3", "--guidance",
                    "0,2", "--header", "--plot", plot, "--data", root, "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| mnist")]
    assert lines[0].startswith("| data set | model | sampler | steps (NFE) | guidance |")
    assert [r[4] for r in rows] == ["0", "2"] and all(r[7].startswith("cond. acc. ") for r in rows)
    assert plot.is_file() and (tmp_path / "sweep.csv").read_text().count("\n") == 3
    # scoring the .npz of `tinydiff sample` instead of drawing
    npz = tmp_path / "s.npz"
    assert call("sample", runs["cond"], "--num-samples", "20", "--steps", "3", "--out", npz,
                "--no-progress") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capsys.readouterr()
        assert call("evaluate", runs["cond"], "--samples", "20", "--from-file", npz, "--data",
                    root) == 0
        test_row = capsys.readouterr().out
        # the same images against the training images: another distance, the same floor
        assert call("evaluate", runs["cond"], "--samples", "20", "--from-file", npz, "--data",
                    root, "--against", "train") == 0
        train_row = capsys.readouterr().out
    assert "cond. acc." in test_row and "| mnist (vs train) |" in train_row

    def fd_and_floor(row):
        fd, floor = row.strip().strip("|").split("|")[6].split()
        return float(fd), float(floor.strip("()"))
    (fd_test, floor_a), (fd_train, floor_b) = fd_and_floor(test_row), fd_and_floor(train_row)
    assert floor_a == floor_b and fd_test != fd_train


def test_examples_are_thin_calls_into_the_cli():
    for name in ("mnist_uncond.py", "mnist_cond.py", "fashion_mnist.py", "cifar10.py",
                 "image_folder.py"):
        text = open(os.path.join(ROOT, "examples", name)).read()
        assert "cli.train_main(" in text and "argparse" not in text and len(text.splitlines()) < 40


# -- bad values ----------------------------------------------------------------------------------

TRAIN_BAD = [  # (flags, what the one-line message must name)
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--limit", "0"], "--limit"),
    (["--sample-steps", "1"], "--sample-steps"), (["--num-samples", "0"], "--num-samples"),
    (["--sample-every", "0"], "--sample-every"), (["--per-class", "-1"], "--per-class"),
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "fast"], "--lr"),
    (["--sigma", "1"], "--sigma"), (["--sigma", "-2"], "--sigma"),
    (["--ema", "1"], "--ema"), (["--ema", "1.5"], "--ema"), (["--ema-warmup", "maybe"], "--ema-warmup"),
    (["--warmup", "-1"], "--warmup"), (["--clip", "-1"], "--clip"), (["--clip", "0"], "--clip"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--min-lr", "2"], "--min-lr"),
    (["--channels", "32,64"], "--channels"), (["--channels", "32,,64,8"], "--channels"),
    (["--channels", "32,64,0,8"], "--channels"), (["--embed-dim", "7"], "--embed-dim"),
    (["--p-uncond", "1.2"], "--p-uncond"), (["--attention", "7"], "--attention"),
    (["--preset", "mnist-cond", "--heads", "3"], "num_heads=3"), (["--heads", "0"], "--heads"),
    (["--guidance", "inf"], "--guidance"), (["--preset", "celeba"], "--preset"),
    (["--recipe", "slow"], "--recipe"), (["--sampler", "ddim"], "--sampler"),
    (["--sampler", "em", "--churn", "10"], "--churn"), (["--sampler", "heun-sde", "--churn", "x"], "--churn"),
    (["--resume", "--sample-only"], "--sample-only"), (["--seed", "-1"], "--seed"),
    (["--data", "/nonexistent/folder"], "--data"), (["--bpd", "-2"], "--bpd"),
    (["--p-uniform", "1.5"], "--p-uniform"), (["--noise", "uniform", "--p-uniform", "0.2"], "--p-uniform"),
    (["--grid-steps", "1"], "--grid-steps"), (["--grid-sampler", "ddim"], "--grid-sampler"),
    (["--sampler", "em", "--rho", "3"], "--rho"), (["--rho", "-1"], "--rho"),
    (["--sampler", "dpm2m", "--s-noise", "1.05"], "--s-noise"), (["--s-noise", "0"], "--s-noise"),
    (["--sampler", "dpm2m-sde", "--s-tmin", "0.1"], "--s-tmin"), (["--s-tmin", "-1"], "--s-tmin"),
]


def _one_line_error(err, name):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and name in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("flags, name", TRAIN_BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_train_flags_are_refused_before_anything_starts(flags, name, tmp_path, capsys):
    out = tmp_path / "run"
    assert call("train", "--out", out, *flags) == 2
    captured = capsys.readouterr()
    _one_line_error(captured.err, name)
    assert "[tinydiff.data]" not in captured.out + captured.err     # no data set was loaded
    assert not out.exists()                                          # nothing was started


def test_impossible_out_folders(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):
        assert call("train", "--out", out) == 2
        _one_line_error(capsys.readouterr().err, "--out")
    assert a_file.read_text() == "keep me"


def _snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_evaluate_sweeps_samplers_at_equal_score_evaluations(runs, root, tmp_path, capsys):
    plot = tmp_path / "nfe.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capsys.readouterr()
        assert call("evaluate", runs["uncond"], "--samples", "20", "--sampler", "em,heun",
                    "--nfe", "3,5", "--plot", plot, "--data", root, "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| mnist")]
    # em: steps = NFE; heun: 2 evaluations per step, one less in all (3 -> 2 steps, 5 -> 3)
    assert [(r[2], r[3]) for r in rows] == [("em", "3 (3)"), ("em", "5 (5)"), ("heun", "2 (3)"),
                                           ("heun", "3 (5)")]
    csv_rows = (tmp_path / "nfe.csv").read_text().splitlines()
    assert plot.is_file() and csv_rows[0].startswith("sampler,steps,nfe") and len(csv_rows) == 5


def test_churn_sets_the_noise_of_heun_sde(runs, tmp_path):
    def draw(name, *flags):
        assert call("sample", runs["uncond"], "--num-samples", "3", "--steps", "4", "--out",
                    tmp_path / name, "--no-progress", *flags) == 0
        with np.load(tmp_path / name) as f:
            return f["images"], f
    heun, _ = draw("h.npz", "--sampler", "heun")
    churn0, f = draw("c0.npz", "--sampler", "heun-sde", "--churn", "0")
    default, _ = draw("d.npz", "--sampler", "heun-sde")
    assert np.array_equal(churn0, heun)            # S_churn = 0 is the deterministic sampler
    assert not np.array_equal(default, heun)       # the default churn (40) adds noise
    assert float(np.load(tmp_path / "c0.npz")["churn"]) == 0.0


def test_sample_trajectory_writes_animations_and_strips(runs, root, tmp_path):
    from PIL import Image
    gif = tmp_path / "traj.gif"
    assert call("sample", runs["cond"], "--num-samples", "10", "--steps", "6", "--sampler", "heun",
                "--trajectory", gif, "--frames", "4", "--trajectory-images", "3", "--data", root,
                "--out", tmp_path / "s.npz", "--no-progress") == 0
    with Image.open(gif) as im:
        assert im.n_frames == 4
    # forward: the clean images (t = 0, where heun's last frame also is), then the 3 other times
    with Image.open(tmp_path / "traj_forward.gif") as im:
        assert im.n_frames == 4
    strip = Image.open(tmp_path / "traj.png")
    forward = Image.open(tmp_path / "traj_forward.png")
    # 3 rows (images) by 4 columns (frames) of 28x28 tiles with 2-pixel gaps, upscaled 2x
    assert strip.size == forward.size == (2 * (4 * 30 + 2), 2 * (3 * 30 + 2))
    first_column = np.asarray(forward.convert("L"))[4:60, 4:60]
    assert first_column.std() > 10                 # a real image (strokes), not blank
    # Euler-Maruyama's last step reports t - dt < 0: the forward frames start at t = 0 anyway
    assert call("sample", runs["uncond"], "--num-samples", "2", "--steps", "4", "--trajectory",
                tmp_path / "em.gif", "--frames", "3", "--data", root, "--out", tmp_path / "e.npz",
                "--no-progress") == 0
    with Image.open(tmp_path / "em_forward.gif") as im:
        assert im.n_frames == 3      # the last frame's time is clamped to t = 0: the clean images


def test_bad_sample_and_evaluate_values(runs, tmp_path, capsys):
    cond, uncond = runs["cond"], runs["uncond"]
    before = {k: _snapshot(v) for k, v in runs.items()}
    cases = [  # (argv, exit code, what the message names)
        (["sample", cond, "--num-samples", "0"], 2, "--num-samples"),
        (["sample", cond, "--labels", "10"], 2, "--labels 10"),
        (["sample", cond, "--labels=-1,3"], 2, "--labels -1"),
        (["sample", cond, "--labels", "1.5"], 2, "--labels"),
        (["sample", cond, "--labels", "1", "--per-class", "2"], 2, "--per-class"),
        (["sample", cond, "--guidance", "nan"], 2, "--guidance"),
        (["sample", cond, "--steps", "1"], 2, "--steps"),
        (["sample", cond, "--out", tmp_path / "x.txt"], 2, "--out"),
        (["sample", cond, "--out", tmp_path], 2, "--out"),
        (["sample", uncond, "--labels", "1"], 2, "--labels"),
        (["sample", uncond, "--per-class", "2"], 2, "--per-class"),
        (["sample", uncond, "--guidance", "2"], 2, "--guidance"),
        (["sample", tmp_path / "no_run"], 1, "no_run"),
        (["sample", tmp_path], 1, "has no checkpoint.npz"),
        (["evaluate", cond, "--samples", "-5"], 2, "--samples"),
        (["evaluate", cond, "--guidance", "1,x"], 2, "--guidance"),
        (["evaluate", uncond, "--guidance", "1"], 2, "--guidance"),
        (["evaluate", cond, "--from-file", tmp_path / "none.npz"], 2, "--from-file"),
        (["evaluate", cond, "--from-file", tmp_path / "s.npz", "--guidance", "0,1"], 2, "--from-file"),
        (["evaluate", cond, "--sampler", "em,fast"], 2, "--sampler"),
        (["evaluate", cond, "--steps", "10,1"], 2, "--steps"),
        (["evaluate", cond, "--nfe", "2", "--sampler", "pc"], 2, "--nfe"),
        (["evaluate", cond, "--nfe", "10", "--steps", "10"], 2, "--steps"),
        (["evaluate", cond, "--sampler", "em,heun", "--guidance", "0,1"], 2, "one thing at a time"),
        (["sample", cond, "--trajectory", tmp_path / "t.png"], 2, "--trajectory"),
        (["sample", cond, "--frames", "1"], 2, "--frames"),
        (["sample", cond, "--churn", "5"], 2, "--churn"),
        (["sample", cond, "--sampler", "heun-sde", "--churn", "-1"], 2, "--churn"),
        (["evaluate", cond, "--sampler", "em,heun", "--churn", "5"], 2, "--churn"),
        (["sample", cond, "--rho", "3"], 2, "--rho"), (["sample", cond, "--rho", "0"], 2, "--rho"),
        (["sample", cond, "--sampler", "heun", "--s-noise", "1.1"], 2, "--s-noise"),
        (["evaluate", cond, "--sampler", "em,pc", "--rho", "3"], 2, "--rho"),
        (["evaluate", cond, "--sampler", "em,heun", "--s-noise", "1.1"], 2, "--s-noise"),
        ([], 2, "train,sample,evaluate"), (["fly"], 2, "fly"),
    ]
    (tmp_path / "s.npz").write_bytes(b"")
    for argv, code, name in cases:
        assert call(*argv) == code, argv
        captured = capsys.readouterr()
        _one_line_error(captured.err, name)
    assert {k: _snapshot(v) for k, v in runs.items()} == before     # nothing on disk changed


def test_in_a_fresh_interpreter_there_is_no_traceback(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for argv, code in ((["train", "--epochs", "0"], 2), (["sample", runs["cond"], "--labels", "12"], 2),
                       (["sample", str(tmp_path / "none")], 1)):
        out = subprocess.run([sys.executable, "-m", "tinydiff", *argv], capture_output=True,
                             text=True, timeout=120, env=env, cwd=str(tmp_path))
        assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_grids_use_their_own_sampler_and_steps(root, tmp_path, monkeypatch):
    # the per-epoch grids with --grid-sampler / --grid-steps, the final samples with --sampler /
    # --sample-steps; the fast recipe's grids default to 25 steps, its final samples to 250
    from tinydiff import experiments as E, sampling
    config = E.resolve_config({"preset": "mnist"})
    assert (config["sampler"], config["sample_steps"], config["grid_steps"]) == ("heun-sde", 250, 25)
    assert E.resolve_config({"preset": "mnist-cond"})["grid_steps"] is None
    calls = []
    real = sampling.sample

    def spy(sampler, score_fn, sde, shape, num_steps=500, **kw):
        calls.append((sampler, num_steps))
        return real(sampler, score_fn, sde, shape, num_steps, **kw)
    monkeypatch.setattr(sampling, "sample", spy)
    out = tmp_path / "grids"
    assert call("train", "--preset", "mnist", "--out", out, "--data", root, *TINY, "--epochs", "2",
                "--sampler", "heun", "--grid-sampler", "dpm2m-sde", "--grid-steps", "4") == 0
    assert calls == [("dpm2m-sde", 4), ("dpm2m-sde", 4), ("heun", 3)]
    assert (out / "samples" / "epoch_002.png").is_file() and (out / "samples_heun.png").is_file()
    # without the grid flags the grids follow --sampler and --sample-steps (here: not fast's 25)
    calls.clear()
    assert call("train", "--preset", "mnist-cond", "--out", tmp_path / "cond", "--data", root,
                *TINY) == 0
    assert calls == [("em", 3), ("em", 3)]


def test_rho_and_s_noise_reach_the_sampler(runs, root, tmp_path, monkeypatch, capsys):
    # train: the flags (or a recipe's values) go to the samplers they apply to and are dropped
    # for a grid sampler they do not; sample and evaluate pass theirs to the rows they fit
    from tinydiff import sampling
    calls = []
    real = sampling.sample

    def spy(sampler, score_fn, sde, shape, num_steps=500, **kw):
        calls.append((sampler, {k: kw[k] for k in ("rho", "S_noise", "S_churn") if k in kw}))
        return real(sampler, score_fn, sde, shape, num_steps, **kw)
    monkeypatch.setattr(sampling, "sample", spy)
    assert call("train", "--preset", "mnist", "--out", tmp_path / "r", "--data", root, *TINY,
                "--sampler", "dpm2m-sde", "--rho", "2", "--s-noise", "1.05",
                "--grid-sampler", "em") == 0
    assert calls == [("em", {}), ("dpm2m-sde", {"rho": 2.0, "S_noise": 1.05})]
    calls.clear()
    assert call("sample", runs["uncond"], "--sampler", "heun", "--rho", "3", "--steps", "3",
                "--num-samples", "2", "--out", tmp_path / "s.npz", "--no-progress") == 0
    assert calls == [("heun", {"rho": 3.0})]
    assert float(np.load(tmp_path / "s.npz")["rho"]) == 3.0
    calls.clear()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert call("evaluate", runs["uncond"], "--samples", "10", "--sampler", "em,dpm2m-sde",
                    "--steps", "3", "--rho", "1.5", "--s-noise", "1.1", "--data", root,
                    "--no-progress") == 0
    assert calls == [("em", {}), ("dpm2m-sde", {"rho": 1.5, "S_noise": 1.1})]
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| mnist")]
    assert "| em |" in rows[0] and "dpm2m-sde (rho 1.5, S_noise 1.1)" in rows[1]


def test_a_runs_own_sampler_keeps_its_settings(runs, tmp_path, monkeypatch):
    # the fast recipe's heun-sde settings (S_noise 1.05, S_tmin 0.01) follow its sampler into
    # tinydiff sample; flags override them; another sampler does not inherit them
    from tinydiff import sampling
    calls = []
    real = sampling.sample

    def spy(sampler, score_fn, sde, shape, num_steps=500, **kw):
        calls.append((sampler, {k: kw[k] for k in ("rho", "S_noise", "S_tmin", "S_churn") if k in kw}))
        return real(sampler, score_fn, sde, shape, num_steps, **kw)
    monkeypatch.setattr(sampling, "sample", spy)
    config = train.load_checkpoint(os.path.join(runs["uncond"], "checkpoint.npz"))["config"]
    assert (config["sampler"], config["s_noise"], config["s_tmin"]) == ("heun-sde", 1.05, 0.01)

    def draw(*flags):
        calls.clear()
        assert call("sample", runs["uncond"], "--steps", "3", "--num-samples", "2", "--out",
                    tmp_path / "s.npz", "--no-progress", *flags) == 0
        return calls[0]
    assert draw("--sampler", "heun-sde") == ("heun-sde", {"S_noise": 1.05, "S_tmin": 0.01})
    assert float(np.load(tmp_path / "s.npz")["s_noise"]) == 1.05
    assert draw("--sampler", "heun-sde", "--s-noise", "1") == ("heun-sde", {"S_noise": 1.0, "S_tmin": 0.01})
    assert draw("--sampler", "dpm2m-sde") == ("dpm2m-sde", {})
    assert draw("--sampler", "em") == ("em", {})
