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
