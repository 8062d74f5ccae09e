"""Speed of the reference ScoreNet (docs/design.md, the reference model): tinydiff against
PyTorch, in the same process.

Times, on 1x28x28 float32 inputs:
- one full training step (forward, the eq. 5 DSM loss of docs/design.md, backward, Adam step) at batch 64 and 128;
- one sampling step (a forward pass under no_grad) at batch 64;
- each conv, each transposed conv, the fused "embedding add + GroupNorm + swish" block and swish
  alone (forward + backward, with the shapes they have inside the model at batch 64);
- the peak memory of a training step (tracemalloc: it sees every NumPy allocation).

PyTorch (if importable) runs the same model, written below with the same parameter names and
loaded with tinydiff's weights, on the same threads. The two are timed interleaved (tinydiff,
torch, tinydiff, torch, ...) so that load from other processes hits both alike; each ratio is the
median over repeats of tinydiff time / PyTorch time of one adjacent pair.

    python3 benchmarks/bench_scorenet.py                 # the full table
    python3 benchmarks/bench_scorenet.py --repeats 5 --quick
    python3 benchmarks/bench_scorenet.py --backend cupy  # on a GPU (torch on CUDA if available)
    python3 benchmarks/bench_scorenet.py --model cond    # the class-conditional ScoreNet with
                                                         # attention, and the attention blocks
    python3 benchmarks/bench_scorenet.py --model unet-28s --quick   # a named U-Net configuration
                                                         # (tinydiff.models.UNET_CONFIGS) against
                                                         # torch_unet; per-op table: one ResBlock
                                                         # per level
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import tracemalloc


def _threads_from_argv(argv):
    """--threads N must take effect before NumPy (OpenBLAS) starts its thread pool."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


if _threads_from_argv(sys.argv):
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TINYDIFF_NUM_THREADS"):
        os.environ[var] = _threads_from_argv(sys.argv)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tinydiff as td  # noqa: E402
from tinydiff import argtypes as A  # noqa: E402
import tinydiff.nn.functional as F  # noqa: E402
from tinydiff import nn  # noqa: E402
from tinydiff.models import UNET_CONFIGS, ScoreNet, unet_from_config  # noqa: E402
from tinydiff.optim import Adam  # noqa: E402
from tinydiff.sde import VESDE, dsm_loss  # noqa: E402
from tinydiff.testing.torch_reference import torch_scorenet as reference_torch_scorenet  # noqa: E402
from tinydiff.testing.torch_reference import torch_unet  # noqa: E402

SIGMA = 25.0

try:
    import torch
except ImportError:  # the benchmark still times tinydiff alone, and says so (NO_TORCH)
    torch = None


# -- the same model in PyTorch (only for comparison; tinydiff never imports torch) ----------------

COND = dict(num_classes=10, attention=(5, 2), num_heads=4)   # the mnist-cond preset's model


def torch_scorenet(device, conditional=False):
    return reference_torch_scorenet(torch_marginal_std, device=device, **(COND if conditional else {}))


def unet_channels(name):
    """Image channels of a named U-Net: 1 for the 28x28 (MNIST-sized) ones, 3 for CIFAR-10's."""
    return 1 if UNET_CONFIGS[name]["image_size"] == 28 else 3


def torch_marginal_std(t):
    return torch.sqrt(torch.expm1(t * (2 * math.log(SIGMA))) / (2 * math.log(SIGMA)))


def torch_dsm_loss(model, x0, eps=1e-5, labels=None):
    """eq. 5: sum over pixels, mean over the batch, t ~ U(eps, 1)."""
    t = torch.rand(x0.shape[0], device=x0.device) * (1 - eps) + eps
    z = torch.randn_like(x0)
    std = torch_marginal_std(t)[:, None, None, None]
    score = model(x0 + z * std, t) if labels is None else model(x0 + z * std, t, labels)
    return ((score * std + z) ** 2).sum(dim=(1, 2, 3)).mean()


# -- timing ------------------------------------------------------------------------------------

def sync_all(backend, device):
    backend.synchronize()
    if torch is not None and device == "cuda":
        torch.cuda.synchronize()


GAP_S = 0.03
INNER = 1   # calls per timed block: > 1 measures the steady state of a loop (no idle gap between)


def interleaved(fns, repeats, warmup, sync):
    """Run the callables in turn, ``repeats`` rounds (order alternating each round), after
    ``warmup`` untimed rounds. Returns one list of seconds per callable.

    Before each timed call the process sleeps GAP_S (untimed): PyTorch's OpenMP threads keep
    spinning for a while after its parallel regions, and without the pause they would take a core
    from whatever runs next (the other framework's step). OpenBLAS's workers, which spin the same
    way, stay idle here: tinydiff's ops run BLAS single-threaded when its pool is in use."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            sync()
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            for _ in range(INNER):
                fns[i]()
            sync()
            if r >= warmup:
                times[i].append((time.perf_counter() - t0) / INNER)
    return times


def summarise(name, t_td, t_torch, rows):
    med_td = statistics.median(t_td)
    if t_torch:
        med_torch = statistics.median(t_torch)
        ratio = statistics.median(a / b for a, b in zip(t_td, t_torch))
        rows.append((name, med_td * 1e3, med_torch * 1e3, ratio))
    else:
        rows.append((name, med_td * 1e3, float("nan"), float("nan")))


NO_TORCH = ("PyTorch is not installed: these are tinydiff's times alone, with no PyTorch column "
            "and no ratio (pip install torch to compare the two)")


def print_table(title, rows):
    if torch is None:
        print(f"\n{title.split(';')[0]}, tinydiff only")
        print(f"{'':40s} {'tinydiff ms':>12s}")
        for name, a, _, _ in rows:
            print(f"{name:40s} {a:12.2f}")
        print(NO_TORCH)
        return
    print(f"\n{title}")
    print(f"{'':40s} {'tinydiff ms':>12s} {'PyTorch ms':>11s} {'ratio':>7s}")
    for name, a, b, r in rows:
        print(f"{name:40s} {a:12.2f} {b:11.2f} {r:7.2f}")


# -- the model steps ---------------------------------------------------------------------------

def build_pair(backend, device, conditional=False, unet=None):
    """tinydiff's model and optimizer and PyTorch's with the same weights: the ScoreNet (the
    conditional one with ``conditional``), or the named U-Net configuration ``unet``."""
    sde = VESDE(SIGMA)
    nn.manual_seed(0)
    if unet:
        model = unet_from_config(unet, sde.marginal_std, unet_channels(unet)).to(backend)
    else:
        model = ScoreNet(sde.marginal_std, **(COND if conditional else {})).to(backend)
    opt = Adam(model.parameters(), lr=1e-4)
    tmodel = topt = None
    if torch is not None:
        torch.manual_seed(0)
        if unet:
            tmodel = torch_unet(torch_marginal_std, in_channels=unet_channels(unet), device=device,
                                **UNET_CONFIGS[unet])
        else:
            tmodel = torch_scorenet(device, conditional)
        sd = model.state_dict()
        tsd = tmodel.state_dict()
        missing = set(tsd) ^ set(sd)
        if missing:
            raise RuntimeError(f"parameter names differ between the two models: {sorted(missing)}")
        tmodel.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
        topt = torch.optim.Adam(tmodel.parameters(), lr=1e-4)
    return sde, model, opt, tmodel, topt


def check_same_output(backend, device, model, tmodel):
    """The two models compute the same function (guards the comparison itself); in eval mode, so
    that dropout (the U-Nets' 0.1) draws no masks."""
    rng = np.random.default_rng(0)
    x = rng.random((4,) + image_shape(model), dtype=np.float32)
    t = rng.uniform(0.1, 1.0, 4).astype(np.float32)
    y = np.array([0, 3, 9, 10]) if model.num_classes else None
    model.eval()
    tmodel.eval()
    with td.no_grad():
        ours = model(td.Tensor(backend.asarray(x)), backend.asarray(t),
                     None if y is None else backend.asarray(y)).numpy()
    with torch.no_grad():
        args = (torch.tensor(x, device=device), torch.tensor(t, device=device))
        theirs = tmodel(*args, *([] if y is None else [torch.tensor(y, device=device)])).cpu().numpy()
    model.train()
    tmodel.train()
    err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    if err > 1e-3:
        raise RuntimeError(f"tinydiff and PyTorch models disagree (relative error {err:.2e})")
    return err


def image_shape(model):
    """(C, H, W) of the model's inputs: 1x28x28 for the ScoreNets, the configuration's for a U-Net."""
    return (model.in_channels,) + (getattr(model, "image_size", 28),) * 2


def _labels(model, batch):
    """Labels of a conditional model's batch, 10 % of them the "no label" token (label dropout)."""
    if not model.num_classes:
        return None
    y = np.arange(batch) % model.num_classes
    y[::10] = model.null_label
    return y


def train_steps(backend, device, batch, sde, model, opt, tmodel, topt):
    host = np.random.default_rng(1).random((batch,) + image_shape(model), dtype=np.float32)
    x_td = backend.asarray(host)
    rng = backend.default_rng(0)
    y = _labels(model, batch)
    y_td = None if y is None else backend.asarray(y)

    def step_td():
        opt.zero_grad()
        loss = dsm_loss(model, x_td, sde, rng, labels=y_td)
        loss.backward()
        opt.step()

    if torch is None:
        return step_td, None
    x_t = torch.tensor(host, device=device)
    y_t = None if y is None else torch.tensor(y, device=device)

    def step_torch():
        topt.zero_grad(set_to_none=True)
        loss = torch_dsm_loss(tmodel, x_t, labels=y_t)
        loss.backward()
        topt.step()
    return step_td, step_torch


def sample_steps(backend, device, batch, model, tmodel):
    rng = np.random.default_rng(2)
    host = (rng.standard_normal((batch,) + image_shape(model)) * 10).astype(np.float32)
    t_host = np.full(batch, 0.5, np.float32)
    x_td, t_td = td.Tensor(backend.asarray(host)), backend.asarray(t_host)
    y = _labels(model, batch)
    y_td = [] if y is None else [backend.asarray(y)]

    def step_td():
        with td.no_grad():
            model(x_td, t_td, *y_td)

    if torch is None:
        return step_td, None
    x_t, t_t = torch.tensor(host, device=device), torch.tensor(t_host, device=device)
    y_t = [] if y is None else [torch.tensor(y, device=device)]

    def step_torch():
        with torch.no_grad():
            tmodel(x_t, t_t, *y_t)
    return step_td, step_torch


def peak_memory_mb(step):
    """Peak traced allocation (MB) during one call of ``step`` (tinydiff on NumPy only)."""
    step()                                      # optimizer state etc. already allocated
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


# -- per-op timings (forward + backward, the shapes inside the model at batch 64) -----------------

CONVS = [  # name, C_in, C_out, input size, stride, output_padding, transposed, bias, input needs grad
    ("conv1 1->32 s1 28->26", 1, 32, 28, 1, 0, False, False, False),
    ("conv2 32->64 s2 26->12", 32, 64, 26, 2, 0, False, False, True),
    ("conv3 64->128 s2 12->5", 64, 128, 12, 2, 0, False, False, True),
    ("conv4 128->256 s2 5->2", 128, 256, 5, 2, 0, False, False, True),
    ("tconv4 256->128 s2 2->5", 256, 128, 2, 2, 0, True, False, True),
    ("tconv3 256->64 s2 5->12", 256, 64, 5, 2, 1, True, False, True),
    ("tconv2 128->32 s2 12->26", 128, 32, 12, 2, 1, True, False, True),
    ("tconv1 64->1 s1 26->28", 64, 1, 26, 1, 0, True, True, True),
]
NORMS = [(32, 26, 4), (64, 12, 32), (128, 5, 32), (256, 2, 32), (128, 5, 32), (64, 12, 32), (32, 26, 32)]


def channels_last(backend, a):
    """An NCHW array stored channels-last, as tinydiff's conv outputs are."""
    return backend.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


def op_pairs(backend, device, batch):
    rng = np.random.default_rng(3)
    pairs = []
    for name, cin, cout, size, stride, op, transposed, bias, xgrad in CONVS:
        x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
        wshape = (cin, cout, 3, 3) if transposed else (cout, cin, 3, 3)
        w = (rng.standard_normal(wshape, dtype=np.float32) * 0.1)
        b = rng.standard_normal(cout, dtype=np.float32) if bias else None
        kw = dict(stride=stride, output_padding=op) if transposed else dict(stride=stride)
        f_td = F.conv_transpose2d if transposed else F.conv2d
        xt = td.Tensor(channels_last(backend, x), requires_grad=xgrad)
        wt = td.Tensor(backend.asarray(w), requires_grad=True)
        bt = None if b is None else td.Tensor(backend.asarray(b), requires_grad=True)
        out_shape = f_td(xt, wt, bt, **kw).shape
        g = channels_last(backend, rng.standard_normal(out_shape, dtype=np.float32))

        def run_td(f_td=f_td, xt=xt, wt=wt, bt=bt, kw=kw, g=g):
            xt.grad = wt.grad = None
            f_td(xt, wt, bt, **kw).backward(g)
        run_torch = None
        if torch is not None:
            f_t = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
            xT = torch.tensor(x, device=device, requires_grad=xgrad)
            wT = torch.tensor(w, device=device, requires_grad=True)
            bT = None if b is None else torch.tensor(b, device=device, requires_grad=True)
            gT = torch.tensor(backend.to_host(g), device=device).contiguous()

            def run_torch(f_t=f_t, xT=xT, wT=wT, bT=bT, kw=kw, gT=gT):
                xT.grad = wT.grad = None
                f_t(xT, wT, bT, **kw).backward(gT)
        pairs.append((name, run_td, run_torch))
    for i, (c, size, groups) in enumerate(NORMS):
        x = rng.standard_normal((batch, c, size, size), dtype=np.float32)
        s = rng.standard_normal((batch, c), dtype=np.float32)
        gam, bet = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
        g = rng.standard_normal((batch, c, size, size), dtype=np.float32)
        ts = [td.Tensor(a, requires_grad=True) for a in
              (channels_last(backend, x), backend.asarray(s), backend.asarray(gam), backend.asarray(bet))]
        gt = channels_last(backend, g)

        def run_td(ts=ts, groups=groups, gt=gt):
            for t in ts:
                t.grad = None
            F.group_norm_silu(ts[0], groups, ts[2], ts[3], shift=ts[1]).backward(gt)
        run_torch = None
        if torch is not None:
            tT = [torch.tensor(a, device=device, requires_grad=True) for a in (x, s, gam, bet)]
            gT = torch.tensor(g, device=device)

            def run_torch(tT=tT, groups=groups, gT=gT):
                for t in tT:
                    t.grad = None
                h = tT[0] + tT[1][:, :, None, None]
                torch.nn.functional.silu(torch.nn.functional.group_norm(h, groups, tT[2], tT[3])).backward(gT)
        pairs.append((f"add+GroupNorm({groups})+swish {c}x{size}x{size}", run_td, run_torch))
    x = rng.standard_normal((batch, 32, 26, 26), dtype=np.float32)
    xs = td.Tensor(channels_last(backend, x), requires_grad=True)
    gs = channels_last(backend, x)

    def swish_td():
        xs.grad = None
        F.silu(xs).backward(gs)
    swish_torch = None
    if torch is not None:
        xT, gT = torch.tensor(x, device=device, requires_grad=True), torch.tensor(x, device=device)

        def swish_torch():
            xT.grad = None
            torch.nn.functional.silu(xT).backward(gT)
    pairs.append(("swish 32x26x26", swish_td, swish_torch))
    return pairs


ATTENTION = [(128, 5), (256, 2)]   # channels, size of the conditional model's attention blocks


def attention_pairs(backend, device, batch):
    """(name, tinydiff fn, torch fn) for each attention block of the conditional model, forward +
    backward (the torch block is the reference's, loaded with the same weights)."""
    from tinydiff.testing.torch_reference import torch_scorenet as ref
    out = []
    for c, size in ATTENTION:
        nn.manual_seed(0)
        block = nn.SelfAttention2d(c, num_heads=4).to(backend)
        host = np.random.default_rng(c).standard_normal((batch, c, size, size)).astype(np.float32)
        xt = td.Tensor(backend.asarray(host), requires_grad=True)
        g = backend.asarray(np.ones_like(host))

        def run_td(block=block, xt=xt, g=g):
            xt.grad = None
            block(xt).backward(g)
        run_torch = None
        if torch is not None:
            sizes = {5: (5, 2), 2: (2,)}
            tm = ref(torch_marginal_std, device=device, num_classes=None, attention=sizes[size],
                     num_heads=4)
            tblock = tm.attn3 if size == 5 else tm.attn4
            tblock.load_state_dict({k: torch.tensor(v) for k, v in block.state_dict().items()})
            xT = torch.tensor(host, device=device, requires_grad=True)
            gT = torch.ones_like(xT)

            def run_torch(tblock=tblock, xT=xT, gT=gT):
                xT.grad = None
                tblock(xT).backward(gT)
        out.append((f"attention block {c} ch {size}x{size}, 4 heads", run_td, run_torch))
    return out


def unet_block_pairs(backend, device, batch, model, tmodel):
    """(name, tinydiff fn, torch fn) for the first ResBlock of each encoder level of the U-Net
    (the two models' own blocks, so with the same weights), forward + backward, with the
    embedding input; and the middle attention block."""
    rng = np.random.default_rng(5)
    out = []
    size = model.image_size
    for i, level in enumerate(model.down):
        block = level.block[0]
        x = rng.standard_normal((batch, block.in_ch, size >> i, size >> i)).astype(np.float32)
        e = rng.standard_normal((batch, model.embed_dim)).astype(np.float32)
        xt, et = (td.Tensor(channels_last(backend, x), requires_grad=True),
                  td.Tensor(backend.asarray(e), requires_grad=True))
        g = channels_last(backend, rng.standard_normal((batch, block.out_ch, size >> i, size >> i))
                          .astype(np.float32))

        def run_td(block=block, xt=xt, et=et, g=g):
            xt.grad = et.grad = None
            block(xt, et).backward(g)
        run_torch = None
        if tmodel is not None:
            tblock = tmodel.down[i].block[0]
            xT = torch.tensor(x, device=device, requires_grad=True)
            eT = torch.tensor(e, device=device, requires_grad=True)
            gT = torch.tensor(backend.to_host(g), device=device).contiguous()

            def run_torch(tblock=tblock, xT=xT, eT=eT, gT=gT):
                xT.grad = eT.grad = None
                tblock(xT, eT).backward(gT)
        out.append((f"ResBlock {block.in_ch}->{block.out_ch} at {size >> i}x{size >> i}", run_td, run_torch))
    attn = model.mid.attn_1
    low = size >> (len(model.down) - 1)
    x = rng.standard_normal((batch, attn.channels, low, low)).astype(np.float32)
    xt, g = td.Tensor(backend.asarray(x), requires_grad=True), backend.asarray(np.ones_like(x))

    def attn_td(xt=xt, g=g):
        xt.grad = None
        attn(xt).backward(g)
    attn_torch = None
    if tmodel is not None:
        xT = torch.tensor(x, device=device, requires_grad=True)

        def attn_torch(xT=xT):
            xT.grad = None
            tmodel.mid.attn_1(xT).backward(torch.ones_like(xT))
    out.append((f"attention {attn.channels} ch {low}x{low}, {attn.num_heads} heads", attn_td, attn_torch))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"],
                    help="numpy (default), cupy or strict")
    ap.add_argument("--repeats", type=A.positive_int, default=15, help="timed rounds per measurement")
    ap.add_argument("--warmup", type=A.nonnegative_int, default=3)
    ap.add_argument("--batches", type=A.positive_int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=A.positive_int, default=None,
                    help="threads for both NumPy's BLAS and PyTorch (default: all cores)")
    ap.add_argument("--gap-ms", type=A.nonnegative_float, default=30.0,
                    help="untimed pause before each timed call (lets spinning thread pools idle)")
    ap.add_argument("--inner", type=A.positive_int, default=1,
                    help="back-to-back calls per timed block (time per call is reported); e.g. 5 "
                         "measures a loop's steady state, as training and sampling run")
    ap.add_argument("--quick", action="store_true", help="skip the per-op table and memory")
    ap.add_argument("--ops-only", action="store_true", help="only the per-op table")
    ap.add_argument("--model", choices=["scorenet", "cond"] + list(UNET_CONFIGS), default="scorenet",
                    help="scorenet: the tutorial model (default); cond: the class-conditional "
                         "ScoreNet with attention at 5x5 and 2x2 (preset mnist-cond), and its "
                         "attention blocks in the per-op table; unet-28s, unet-32s, unet-32l: a "
                         "named U-Net configuration (1x28x28 or 3x32x32 inputs), one ResBlock per "
                         "level and the middle attention block in the per-op table")
    args = ap.parse_args(argv)
    global GAP_S, INNER
    GAP_S, INNER = args.gap_ms / 1e3, max(1, args.inner)
    backend = td.get_backend(args.backend)
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if (args.backend == "cupy" and torch is not None and torch.cuda.is_available()) else "cpu"
    sync = lambda: sync_all(backend, device)  # noqa: E731

    from tinydiff.nn._parallel import get_num_threads
    print(f"tinydiff {td.__version__} on {backend.name}, NumPy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {get_num_threads()} tinydiff threads, load average "
          f"{os.getloadavg()[0]:.1f} at start", end="")
    if torch is not None:
        print(f"; PyTorch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    else:
        print()
        print(NO_TORCH, file=sys.stderr)
    cond = args.model == "cond"
    unet = args.model if args.model in UNET_CONFIGS else None
    sde, model, opt, tmodel, topt = build_pair(backend, device, cond, unet)
    what = (f"U-Net {unet}, {'x'.join(map(str, image_shape(model)))} inputs" if unet else
            "conditional ScoreNet, attention at 5x5 and 2x2" if cond else "ScoreNet")
    print(f"model: {what}, {model.num_parameters():,} parameters")
    if torch is not None:
        print(f"models agree: max relative difference of the scores {check_same_output(backend, device, model, tmodel):.1e}")

    if not args.ops_only:
        rows = []
        for batch in args.batches:
            fns = [f for f in train_steps(backend, device, batch, sde, model, opt, tmodel, topt) if f]
            t = interleaved(fns, args.repeats, args.warmup, sync)
            summarise(f"train step, batch {batch}", t[0], t[1] if len(t) > 1 else None, rows)
        fns = [f for f in sample_steps(backend, device, 64, model, tmodel) if f]
        t = interleaved(fns, args.repeats, args.warmup, sync)
        summarise("sampling step (forward, no_grad), batch 64", t[0], t[1] if len(t) > 1 else None, rows)
        print_table("Whole model (median ms; ratio = median of paired tinydiff/PyTorch)", rows)

    if not args.quick:
        rows = []
        pairs = (unet_block_pairs(backend, device, 64, model, tmodel) if unet else
                 attention_pairs(backend, device, 64) if cond else op_pairs(backend, device, 64))
        for name, a, b in pairs:
            t = interleaved([f for f in (a, b) if f], args.repeats, args.warmup, sync)
            summarise(name, t[0], t[1] if len(t) > 1 else None, rows)
        print_table("Per op, forward + backward, batch 64", rows)
        if backend.name == "numpy" and not args.ops_only:
            for batch in args.batches:
                step = train_steps(backend, device, batch, sde, model, opt, tmodel, topt)[0]
                print(f"peak memory of a tinydiff training step, batch {batch}: "
                      f"{peak_memory_mb(step):.1f} MB (tracemalloc, above the live arrays before it)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on these cores make "
          "every time noisy; the ratios are of adjacent pairs)")


if __name__ == "__main__":
    main()
