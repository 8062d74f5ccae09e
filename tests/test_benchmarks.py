"""The benchmark scripts say what they measured: without PyTorch the speed benchmark times
tinydiff alone and says so, on stdout (beside the table) and on stderr."""
import importlib.util
import os

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
