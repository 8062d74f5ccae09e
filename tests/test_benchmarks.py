"""The benchmark scripts say what they measured: without PyTorch the speed benchmark times
tinydiff alone and says so, on stdout (beside the table) and on stderr."""
import importlib.util
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def load_script(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scorenet_says_when_pytorch_is_absent(monkeypatch, capsys):
    bench = load_script("benchmarks/bench_scorenet.py", "bench_scorenet_under_test")
    monkeypatch.setattr(bench, "torch", None)
    bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--batches", "2", "--gap-ms", "0"])
    out, err = capsys.readouterr()
    assert "PyTorch is not installed" in err
    assert "tinydiff only" in out and "PyTorch is not installed" in out
    assert " nan" not in out and "PyTorch ms" not in out


def test_latent_speed_times_both_models_in_one_run(capsys):
    bench = load_script("benchmarks/latent_speed.py", "latent_speed_under_test")
    assert bench.main(["--pixel-base", "8", "--latent-base", "8", "--ae-base", "4", "--repeats",
                       "1", "--sample-batch", "4", "--nfe", "2"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| unet")]
    assert len(rows) == 2 and "1x28x28 pixels" in rows[0] and "2x7x7 codes" in rows[1]
    assert "latent / pixel: training" in out and "nan" not in out


def test_noise_mean_diagnostic_against_exact_answers():
    """benchmarks/noise_mean.py on scores whose answer is known: the exact score of a point mass
    (every image the same) denoises perfectly, so the slope is 1 and the brightness error 0; the
    same score with the noise's per-image mean taken out of its estimate has slope 0 and leaves
    exactly sigma |mean z| in the brightness (the column 'if ignored')."""
    from tinydiff.sde import VESDE
    diag = load_script("benchmarks/noise_mean.py", "noise_mean_under_test")
    sde = VESDE(25.0)
    x0 = np.full((64, 1, 8, 8), 0.3, np.float32)

    def exact(x, t):                      # grad log N(x; x0, std^2 I)
        std = sde.marginal_std(t)[:, None, None, None]
        return -(x - x0) / std ** 2

    def blind(x, t):                      # the exact score, but no per-image mean of the noise
        s = exact(x, t)
        return s - s.mean((1, 2, 3), keepdims=True)

    sigmas = [0.5, 2.0, 5.0, 9.0, 50.0]            # 50 > sigma(T) = 9.8: skipped
    good, bad = diag.brightness_rows(exact, sde, x0, sigmas), diag.brightness_rows(blind, sde, x0, sigmas)
    assert [r[0] for r in good] == [0.5, 2.0, 5.0, 9.0]
    for (sigma, slope, err, ignored), (_, bslope, berr, bignored) in zip(good, bad):
        assert abs(slope - 1) < 1e-3 and err < 1e-4 * sigma
        assert abs(bslope) < 1e-3 and abs(berr - bignored) < 1e-4 * sigma and ignored == bignored
        # sigma |mean z| over 64 images of 64 pixels: about sigma * sqrt(2 / pi) / 8
        assert 0.6 * sigma / 8 < ignored < 1.0 * sigma / 8
    images = np.stack([np.full((1, 4, 4), v) for v in (0.0, 0.04, 0.3, 0.5, 0.6, 1.0)])
    assert diag.dark_and_bright(images) == (2 / 6, 2 / 6)


def test_peak_memory_counts_what_a_step_touches():
    """benchmarks/peak_memory.py's measure on a step whose peak is known: 64 MB of fresh pages
    (an anonymous mapping, so that no memory the process already holds is reused) written and
    unmapped. Each call's peak growth is their size, and a step that touches nothing grows
    nothing."""
    import mmap
    import pytest
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    pm = load_script("benchmarks/peak_memory.py", "peak_memory_under_test")

    def big():
        m = mmap.mmap(-1, 64 * 2**20)
        pages = np.frombuffer(m, dtype=np.uint8)
        pages[::4096] = 1                 # one byte a page makes every page resident
        del pages
        m.close()

    first, second = pm.step_peak_mb(big)
    assert 63 < first < 66 and 63 < second < 66
    idle_first, idle_second = pm.step_peak_mb(lambda: None)
    assert idle_first < 2 and idle_second < 2
