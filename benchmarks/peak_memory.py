"""Peak memory of a training step, tinydiff against PyTorch, measured the same way for both: the
growth of the process's peak resident set (Linux VmHWM) over a training step.

bench_scorenet.py reports tinydiff's peak with tracemalloc, which sees every NumPy allocation but
none of PyTorch's (its CPU allocator calls malloc directly). Here each framework runs in a fresh
process of its own: build the model pair and the batch (bench_scorenet.build_pair /
train_steps), reset the kernel's peak counter (writing 5 to /proc/self/clear_refs), run the
first training step and read the new peak less the resident set before it ("first step": every
activation, gradient and the Adam state, nothing allocated before); then the same for a second
step ("second step": how far above its steady state a step drives the process). The second
column favours tinydiff, which keeps freed memory for reuse (docs: benchmarks/SPEED.md,
"Allocator"), so that its second step finds most of what it needs already resident; the first
column is the fair comparison of working sets.

    python3 benchmarks/peak_memory.py [--model scorenet|cond|unet-28s|...] [--batches 64 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_peak_mb(step):
    """MB above the resident set that a call of ``step`` reaches: (first call, second call)."""
    peaks = []
    for _ in range(2):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                   # resets VmHWM to the current VmRSS
        before = _status_kb("VmRSS")
        step()
        peaks.append((_status_kb("VmHWM") - before) / 1024)
    return peaks


def _child(framework, model_name, batch):
    sys.path.insert(0, HERE)
    import bench_scorenet as B
    import tinydiff as td
    backend = td.get_backend("numpy")
    cond = model_name == "cond"
    unet = model_name if model_name in B.UNET_CONFIGS else None
    sde, model, opt, tmodel, topt = B.build_pair(backend, "cpu", cond, unet)
    step_td, step_torch = B.train_steps(backend, "cpu", batch, sde, model, opt, tmodel, topt)
    step = step_td if framework == "tinydiff" else step_torch
    print(json.dumps({"peak_mb": step_peak_mb(step)}))   # [first step, second step]


def measure(framework, model_name, batch):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", framework,
                          "--model", model_name, "--batches", str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv=None):
    sys.path.insert(0, HERE)
    from bench_scorenet import UNET_CONFIGS, torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["scorenet", "cond"] + list(UNET_CONFIGS), default="scorenet")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--child", choices=["tinydiff", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.model, args.batches[0])
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("peak_memory.py needs Linux's /proc/self/clear_refs (the peak-RSS reset)")
    frameworks = ["tinydiff"] + (["torch"] if torch is not None else [])
    print(f"model {args.model}: peak resident growth of a training step (MB), a fresh process each")
    cols = [f"{f}, {which} step" for which in ("first", "second") for f in frameworks]
    two = len(frameworks) == 2
    print("| batch | " + " | ".join(cols) + (" | ratio, first step |" if two else " |"))
    print("|---" * (len(cols) + 1 + two) + "|")
    for batch in args.batches:
        mb = [measure(f, args.model, batch) for f in frameworks]        # [[first, second], ...]
        cells = [mb[k][which] for which in (0, 1) for k in range(len(frameworks))]
        ratio = f" {mb[0][0] / mb[1][0]:.2f} |" if two else ""
        print(f"| {batch} | " + " | ".join(f"{m:.1f}" for m in cells) + " |" + ratio)
    if torch is None:
        print("PyTorch is not installed: tinydiff only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
