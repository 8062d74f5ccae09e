"""What ``tinydiff train / sample / evaluate`` do once their flags are parsed (tinydiff/cli.py).

Each function takes the parsed arguments, checks what argparse cannot check alone (combinations,
a label range that depends on the run) before any data is loaded, and then calls the library:
tinydiff.experiments for the run's pieces, tinydiff.train for the loop, tinydiff.metrics for the
numbers. A ``UsageError`` becomes a one-line error with exit code 2.
"""
from __future__ import annotations

import contextlib
import csv
import os
import time

import numpy as np

from . import experiments as E

# the settings a train flag may set (everything else on the command line is not part of a run)
CONFIG_KEYS = frozenset(E.DEFAULTS) | frozenset(E.RECIPES["fast"]) | frozenset(E.PRESETS["mnist"])

HEADER = ("| data set | model | sampler | steps (NFE) | guidance | samples | Fréchet dist. (floor) "
          "| classes | bits/dim | sampling time |\n|---|---|---|---|---|---|---|---|---|---|")


class UsageError(ValueError):
    """A flag value or combination that cannot work (exit code 2)."""


def _say(msg):
    print(f"[tinydiff] {msg}", flush=True)


# -- train -----------------------------------------------------------------------------------------

def train(args, parser):
    from . import data, train as T
    from .backend import get_backend

    explicit = {k: v for k, v in vars(args).items() if k in CONFIG_KEYS and k != "out"}
    preset = explicit.get("preset", args.default_preset or E.DEFAULTS["preset"])
    out = args.out or E.PRESETS[preset]["out"]
    saved = args.resume or args.sample_only
    if args.resume and args.sample_only:
        raise UsageError("--resume and --sample-only exclude each other: --resume trains on, "
                         "--sample-only only samples")
    try:
        config = E.resolve_config(explicit, out if saved else None, args.default_preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config["out"] = out
    _check_train_config(config)
    # a sampler setting given as a flag must apply to the sampler (the recipe's are dropped where
    # they do not)
    _sampler_options(config["sampler"], **{k: explicit.get(k) for k in E.SAMPLER_SETTINGS})
    if config.get("autoencoder") and not config["latent"]:
        raise UsageError(f"--autoencoder applies to the latent presets (fashion-latent-cond), not "
                         f"to --preset {config['preset']}")
    backend = get_backend(config["backend"])        # fails early and clearly without a GPU
    if config["model"] == "autoencoder":
        return _train_autoencoder(args, config, out, backend)
    autoencoder = _latent_setup(config, out, backend) if config["latent"] else None
    sde = E.build_sde(config)
    images = None
    if E.is_folder(config) and not args.sample_only and not config.get("image_shape"):
        # a folder's image shape and classes are known once it is read: read it first
        images, train_labels = _load_training_set(config, args)
        config["image_shape"] = list(images.shape[1:])
        if config["conditional"]:
            if train_labels is None:
                raise UsageError(f"{config['dataset']} has no class sub-folders, so a conditional "
                                 "run has no labels; use --preset folder, or one sub-folder per class")
            config["num_classes"] = int(train_labels.max()) + 1
    try:
        model = E.build_model(config, backend, sde)
    except ValueError as e:                         # e.g. heads that do not divide the channels
        raise UsageError(str(e)) from None
    labels = E.grid_labels(config)
    shape = E.sample_shape(config)
    n = len(labels) if labels is not None else int(config["num_samples"])
    def make_fn(sampler, steps):
        fn = T.make_sample_fn(sde, sampler, int(steps), (n, *shape), labels=labels,
                              guidance=float(config["guidance"]),
                              nrow=int(config["per_class"]) if labels is not None else None,
                              options=E.run_sampler_options(config, sampler))
        # a latent run's grids and samples are decoded images
        return fn if autoencoder is None else _decoding(fn, autoencoder)
    # the final samples, and the per-epoch grids (their own sampler and steps when given)
    sample_fn = make_fn(config["sampler"], config["sample_steps"])
    grid_sampler = config.get("grid_sampler") or config["sampler"]
    grid_steps = config.get("grid_steps") or config["sample_steps"]
    grid_fn = sample_fn
    if (grid_sampler, int(grid_steps)) != (config["sampler"], int(config["sample_steps"])):
        grid_fn = make_fn(grid_sampler, grid_steps)
    ema = None
    if args.sample_only:   # the EMA weights when the run kept them
        state = T.load_model_weights(os.path.join(out, T.CHECKPOINT), model)
        _say(f"sampling from {out} (epoch {state['epoch']}, step {state['step']})")
    else:
        if images is None:
            images, train_labels = _load_training_set(config, args)
        pixels = images
        if autoencoder is not None:  # the training data are the codes, encoded once per run
            images = _cached_latents(out, autoencoder, config, pixels, train_labels)
        if config["show_real"]:
            sample_fn.real = grid_fn.real = E.real_examples(pixels, train_labels, labels, n,
                                                            int(config["seed"]))
        steps_per_epoch = data.num_batches(len(images), int(config["batch_size"]))
        opt, scheduler, ema = E.build_optimizer(model, config, steps_per_epoch)
        loss = T.score_matching_loss(sde, use_labels=bool(config["conditional"]),
                                     label_dropout=float(config["p_uncond"]) if config["conditional"] else 0.0,
                                     noise=E.build_training_noise(config))
        trainer = T.Trainer(
            model, opt, loss, images, train_labels if config["conditional"] else None,
            out_dir=out, epochs=int(config["epochs"]), batch_size=int(config["batch_size"]),
            seed=int(config["seed"]), ema=ema, scheduler=scheduler, clip_grad=config["clip"],
            sample_fn=grid_fn, sample_every=int(config["sample_every"]),
            on_nonfinite=config["nonfinite"], config=config, hflip=bool(config["hflip"]),
            log_every=int(config["log_every"]),
            progress=not args.no_progress)
        trainer.config_defaults = E.DEFAULTS
        try:
            trainer.fit(resume=args.resume)
        except KeyboardInterrupt:
            if os.path.exists(trainer.checkpoint_path):
                raise KeyboardInterrupt(f"continue with --resume --out {out}") from None
            raise KeyboardInterrupt("before the first checkpoint: nothing was saved; start again "
                                    "(without --resume)") from None
    prefix = os.path.join(out, f"samples_{config['sampler']}")
    T.sample_and_save(model, sample_fn, prefix, T.derived_seed(config["seed"], 4), ema=ema,
                      sampler=config["sampler"], sample_steps=config["sample_steps"])
    if args.bpd:   # test-set bits/dim along the probability-flow ODE (with the EMA weights)
        with (ema.average_parameters(model) if ema else contextlib.nullcontext()):
            model.eval()
            mean, err, n = _test_bits_per_dim(model, sde, config, args.bpd, args.data, backend,
                                              seed=int(config["seed"]))
            model.train()
        print(f"test bits/dim ({n} images): {mean:.3f} +- {err:.3f}")
    return 0


# -- latent diffusion: the autoencoder's run, and a latent run's codes ------------------------------

def _train_autoencoder(args, config, out, backend):
    """An autoencoder run (--preset fashion-ae): the shared Trainer on the reconstruction loss;
    after every epoch a grid of reconstructions above their originals; at the end the latent scale
    is measured on the training set and saved with the weights, and encoded.png shows codes."""
    from . import data, train as T
    from .models.autoencoder import autoencoder_loss, decode_all, encode_all
    if config["conditional"]:
        raise UsageError("an autoencoder takes no labels: drop --conditional")
    try:
        model = E.build_model(config, backend)
    except ValueError as e:
        raise UsageError(str(e)) from None
    images, _ = _load_training_set(config, args)
    originals = E.real_examples(images, None, None, 16, int(config["seed"]))

    def sample_fn(m, seed):          # "samples" of an autoencoder: reconstructions
        return decode_all(m, encode_all(m, originals, normalised=False), normalised=False)
    sample_fn.nrow, sample_fn.real, sample_fn.labels = 8, originals, None
    path = os.path.join(out, T.CHECKPOINT)
    if args.sample_only:
        state = T.load_model_weights(path, model)
        _say(f"reconstructing with {out} (epoch {state['epoch']}, step {state['step']})")
    else:
        steps_per_epoch = data.num_batches(len(images), int(config["batch_size"]))
        opt, scheduler, ema = E.build_optimizer(model, config, steps_per_epoch)
        trainer = T.Trainer(
            model, opt, autoencoder_loss(), images, None, out_dir=out, epochs=int(config["epochs"]),
            batch_size=int(config["batch_size"]), seed=int(config["seed"]), ema=ema,
            scheduler=scheduler, clip_grad=config["clip"], sample_fn=sample_fn,
            sample_every=int(config["sample_every"]), on_nonfinite=config["nonfinite"],
            config=config, hflip=bool(config["hflip"]), log_every=int(config["log_every"]),
            progress=not args.no_progress)
        trainer.config_defaults = E.DEFAULTS
        try:
            trainer.fit(resume=args.resume)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"continue with --resume --out {out}") from None
        with (ema.average_parameters(model) if ema else contextlib.nullcontext()):
            scale = model.measure_latent_scale(images)
        trainer.save()               # the weights with their latent scale
        model = E.load_autoencoder(out, backend)[0]
    _autoencoder_pictures(model, originals, out)
    test_x, _ = data.load_dataset(config["dataset"], "test", args.data, limit=256, verbose=False)
    recon = decode_all(model, encode_all(model, test_x))
    mse = float(np.mean((recon - E.to_unit(test_x)) ** 2))
    _say(f"autoencoder: {'x'.join(map(str, model.latent_shape))} codes, "
         f"{model.compression:g}x compression, latent scale {float(model.latent_scale):.4g}; "
         f"{len(test_x)} test images: MSE {mse:.5f}, PSNR {10 * np.log10(1 / mse):.2f} dB; "
         f"{os.path.join(out, 'encoded.png')}")
    return 0


def _autoencoder_pictures(model, originals, out):
    """encoded.png: per column an image, its code's channels (7x7, shown as 28x28 blocks, the
    normalised values -3..3 as black..white) and its reconstruction (the report's Fig. 19-20)."""
    from . import plot
    from .models.autoencoder import decode_all, encode_all
    x = originals[:8]
    z = encode_all(model, x)
    recon = decode_all(model, z)
    k = x.shape[2] // z.shape[2]
    rows = [x]
    for c in range(z.shape[1]):
        code = np.clip(z[:, c:c + 1] / 6 + 0.5, 0, 1).repeat(k, axis=2).repeat(k, axis=3)
        rows.append(np.broadcast_to(code, x.shape) if x.shape[1] != 1 else code)
    rows.append(recon)
    plot.save_image_grid(np.concatenate(rows).astype(np.float32), os.path.join(out, "encoded.png"),
                         nrow=len(x))


def _decoding(sample_fn, autoencoder):
    """sample_fn drawing codes -> the same, returning decoded images (its grid attributes kept)."""
    from .models.autoencoder import decode_all

    def decoded(model, seed):
        return decode_all(autoencoder, sample_fn(model, seed))
    decoded.nrow, decoded.real, decoded.labels = sample_fn.nrow, sample_fn.real, sample_fn.labels
    return decoded


def _latent_setup(config, out, backend):
    """A latent run's autoencoder, checked; sets the run's image_shape to its code shape."""
    if not config.get("autoencoder"):
        raise UsageError(f"--preset {config['preset']} trains on an autoencoder's codes: pass "
                         "--autoencoder RUN_DIR (a run of --preset fashion-ae)")
    config["autoencoder"] = os.path.abspath(config["autoencoder"])
    try:
        autoencoder, digest = E.load_autoencoder(config["autoencoder"], backend)
    except E.CheckpointError as e:
        raise UsageError(f"--autoencoder: {e}") from None
    want = (autoencoder.in_channels, autoencoder.image_size, autoencoder.image_size)
    if tuple(E.IMAGE_SHAPE[config["dataset"]]) != want:
        raise UsageError(f"--autoencoder {config['autoencoder']} encodes {'x'.join(map(str, want))} "
                         f"images, not {config['dataset']}'s")
    if config.get("image_shape"):    # resuming: the codes must keep their shape and weights
        try:
            E.check_latent_shape(config, autoencoder, out)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if config.get("autoencoder_hash") and config["autoencoder_hash"] != digest:
            raise UsageError(f"{out} was trained on the codes of autoencoder checkpoint "
                             f"{config['autoencoder_hash']}, but {config['autoencoder']} now holds "
                             f"{digest} (retrained?); continue with that autoencoder's checkpoint, "
                             "or train a new latent run")
    config["image_shape"] = list(autoencoder.latent_shape)
    config["autoencoder_hash"] = digest
    return autoencoder


def _cached_latents(out, autoencoder, config, images, labels):
    """The normalised codes of the training images, from out/latents.npz when it was written with
    the same autoencoder checkpoint (its hash) for the same images, else encoded now and saved."""
    from .models.autoencoder import encode_all
    from .train import _fingerprint
    path = os.path.join(out, "latents.npz")
    key = f"{config['autoencoder_hash']}:{len(images)}:{_fingerprint(images, labels)}"
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    _say(f"codes of {len(images)} training images read from {path}")
                    return f["latents"]
        except Exception:             # unreadable or older: encode again
            pass
    start = time.perf_counter()
    latents = encode_all(autoencoder, images)
    os.makedirs(out, exist_ok=True)
    save_npz(path, latents=latents, key=np.asarray(key))
    _say(f"encoded {len(images)} training images once ({time.perf_counter() - start:.1f} s, "
         f"std {latents.std():.3f}): {path}")
    return latents


def _load_training_set(config, args):
    from . import data
    folder = E.is_folder(config)
    kw = dict(image_size=config["image_size"], channels=config["image_channels"],
              on_bad_file=config["on_bad_file"]) if folder else {}
    return data.load_dataset(config["dataset"], "train", args.data, config["limit"], **kw)


def _check_train_config(config):
    if not E.is_folder(config):
        given = [f"--{k.replace('_', '-')}" for k in ("image_size", "image_channels")
                 if config.get(k) is not None]
        if given and config["preset"] not in ("folder", "folder-cond"):
            raise UsageError(f"{' and '.join(given)} apply to --dataset folder:PATH only; "
                             f"{config['dataset']} images are {E.IMAGE_SHAPE[config['dataset']]}")
    _check_sampler(config["sampler"], config["sde"], "--sde")
    if int(config["log_every"]) > 1 and config["nonfinite"] == "skip":
        raise UsageError("--log-every > 1 needs --nonfinite stop: skipping a step needs its loss "
                         "on the host before the update")
    try:
        E.build_training_noise(config)
    except ValueError as e:                   # e.g. --p-uniform without --noise lognormal
        raise UsageError(f"{e} (--noise, --p-mean, --p-std, --p-uniform, --loss-weight)") from None
    if config["model"] != "scorenet":
        return
    bad = [a for a in config["attention"] if a not in (26, 12, 5, 2)]
    if bad:
        raise UsageError(f"--attention {','.join(map(str, config['attention']))}: the ScoreNet's "
                         f"feature maps are 26, 12, 5 and 2 (a U-Net has its own: --model)")
    if len(config["channels"]) != 4:
        raise UsageError(f"--channels needs the four ScoreNet widths, e.g. 32,64,128,256; got "
                         f"{','.join(map(str, config['channels']))}")
    if int(config["embed_dim"]) % 2:
        raise UsageError(f"--embed-dim must be even (sin and cos halves), got {config['embed_dim']}")


def _sampler_options(sampler, **settings):
    try:
        return E.sampler_options(sampler, **settings)
    except ValueError as e:
        raise UsageError(str(e)) from None


# what a sampler option is called in evaluate's table and in a sample .npz
_OPTION_LABELS = {"S_churn": "churn", "S_tmin": "S_tmin", "rho": "rho", "S_noise": "S_noise"}
_OPTION_KEYS = {keyword: name for name, (_, keyword, _, _) in E.SAMPLER_SETTINGS.items()}


def _run_options(args, run, sampler, rows=False):
    """The options of samples drawn from ``run`` with ``sampler``: the flags (for evaluate's
    ``rows``, those that apply to this sampler), then the run's own where ``sampler`` is its
    sampler (E.run_sampler_options)."""
    given = {k: getattr(args, k) for k in E.SAMPLER_SETTINGS}
    if rows:
        given = {k: v for k, v in given.items() if v is not None and E.setting_applies(k, sampler)}
    try:
        return E.run_sampler_options(run.config, sampler, given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_sampler(sampler, sde_name, where):
    if sampler == "ancestral" and sde_name != "vp":
        raise UsageError(f"--sampler ancestral is DDPM's sampler for the VP SDE, but {where} is "
                         f"{sde_name}; choose em, pc, ode, heun, heun-sde, dpm2m or dpm2m-sde")


def _test_bits_per_dim(model, sde, config, n, root, backend, seed=0):
    """Mean bits/dim (and its standard error) of n test images picked with the seed; a
    conditional model is asked for log p(x | y) with the true labels."""
    from . import data, metrics
    test_x, test_y = data.load_dataset(config["dataset"], "test", root=root, verbose=False)
    n = min(n, len(test_x))
    mean, err = metrics.bits_per_dim_on_test_set(
        model, sde, test_x, n, seed, backend=backend,
        labels=None if model.num_classes is None else test_y)
    return mean, err, n


# -- sample ----------------------------------------------------------------------------------------

def _conditional_request(run, args, labels_flag, per_class, guidance):
    """Check labels and guidance against the run: (is conditional, guidance)."""
    cond = run.model.num_classes is not None
    if not cond:
        asked = [f for f, v in (("--labels", labels_flag), ("--per-class", per_class)) if v]
        if guidance is not None and any(w != 0 for w in np.atleast_1d(guidance)):
            asked.append("--guidance")
        if asked:
            raise UsageError(f"{run.path} is an unconditional model: it takes no "
                             f"{' / '.join(asked)}; drop them, or sample a conditional run")
        return False, None
    if labels_flag:
        bad = [v for v in labels_flag if not 0 <= v < run.model.num_classes]
        if bad:
            raise UsageError(f"--labels {','.join(map(str, bad))}: out of range; this model's "
                             f"classes are 0..{run.model.num_classes - 1}")
    return True, guidance


def sample(args, parser):
    from . import plot
    from .backend import get_backend

    get_backend(args.backend)
    run = _load_sampling_run(args)
    _check_sampler(args.sampler, run.sde.name, f"the SDE of {run.path}")
    options = _run_options(args, run, args.sampler)
    if args.trajectory and run.autoencoder is not None:
        raise UsageError("--trajectory follows pixels; a latent run's trajectories are codes "
                         "(not drawn yet): drop --trajectory")
    cond, guidance = _conditional_request(run, args, args.labels, args.per_class, args.guidance)
    if cond:
        guidance = float(run.config.get("guidance", 1.0)) if guidance is None else guidance
        labels, nrow = E.sample_labels(args.num_samples, args.labels, args.per_class,
                                       run.model.num_classes)
    else:
        labels, nrow = None, None
    n = len(labels) if labels is not None else (args.num_samples or 64)
    images, info = E.draw_samples(run.model, run.sde, n, args.sampler, args.steps, args.seed,
                                  args.batch, labels, guidance or 0.0, args.rtol,
                                  progress=not args.no_progress, decoder=run.autoencoder,
                                  options=options)
    folder = os.path.dirname(run.path)
    out = args.out or os.path.join(folder, "samples.npz")
    grid = args.grid or out[:-4] + ".png"
    meta = dict(sampler=args.sampler, steps=args.steps, nfe=info["nfe"], seed=args.seed,
                **{_OPTION_KEYS[k]: v for k, v in options.items()},
                guidance=np.nan if guidance is None else guidance, checkpoint=run.path)
    if "latents" in info:            # a latent run: the codes beside the decoded images
        meta["latents"] = info["latents"]
    save_npz(out, images=images, **({"labels": labels} if labels is not None else {}), **meta)
    plot.save_image_grid(images, grid, nrow=nrow)
    what = f", labels {_describe(labels)}, guidance {guidance:g}" if cond else ""
    _say(f"{n} samples ({args.sampler}, NFE {info['nfe']}{what}) in {info['seconds']:.1f} s: "
         f"{out}, {grid}")
    if args.trajectory:
        _save_trajectories(args, run, labels, guidance if cond else 0.0, options)
    return 0


def _save_trajectories(args, run, labels, guidance, options):
    """--trajectory FILE.gif: the first few images of the same draw followed from noise to data
    (FILE.gif, FILE.png strip), and as many test images noised along eq. 1 of docs/design.md at the same times
    (FILE_forward.gif / .png)."""
    from . import data, trajectory as TR
    k = min(args.trajectory_images, len(labels) if labels is not None else args.trajectory_images)
    if labels is not None:     # one image per class asked for, in the order of the grid
        labels = np.asarray(list(dict.fromkeys(labels.tolist())) * k)[:k]
    steps = None if args.sampler == "ode" else args.steps
    rec = TR.Recorder(steps, args.frames)
    E.draw_samples(run.model, run.sde, k, args.sampler, args.steps, args.seed, k, labels,
                   guidance, args.rtol, shape=E.sample_shape(run.config), callback=rec,
                   options=options)
    frames, times = rec.thinned()
    base = args.trajectory[:-4]
    TR.save_gif(frames, args.trajectory, times, run.sde)
    TR.save_strip(frames, base + ".png", times, run.sde)
    if E.is_folder(run.config):
        test_x, _ = _load_training_set(run.config, args)
    else:
        test_x, _ = data.load_dataset(run.config["dataset"], "test", root=args.data, verbose=False)
    pick = np.random.default_rng(args.seed).choice(len(test_x), size=k, replace=False)
    # the clean images (t = 0) first, then the sampler's times in increasing order
    # (EM and PC report t - dt after their last step, a hair below 0)
    forward_times = sorted(set([0.0] + [max(0.0, float(t)) for t in times]))
    noised = TR.forward_noising(run.sde, E.to_unit(test_x[pick]), forward_times,
                                np.random.default_rng(args.seed))
    TR.save_gif(noised, base + "_forward.gif", forward_times, run.sde)
    TR.save_strip(noised, base + "_forward.png", forward_times, run.sde)
    _say(f"trajectories of {k} images, {len(frames)} frames: {args.trajectory}, {base}.png "
         f"(noise to data), {base}_forward.gif, {base}_forward.png (data to noise, eq. 1)")


def _is_autoencoder_run(path):
    try:
        return E.resolve_config({}, os.path.dirname(E.checkpoint_path(path)) or ".")["model"] \
            == "autoencoder"
    except (ValueError, E.CheckpointError):
        return False   # not a readable run: load_run says what is wrong with the file itself


def _load_sampling_run(args):
    """load_run for sample / evaluate; an autoencoder run is refused (it draws nothing)."""
    if _is_autoencoder_run(args.run):
        raise UsageError(f"{args.run} is an autoencoder run: it reconstructs, it does not "
                         "sample; train a latent model on it (--preset fashion-latent-cond "
                         f"--autoencoder {args.run}) and sample that")
    return E.load_run(args.run, args.backend, use_ema=not args.no_ema)


def _describe(labels):
    u = np.unique(labels)
    return ",".join(map(str, u)) if len(u) <= 10 else f"{len(u)} classes"


def save_npz(path, **arrays):
    """np.savez through a temporary file and a rename, so a reader never sees half a file."""
    from .checkpoint import atomic_write
    return atomic_write(path, lambda f: np.savez(f, **arrays))


# -- evaluate --------------------------------------------------------------------------------------

def evaluate(args, parser):
    from . import data, metrics
    from .backend import get_backend
    if _is_autoencoder_run(args.run):
        return _evaluate_autoencoder(args)
    from .models.classifier import load_classifier

    backend = get_backend(args.backend)
    run = _load_sampling_run(args)
    if args.bpd and run.autoencoder is not None:
        raise UsageError("--bpd of a latent run would be the bits/dim of its codes, not of the "
                         "images; drop --bpd")
    for sampler in args.sampler:
        _check_sampler(sampler, run.sde.name, f"the SDE of {run.path}")
    # a sampler setting applies to the rows of the samplers it belongs to; refused if none
    for flag in E.SAMPLER_SETTINGS:
        value = getattr(args, flag)
        if value is not None and not any(E.setting_applies(flag, s) for s in args.sampler):
            _sampler_options(args.sampler[0], **{flag: value})
    cond, ws = _conditional_request(run, args, None, None, args.guidance)
    if cond:
        ws = ws or [float(run.config.get("guidance", 1.0))]
    else:
        ws = [None]
    # one sampler setting per ODE: its steps are the solver's, so a list of steps means nothing
    if args.nfe:
        try:
            settings = [(s, E.steps_for_nfe(s, k) or 500) for s in args.sampler
                        for k in (args.nfe if s != "ode" else args.nfe[:1])]
        except ValueError as e:
            raise UsageError(f"--nfe: {e}") from None
    else:
        settings = [(s, k) for s in args.sampler
                    for k in (args.steps if s != "ode" else args.steps[:1])]
    if args.from_file and (len(ws) > 1 or len(settings) > 1):
        raise UsageError("--from-file scores one set of images; give at most one --guidance, "
                         "--sampler and --steps")
    if len(ws) > 1 and len(settings) > 1:
        raise UsageError("sweep one thing at a time: several --guidance weights, or several "
                         "--sampler / --steps, not both")
    dataset = run.config["dataset"]
    if E.is_folder(run.config):
        # no shipped classifier and no test split: the user names a classifier for such images,
        # and the folder's even / odd images play train / test (the floor compares the two)
        if not args.classifier:
            raise UsageError(f"{dataset} has no shipped classifier: pass --classifier FILE.npz "
                             "(e.g. tinydiff/weights/classifier_cifar_10.npz for 32x32 RGB images, "
                             "or one trained with examples/train_classifier.py)")
        if args.bpd:
            raise UsageError("--bpd needs a test split; an image folder has none")
        classifier = load_classifier(None, path=args.classifier, backend=backend)
        folder_x, _ = _load_training_set(run.config, args)
        train_x, test_x = folder_x[0::2], folder_x[1::2]
        dataset = os.path.basename(dataset[len("folder:"):]) or dataset
    else:
        classifier = load_classifier(dataset, path=args.classifier, backend=backend)
        train_x, _ = data.load_dataset(dataset, "train", root=args.data, verbose=False)
        test_x, _ = data.load_dataset(dataset, "test", root=args.data, verbose=False)
    n, seed = args.samples, args.seed
    floor = metrics.frechet_classifier_distance(train_x, test_x, classifier, n, seed)
    real_x = train_x if args.against == "train" else test_x
    if args.against == "train":
        dataset = f"{dataset} (vs train)"
    sde = {"ve": "VE", "vp": "VP", "subvp": "sub-VP"}.get(run.sde.name, run.sde.name)
    name = (f"{E.model_title(run.config)} {'cond.' if cond else 'uncond.'} {sde} "
            f"{os.path.basename(os.path.dirname(run.path))} (epoch {run.state['epoch']})")
    if args.header:
        print(HEADER)
    rows = []
    for sampler, num_steps in settings:
        options = _run_options(args, run, sampler, rows=True)     # this sampler's settings
        for w in ws:
            row = _evaluate_row(args, run, cond, sampler, num_steps, w, classifier, real_x, floor,
                                backend, options, first=not rows)
            row.update(sampler=sampler, steps=num_steps)
            seconds = row["seconds"]
            timing = "–" if not np.isfinite(seconds) else \
                f"{seconds:.0f} s ({1000 * seconds / n:.0f} ms/sample, {backend.name})"
            steps = (f"rtol {args.rtol:g} ({row['nfe']})" if sampler == "ode"
                     else f"{num_steps} ({row['nfe']})")
            settings = ", ".join(f"{_OPTION_LABELS[k]} {v:g}" for k, v in options.items())
            if settings:
                sampler = f"{sampler} ({settings})"
            if args.from_file:         # the file's images: this command drew nothing
                sampler, steps = "from file", "–"
            weight = "–" if row["guidance"] is None else f"{row['guidance']:g}"
            print(f"| {dataset} | {name} | {sampler} | {steps} | {weight} | {n} (seed {seed}) | "
                  f"{row['fd']:.1f} ({floor:.1f}) | {row['classes']} | {row['bpd']} | {timing} |",
                  flush=True)
            rows.append(row)
    if args.ceilings:
        ref = metrics.reference_distances(train_x, test_x, classifier, n, seed)
        print(f"reference points at n={n}, seed={seed}: " +
              ", ".join(f"{k} {v:.1f}" for k, v in ref.items()))
    if len(rows) > 1:
        _write_sweep(args, run, rows, floor, dataset, n, guidance_sweep=len(ws) > 1)
    return 0


def _evaluate_autoencoder(args):
    """`tinydiff evaluate AE_RUN`: what the autoencoder alone costs. ``--samples`` test images
    are encoded and decoded; printed: their MSE and PSNR, the Fréchet distance of the
    reconstructions against the test set (beside the floor, train against test, at the same count
    and seed, and the test images themselves in the reconstructions' place), and the shipped
    classifier's accuracy on the reconstructions and on the originals."""
    from . import data, metrics
    from .backend import get_backend
    from .models.autoencoder import decode_all, encode_all
    from .models.classifier import load_classifier
    sampling_only = [f for f, given in (("--sampler", args.sampler != ["em"]),
                                        ("--guidance", args.guidance), ("--bpd", args.bpd),
                                        ("--from-file", args.from_file),
                                        ("--steps / --nfe", args.nfe or args.steps != [500]))
                     if given]
    if sampling_only:
        raise UsageError(f"{args.run} is an autoencoder run: evaluate scores its reconstructions "
                         f"of test images; {', '.join(sampling_only)} apply to score models")
    backend = get_backend(args.backend)
    try:
        model, _ = E.load_autoencoder(args.run, args.backend)
    except E.CheckpointError as e:
        raise UsageError(str(e)) from None
    config = E.resolve_config({}, os.path.dirname(E.checkpoint_path(args.run)) or ".")
    dataset, n, seed = config["dataset"], args.samples, args.seed
    classifier = load_classifier(dataset, path=args.classifier, backend=backend)
    train_x, _ = data.load_dataset(dataset, "train", root=args.data, verbose=False)
    test_x, test_y = data.load_dataset(dataset, "test", root=args.data, verbose=False)
    picked, picked_y = metrics.select(test_x, n, seed, labels=test_y)
    start = time.perf_counter()
    recon = decode_all(model, encode_all(model, picked, batch_size=args.batch), args.batch)
    seconds = time.perf_counter() - start
    clean = E.to_unit(picked)
    mse = float(np.mean((recon - clean) ** 2))
    fd = metrics.frechet_classifier_distance(recon, test_x, classifier, n, seed)
    floor = metrics.frechet_classifier_distance(train_x, test_x, classifier, n, seed)
    itself = metrics.frechet_classifier_distance(clean, test_x, classifier, n, seed)
    acc_recon = float(np.mean(metrics.classifier_predict(recon, classifier, args.batch) == picked_y))
    acc_clean = float(np.mean(metrics.classifier_predict(clean, classifier, args.batch) == picked_y))
    shape = "x".join(map(str, model.latent_shape))
    print(f"| {dataset} | autoencoder {os.path.basename(os.path.dirname(E.checkpoint_path(args.run)))} "
          f"({shape} codes, {model.compression:g}x) | {n} test images (seed {seed}) | "
          f"MSE {mse:.5f}, PSNR {10 * np.log10(1 / mse):.2f} dB | Fréchet dist. of the "
          f"reconstructions {fd:.1f} (the originals {itself:.1f}; floor {floor:.1f}) | classifier "
          f"accuracy {100 * acc_recon:.1f} % (originals {100 * acc_clean:.1f} %) | "
          f"{seconds:.1f} s to encode and decode ({backend.name}) |", flush=True)
    return 0


def _evaluate_row(args, run, cond, sampler, num_steps, w, classifier, real_x, floor, backend,
                  options, first):
    """Draw (or read) one set of images (``options``: the sampler's own settings) and score it
    against ``real_x`` (the test or training images, --against): a dict with fd, classes, bpd,
    nfe, ..."""
    from . import metrics
    n, seed = args.samples, args.seed
    if args.from_file:
        images, labels, info = _read_samples(args.from_file, cond)
        w = info.pop("guidance", w)
    else:
        labels = np.arange(n) % run.model.num_classes if cond else None
        images, info = E.draw_samples(run.model, run.sde, n, sampler, num_steps, seed, args.batch,
                                      labels, w or 0.0, args.rtol, shape=E.sample_shape(run.config),
                                      progress=not args.no_progress, decoder=run.autoencoder,
                                      options=options)
        if args.save:
            save_npz(args.save, images=images, **({"labels": labels} if cond else {}),
                     guidance=np.nan if w is None else w)
    fd = metrics.frechet_classifier_distance(images, real_x, classifier, n, seed)
    row = {"guidance": w, "fd": fd, "floor": floor, "nfe": info.get("nfe", 0),
           "seconds": info.get("seconds", float("nan")), "accuracy": None, "bpd": "–"}
    if cond:
        row["accuracy"] = metrics.conditional_accuracy(images, labels, classifier, n, seed)
        row["classes"] = f"cond. acc. {100 * row['accuracy']:.1f}%"
    else:
        row["classes"] = str(metrics.class_coverage(images, classifier, n, seed))
    if args.bpd and first:
        mean, err, k = _test_bits_per_dim(run.model, run.sde, run.config, args.bpd, args.data,
                                          backend, seed)
        row["bpd"] = f"{mean:.3f} ± {err:.3f} (n={k}{', given y' if cond else ''})"
    return row


def _write_sweep(args, run, rows, floor, dataset, n, guidance_sweep):
    """The plot and CSV of a sweep over guidance weights or over samplers and steps."""
    from . import plot
    folder = os.path.dirname(run.path)
    if guidance_sweep:
        path = args.plot or os.path.join(folder, "guidance_sweep.png")
        r0 = rows[0]
        plot.plot_guidance_sweep(path, [r["guidance"] for r in rows], [r["accuracy"] for r in rows],
                                 [r["fd"] for r in rows], floor,
                                 title=f"{dataset}, {r0['sampler']} {r0['steps']} steps, n={n}")
    else:
        path = args.plot or os.path.join(folder, "nfe_sweep.png")
        plot.plot_nfe_sweep(path, rows, floor, title=f"{dataset}, n={n}, seed {args.seed}")
    table = path[:-4] + ".csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sampler", "steps", "nfe", "guidance", "conditional_accuracy",
                         "frechet_distance", "floor", "samples", "seconds"])
        for r in rows:
            writer.writerow([r["sampler"], r["steps"], r["nfe"], r["guidance"], r["accuracy"],
                             r["fd"], floor, n, r["seconds"]])
    _say(f"{'guidance' if guidance_sweep else 'sampler'} sweep: {path}, {table}")


def _read_samples(path, cond):
    """images, labels, info from an .npz of ``tinydiff sample``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise UsageError(f"--from-file {path}: no 'images' array; pass an .npz written by "
                                 "`tinydiff sample`")
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else None
            info = {"guidance": float(f["guidance"])} if "guidance" in f.files else {}
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--from-file {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if cond and labels is None:
        raise UsageError(f"--from-file {path} has no 'labels'; a conditional run is scored against "
                         "the labels the images were drawn for")
    if info.get("guidance") is not None and not np.isfinite(info["guidance"]):
        info.pop("guidance")
    return images, labels, info
