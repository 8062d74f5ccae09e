"""The one command line: ``tinydiff train | sample | evaluate`` (also ``python -m tinydiff``).

    tinydiff train --preset mnist-cond --out runs/mnist_cond          # class-conditional MNIST
    tinydiff sample runs/mnist_cond --per-class 8 --guidance 1 --out digits.npz --grid digits.png
    tinydiff evaluate runs/mnist_cond --samples 1000 --guidance 0,0.5,1,2,4

This is the only module that parses flags. Every value is checked as it is parsed (argparse
types from tinydiff.argtypes) or right after, before any data is loaded or any training starts;
a bad one is a one-line error with exit code 2. Faults found later (no GPU, missing data, a
foreign checkpoint, a NaN loss) are one line on stderr with exit code 1. The settings of a run
resolve as tinydiff.experiments describes: defaults, preset, recipe, checkpoint, flags.
"""
from __future__ import annotations

import argparse
import sys

from . import argtypes as A
from . import experiments as E

SUPPRESS = argparse.SUPPRESS


class Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (the flag, the value, what is allowed) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _attention(value):
    """'none' or comma-separated feature-map sizes (the model checks them: 26, 12, 5, 2 for the
    ScoreNet, its resolutions for a U-Net)."""
    if str(value).strip().lower() in ("none", "off", ""):
        return []
    try:
        return A.positive_int_list(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'none' or feature-map sizes, e.g. 5,2 (ScoreNet) "
                                         f"or 8 (a 32 px U-Net), got {value!r}") from None


def _dataset(value):
    """A data set name (mnist, fashion-mnist, cifar-10) or folder:PATH of an existing folder."""
    import os
    from .data import _ALIASES
    v = str(value)
    if v.lower().startswith("folder:"):
        path = os.path.expanduser(v[len("folder:"):])
        if not path or not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"folder:PATH must name an existing folder of images, "
                                             f"got {value!r}")
        return "folder:" + os.path.abspath(path)
    key = _ALIASES.get(v.lower(), v.lower())
    if key not in E.IMAGE_SHAPE:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(E.IMAGE_SHAPE)} or "
                                         f"folder:PATH, got {value!r}")
    return key


def _model(value):
    from .models.unet import UNET_CONFIGS
    names = ["scorenet", *UNET_CONFIGS]
    if value not in names:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {value!r}")
    return value


# -- parsers -----------------------------------------------------------------------------------

def add_train_arguments(p, preset=None):
    """The flags of ``tinydiff train`` (and of examples/mnist_uncond.py, examples/mnist_cond.py).
    Settings default to SUPPRESS so that only flags actually given override preset and recipe."""
    def opt(*a, **k):
        p.add_argument(*a, default=SUPPRESS, **k)
    presets = ", ".join(f"{k} ({v['recipe']})" for k, v in E.PRESETS.items())
    opt("--preset", choices=list(E.PRESETS), help=f"what to train, with its default recipe: "
        f"{presets}; default {preset or E.DEFAULTS['preset']}")
    opt("--recipe", choices=list(E.RECIPES), help="how to train: fast (Adam, warm-up over 300 steps "
        "to lr 3e-3, batch 64, EMA 0.999 with a ramp, 4 epochs); cond (AdamW, the same warm-up, "
        "cosine to 0.1 lr then constant, clip 1, EMA, 5 epochs); reference (the tutorial: Adam "
        "lr 1e-4, batch 32, 50 epochs, no EMA). Default: the preset's")
    opt("--backend", choices=["numpy", "cupy"], help="numpy = CPU (default), cupy = NVIDIA GPU")
    opt("--epochs", type=A.positive_int, help="total epochs (a resumed run continues up to this)")
    opt("--batch-size", type=A.positive_int, help="images per training step")
    opt("--lr", type=A.positive_float, help="peak learning rate")
    opt("--optimizer", choices=["adam", "adamw"], help="adam, or adamw (decoupled weight decay)")
    opt("--weight-decay", type=A.nonnegative_float, help="weight decay (AdamW: decoupled)")
    opt("--schedule", choices=["constant", "cosine-then-constant"], help="learning rate after the "
        "warm-up: constant, or cosine annealing to --min-lr x lr over --cosine-epochs, then constant")
    opt("--min-lr", type=A.unit_interval, help="final factor of the cosine schedule (0.1: lr/10)")
    opt("--cosine-epochs", type=A.positive_int, help="epochs of the cosine (default: --epochs)")
    opt("--warmup", type=A.nonnegative_int, help="steps of linear learning-rate warm-up (0: none)")
    opt("--ema", type=A.half_open_unit, help="decay of the EMA of the weights used for sampling "
        "(0: none)")
    opt("--ema-warmup", type=A.boolean, help="yes/no: ramp the EMA decay up as min(decay, "
        "(1+n)/(10+n)) so early grids are not averages of untrained weights")
    opt("--clip", type=A.positive_float, help="max global gradient norm (default per recipe)")
    opt("--seed", type=A.nonnegative_int, help="seed of the initial weights, data order and noise "
        "(default 0)")
    opt("--dataset", type=_dataset, help="training set: mnist, fashion-mnist, cifar-10, or "
        "folder:PATH, a folder of PNG/JPEG files (one sub-folder per class for a conditional run); "
        "default: the preset's")
    opt("--image-size", type=A.positive_int, help="folder:PATH only: centre-crop and resize every "
        "image to N x N (default 32 for the folder presets)")
    opt("--image-channels", type=int, choices=[1, 3], help="folder:PATH only: 1 (grey) or 3 (RGB); "
        "default 1 if every image is grey, else 3")
    opt("--on-bad-file", choices=["error", "skip"], help="folder:PATH only: stop at an unreadable "
        "image (error, default) or leave it out (skip)")
    opt("--hflip", type=A.boolean, help="yes/no: mirror training images left-right at random "
        "(default: yes for cifar10 and the folder presets)")
    opt("--limit", "--subset", dest="limit", type=A.positive_int,
        help="train on the first N images only")
    opt("--conditional", type=A.boolean, help="yes/no: a class-conditional model (default: the "
        "preset's)")
    opt("--p-uncond", type=A.unit_interval, help="label dropout of conditional training: the "
        "probability of replacing a label by the 'no label' token (default 0.1)")
    opt("--noise", choices=["uniform", "lognormal"], help="training noise levels: uniform t "
        "(eq. 5 of docs/design.md) or lognormal sigma, ln sigma ~ N(--p-mean, --p-std^2) (Karras et al.)")
    opt("--p-mean", type=A.finite_float, help="mean of ln sigma of --noise lognormal")
    opt("--p-std", type=A.positive_float, help="std of ln sigma of --noise lognormal")
    opt("--p-uniform", type=A.unit_interval, help="--noise lognormal: the fraction of training "
        "draws taken uniformly in t instead (a mixture that also trains the largest noise "
        "levels; default 0)")
    opt("--loss-weight", choices=["none", "edm"], help="per-noise-level loss weight: none "
        "(eq. 5, docs/design.md) or edm, 1 + sigma^2 / sigma_data^2 (Karras et al.'s lambda)")
    opt("--sigma-data", type=A.positive_float, help="the data's std in --loss-weight edm")
    opt("--attention", type=_attention, help="feature-map sizes with self-attention blocks, e.g. "
        "5,2, or none (default: the preset's)")
    opt("--heads", dest="num_heads", type=A.positive_int, help="heads per attention block "
        "(default 4)")
    opt("--model", type=_model, help="scorenet (the reference model, 28x28 only) or a named "
        "U-Net: unet-28s, unet-32s (CPU-sized), unet-32l (GPU-sized), unet-latent (7x7 codes); "
        "default: the preset's")
    opt("--base-channels", type=A.positive_int, help="U-Net: width of the first level (default: "
        "the model's)")
    opt("--channel-mult", type=A.positive_int_list, help="U-Net: width multiplier per level, "
        "e.g. 1,2,2 (default: the model's)")
    opt("--res-blocks", dest="num_res_blocks", type=A.positive_int, help="U-Net: residual blocks "
        "per level (default: the model's)")
    opt("--dropout", type=A.unit_interval, help="U-Net: dropout before each block's second conv "
        "(default: the model's)")
    opt("--group-channels", type=A.positive_int, help="U-Net: least channels per GroupNorm group "
        "(default 4; 1 lets a norm remove every channel's mean, docs/models.md)")
    opt("--autoencoder", type=A.existing_dir, help="latent presets (fashion-latent-cond): the "
        "autoencoder run (of --preset fashion-ae) whose codes the model learns; its codes are "
        "encoded once into OUT/latents.npz")
    opt("--latent-channels", type=A.positive_int, help="autoencoder: channels of the code "
        "(default 2: 2x7x7 codes of 28x28 images, 8x fewer numbers)")
    opt("--corruption", choices=["none", "noise", "blur", "mask"], help="autoencoder: corrupt "
        "the input in training, the target stays clean (noise, blur, masked 4x4 blocks; default "
        "none)")
    opt("--corruption-level", type=A.nonnegative_float, help="autoencoder: noise std (0.2), blur "
        "std in pixels (1) or masked fraction (0.25); default in brackets")
    opt("--latent-noise", type=A.nonnegative_float, help="autoencoder: std of noise added to the "
        "code before decoding in training (default 0)")
    opt("--kl-weight", type=A.nonnegative_float, help="autoencoder: weight of 0.5 mean(z^2), a KL "
        "term against N(0, I) (default 0)")
    opt("--channels", type=A.positive_int_list, help="the four ScoreNet widths (default "
        "32,64,128,256)")
    opt("--embed-dim", type=A.positive_int, help="time-embedding width, even (default 256)")
    opt("--sde", choices=["ve", "vp", "subvp"], help="the noising SDE (docs/sdes.md): ve = "
        "variance exploding, dx = sigma^t dW (default); vp = variance preserving, the continuous "
        "DDPM; subvp = sub-VP. Recorded in the run: sampling and resuming use the same")
    opt("--sigma", type=A.float_above(1.0), help="sigma of the VE SDE, > 1 (default 25)")
    opt("--beta-min", type=A.nonnegative_float, help="beta(0) of the VP / sub-VP SDE, "
        "beta(t) = beta_min + t (beta_max - beta_min) (default 0.1)")
    opt("--beta-max", type=A.positive_float, help="beta(1) of the VP / sub-VP SDE, >= beta_min "
        "(default 20)")
    opt("--sampler", choices=list(E.SAMPLERS), help="sampler of the grids and final samples: "
        "Euler-Maruyama (em, default), predictor-corrector (pc), probability-flow ODE (ode), "
        "DDPM's ancestral sampler (ancestral, --sde vp only), Karras et al.'s Heun (heun, "
        "heun-sde: 2 evaluations per step), DPM-Solver++(2M) (dpm2m, dpm2m-sde: 1 per step)")
    opt("--sample-steps", type=A.int_at_least(2), help="sampler steps (default 500; ignored by ode)")
    _add_sampler_settings(opt)
    opt("--grid-sampler", choices=list(E.SAMPLERS), help="sampler of the per-epoch grids "
        "(default: --sampler)")
    opt("--grid-steps", type=A.int_at_least(2), help="sampler steps of the per-epoch grids "
        "(default: 25 for fast, else --sample-steps)")
    opt("--num-samples", type=A.positive_int, help="images per grid of an unconditional run "
        "(default 64)")
    opt("--per-class", type=A.positive_int, help="images per class (one row each) in the grids of "
        "a conditional run (default 8)")
    opt("--guidance", type=A.finite_float, help="guidance weight w of a conditional run's grids "
        "(default 1)")
    opt("--show-real", type=A.boolean, help="yes/no: draw training images (of the same classes, "
        "for a conditional run) beneath the generated ones in every grid")
    opt("--sample-every", type=A.positive_int, help="draw a sample grid every N epochs (default 1)")
    opt("--log-every", type=A.positive_int, help="read the loss and gradient norm back to the "
        "host every N steps (1, default: every step; more: fewer GPU syncs; needs --nonfinite stop)")
    opt("--nonfinite", choices=["stop", "skip"], help="on a NaN/Inf loss or gradient: stop "
        "(default) or skip the step")
    outs = ", ".join(f"{v['out']} for {k}" for k, v in E.PRESETS.items())
    p.add_argument("--out", type=A.out_dir, default=None, help=f"output folder (default: {outs})")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--sample-only", action="store_true", help="only sample from --out's checkpoint")
    p.add_argument("--data", type=A.existing_dir, help="folder holding mnist/ (default "
                   "$TINYDIFF_DATA, then the cache, then a download)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--bpd", type=A.nonnegative_int, default=0,
                   help="then report bits/dim of N test images (default 0: skip)")
    p.set_defaults(command="train", default_preset=preset)
    return p


def add_sample_arguments(p):
    p.add_argument("run", help="a run folder written by `tinydiff train` (or its checkpoint.npz)")
    p.add_argument("--num-samples", type=A.positive_int, help="images to draw (default: 8 per "
                   "class for conditional runs, 64 otherwise)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", type=A.int_list, help="classes to draw, e.g. 9 or 0,1,2 (each "
                   "repeated to --num-samples, default 8 each; one grid row per class)")
    g.add_argument("--per-class", type=A.positive_int, help="K images of every class")
    p.add_argument("--guidance", type=A.finite_float, help="classifier-free guidance weight w: "
                   "0 = plain conditional, larger = closer to the class (default: the run's, 1)")
    _add_sampler_arguments(p)
    p.add_argument("--out", type=A.out_file(".npz"), help="the .npz to write (default "
                   "RUN/samples.npz): images (N, C, H, W) float32 in [0, 1], labels (N,)")
    p.add_argument("--grid", type=A.out_file(".png"), help="the PNG grid (default: beside --out)")
    p.add_argument("--trajectory", type=A.out_file(".gif"), help="also follow a few images from "
                   "noise to data: FILE.gif and a FILE.png strip, and test images noised along "
                   "eq. 1 at the same times (FILE_forward.gif / .png)")
    p.add_argument("--frames", type=A.int_at_least(2), default=12, help="frames of --trajectory "
                   "(default 12)")
    p.add_argument("--trajectory-images", type=A.positive_int, default=8, help="images followed "
                   "by --trajectory (default 8)")
    p.add_argument("--data", type=A.existing_dir, help="folder holding the data sets, for the "
                   "real images of --trajectory (default $TINYDIFF_DATA, then the cache)")
    p.set_defaults(command="sample")
    return p


def add_evaluate_arguments(p):
    p.add_argument("run", help="a run folder written by `tinydiff train` (or its checkpoint.npz)")
    p.add_argument("--samples", type=A.positive_int, default=1000, help="samples drawn and test "
                   "images compared (default 1000; conditional runs draw 0, 1, ..., 9, 0, ...)")
    p.add_argument("--guidance", type=A.float_list, help="guidance weight(s) w of a conditional "
                   "run; several (e.g. 0,0.5,1,2,4) give a sweep table and plot (default: the "
                   "run's)")
    _add_sampler_arguments(p, many=True)
    p.add_argument("--bpd", type=A.nonnegative_int, default=0, help="test images for bits/dim "
                   "(default 0: skip; conditional runs use the true labels)")
    p.add_argument("--from-file", type=A.existing_file, help="score the images (and labels) of an "
                   ".npz written by `tinydiff sample` instead of drawing")
    p.add_argument("--classifier", type=A.existing_file, help="classifier .npz (default: the "
                   "shipped one of the run's data set)")
    p.add_argument("--data", type=A.existing_dir, help="folder holding the data sets")
    p.add_argument("--ceilings", action="store_true", help="also print test vs blurred test and "
                   "test vs noise")
    p.add_argument("--against", choices=["test", "train"], default="test", help="the real images "
                   "the Fréchet distance compares with: the test split (default) or the training "
                   "images (the floor, train against test, stays the same)")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--save", type=A.out_file(".npz"), help="also write the drawn images here")
    p.add_argument("--plot", type=A.out_file(".png"), help="the plot of a sweep (default "
                   "RUN/guidance_sweep.png for several --guidance, RUN/nfe_sweep.png for several "
                   "--sampler / --steps); its CSV beside it")
    p.set_defaults(command="evaluate")
    return p


def _add_sampler_settings(add, of_run=False):
    """The flags of E.SAMPLER_SETTINGS (the sampler options a run or a command may set);
    ``of_run``: sample / evaluate, where a run's own sampler keeps the run's settings."""
    kinds = {"churn": (A.nonnegative_float, "S_churn of heun-sde: how much noise each step adds "
                       "and removes (0 is heun)", "40"),
             "s_tmin": (A.nonnegative_float, "smallest noise level heun-sde churns at", "0.05"),
             "rho": (A.positive_float, "exponent of the noise grid of heun, heun-sde, dpm2m and "
                     "dpm2m-sde", "7, EDM's"),
             "s_noise": (A.positive_float, "factor on the fresh noise of heun-sde and dpm2m-sde",
                         "1")}
    for name, (flag, *_) in E.SAMPLER_SETTINGS.items():
        kind, text, default = kinds[name]
        where = f"the run's for its own sampler, else {default}" if of_run else default
        add(flag, type=kind, help=f"{text} (default {where})")


def _add_sampler_arguments(p, many=False):
    names = ", ".join(E.SAMPLERS)
    if many:   # evaluate: every combination is a row; several steps give the FD-against-NFE table
        p.add_argument("--sampler", type=A.choice_list(E.SAMPLERS), default=["em"],
                       help=f"sampler(s), comma-separated, among {names} (default em; ancestral "
                       "needs --sde vp)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--steps", type=A.int_list_at_least(2), default=[500],
                       help="steps, comma-separated (several: a table and plot of Fréchet distance "
                       "against score evaluations); default 500; ode picks its own")
        g.add_argument("--nfe", type=A.int_list_at_least(2), help="instead of --steps: score "
                       "evaluations per sample, comma-separated (e.g. 10,20,35,50,100,500), each "
                       "sampler given the most steps within it (heun, pc: 2 per step)")
    else:
        p.add_argument("--sampler", choices=list(E.SAMPLERS), default="em",
                       help=f"one of {names} (default em; ancestral needs --sde vp)")
        p.add_argument("--steps", type=A.int_at_least(2), default=500,
                       help="sampler steps (default 500; ode picks its own)")
    p.add_argument("--rtol", type=A.positive_float, default=1e-5,
                   help="ode tolerance, rtol = atol (default 1e-5)")
    _add_sampler_settings(p.add_argument, of_run=True)
    p.add_argument("--seed", type=A.nonnegative_int, default=0, help="default 0")
    p.add_argument("--batch", type=A.positive_int, default=500,
                   help="samples drawn at once (default 500)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(prog="tinydiff"):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate}",
                           parser_class=Parser)
    add_train_arguments(sub.add_parser("train", help="train a score model (see --preset)"))
    add_sample_arguments(sub.add_parser("sample", help="draw images from a trained run"))
    add_evaluate_arguments(sub.add_parser("evaluate", help="sample quality of a trained run"))
    return p


def train_parser(prog, preset, description=None):
    """A stand-alone ``train`` parser for an example script."""
    p = Parser(prog=prog, description=description,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_train_arguments(p, preset)


# -- entry points --------------------------------------------------------------------------------

def main(argv=None, prog="tinydiff"):
    """``tinydiff ...``; returns the exit code. (benchmarks/quality.py is ``evaluate`` under
    another name: prog names it in messages.)"""
    parser = build_parser("tinydiff")
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if prog != "tinydiff":
        sub.prog = prog
    return _dispatch(args, sub)


def train_main(argv=None, preset="mnist", prog=None, description=None):
    """An example script's entry point: ``tinydiff train`` with another default preset."""
    parser = train_parser(prog, preset, description)
    return _dispatch(parser.parse_args(argv), parser)


def _dispatch(args, parser):
    from . import commands
    from .backend import BackendError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .metrics import MetricError
    from .models.classifier import ClassifierWeightsError
    from .train import NonFiniteError
    run = {"train": commands.train, "sample": commands.sample, "evaluate": commands.evaluate}
    try:
        return run[args.command](args, parser) or 0
    except commands.UsageError as e:
        parser.error(str(e))                      # usage line + "error: ...", exit 2
    except (BackendError, DataError, CheckpointError, NonFiniteError, MetricError,
            ClassifierWeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


__all__ = ["main", "train_main", "build_parser", "train_parser", "add_train_arguments"]
