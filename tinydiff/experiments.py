"""Named experiments: what to train (data set, model, conditional or not) and how (the recipe),
and the pieces every command builds from a run's configuration.

A run's configuration is one flat dict: ``DEFAULTS``, then the preset, then the recipe, then (when
resuming or sampling) the settings stored in its checkpoint, then the flags given explicitly.
``tinydiff train / sample / evaluate`` (tinydiff/cli.py) and the examples are thin layers over it:

    config = resolve_config({"preset": "mnist-cond", "epochs": 2})
    sde, model = build_sde(config), build_model(config, "numpy")
    run = load_run("runs/mnist_cond")            # a trained run: model (EMA weights), sde, config
    images, labels = draw_samples(run.model, run.sde, 16, labels=np.arange(16) % 10, guidance=1.0)
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np

from . import sampling
from .backend import backend_of, get_backend
from .checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, read_config

# How to train. 'reference' is Song's tutorial; 'fast' and 'cond' were chosen by measurement for
# short CPU runs (docs/training.md: what a run gives; docs/cli.md: the conditional recipe).
RECIPES = {
    "reference": dict(optimizer="adam", lr=1e-4, batch_size=32, epochs=50, warmup=0,
                      schedule="constant", min_lr=1.0, weight_decay=0.0, ema=0.0,
                      ema_warmup=False, clip=None),
    # fast: log-normal noise levels and the stochastic Heun sampler (docs/training.md: measured
    # against uniform times and Euler-Maruyama, a wider and an EDM-weighted log-normal, cosine)
    # (the per-epoch grids with 25 steps, 49 evaluations: a tenth of the final samples' cost;
    # the sampler's fresh noise 5 % above what it removes, and churn down to sigma = 0.01:
    # docs/sampling.md, measured on this recipe's checkpoint)
    "fast": dict(optimizer="adam", lr=3e-3, batch_size=64, epochs=4, warmup=300,
                 schedule="constant", min_lr=1.0, weight_decay=0.0, ema=0.999, ema_warmup=True,
                 clip=None, noise="lognormal", sampler="heun-sde", sample_steps=250,
                 grid_steps=25, s_noise=1.05, s_tmin=0.01),
    # the report's conditional recipe (AdamW; cosine annealing, then a constant learning rate)
    # with the fast recipe's warm-up and EMA, and clipping
    "cond": dict(optimizer="adamw", lr=3e-3, batch_size=64, epochs=5, warmup=300,
                 schedule="cosine-then-constant", min_lr=0.1, weight_decay=1e-2, ema=0.999,
                 ema_warmup=True, clip=1.0),
}

# The U-Net recipe: the report's CIFAR recipe (AdamW, cosine annealing then a constant rate, its
# answer to a loss that exploded after ~40 epochs) with warm-up, clipping and the ramped EMA; a
# lower peak rate than the ScoreNet's, as residual U-Nets are usually trained.
RECIPES["unet"] = dict(RECIPES["cond"], lr=1e-3, epochs=2)
# Latent diffusion (docs/latent.md). The autoencoder: plain Adam with a short warm-up and clipping,
# no EMA (its weights are used as saved, also to measure the latent scale), 2 epochs. The latent
# U-Net: the U-Net recipe over 4 epochs (an epoch of 7x7 codes costs an eighth of a pixel epoch;
# 4 take what one epoch of the half-width pixel model takes).
RECIPES["ae"] = dict(optimizer="adam", lr=2e-3, batch_size=64, epochs=2, warmup=100,
                     schedule="constant", min_lr=1.0, weight_decay=0.0, ema=0.0, ema_warmup=False,
                     clip=1.0)
RECIPES["latent"] = dict(RECIPES["unet"], epochs=4)

# the grids of the U-Net presets: 25 steps of the stochastic Heun sampler (49 evaluations)
_UNET_GRIDS = dict(sampler="heun-sde", sample_steps=25)

# What to train. Sizes of the attention blocks refer to the model's feature maps: the ScoreNet's
# 26/12/5/2, a U-Net's resolutions (28/14/7 for unet-28s, 32/16/8/4 for the 32 px ones).
PRESETS = {
    "mnist": dict(dataset="mnist", conditional=False, attention=[], recipe="fast",
                  out="runs/mnist_uncond"),
    "mnist-cond": dict(dataset="mnist", conditional=True, attention=[5, 2], recipe="cond",
                       out="runs/mnist_cond"),
    # the U-Nets (a 30-minute CPU run: --base-channels 16, README)
    "fashion-mnist": dict(dataset="fashion-mnist", conditional=False, model="unet-28s",
                          attention=[7], recipe="unet", show_real=True, **_UNET_GRIDS,
                          out="runs/fashion_uncond"),
    "fashion-mnist-cond": dict(dataset="fashion-mnist", conditional=True, model="unet-28s",
                               attention=[7], recipe="unet", show_real=True, **_UNET_GRIDS,
                               out="runs/fashion_cond"),
    "cifar10": dict(dataset="cifar-10", conditional=False, model="unet-32s", attention=[8],
                    recipe="unet", hflip=True, show_real=True, per_class=6, **_UNET_GRIDS,
                    out="runs/cifar10_uncond"),
    "cifar10-cond": dict(dataset="cifar-10", conditional=True, model="unet-32s", attention=[8],
                         recipe="unet", hflip=True, show_real=True, per_class=6, **_UNET_GRIDS,
                         out="runs/cifar10_cond"),
    # your own images: --dataset folder:PATH (one sub-folder per class for folder-cond),
    # centre-cropped and resized to --image-size
    "folder": dict(dataset=None, conditional=False, model="unet-32s", attention=[8], recipe="unet",
                   hflip=True, show_real=True, image_size=32, out="runs/folder"),
    "folder-cond": dict(dataset=None, conditional=True, model="unet-32s", attention=[8],
                        recipe="unet", hflip=True, show_real=True, image_size=32, per_class=6,
                        out="runs/folder_cond"),
    # latent diffusion (docs/latent.md): first the autoencoder, then a U-Net on its 2x7x7 codes
    # (--autoencoder RUN_DIR names the first run); the grids and samples are decoded images
    # the autoencoder at 16 base channels: 5.6 min an epoch on 2 cores (docs/latent.md)
    "fashion-ae": dict(dataset="fashion-mnist", conditional=False, model="autoencoder",
                       base_channels=16, attention=[], recipe="ae", out="runs/fashion_ae"),
    "fashion-latent-cond": dict(dataset="fashion-mnist", conditional=True, model="unet-latent",
                                attention=[7], recipe="latent", show_real=True, latent=True,
                                **_UNET_GRIDS,
                                out="runs/fashion_latent_cond"),
}

# sigma belongs to the VE SDE, beta_min / beta_max to VP and sub-VP (None: that SDE's default);
# base_channels ... group_channels override the named U-Net configuration (None: the configuration's)
DEFAULTS = dict(preset="mnist", backend="numpy", seed=0, sde="ve", sigma=25.0, beta_min=None,
                beta_max=None, model="scorenet",
                channels=[32, 64, 128, 256], embed_dim=256, num_heads=4, p_uncond=0.1,
                base_channels=None, channel_mult=None, num_res_blocks=None, dropout=None,
                group_channels=None, cosine_epochs=None, sampler="em", sample_steps=500,
                churn=None, rho=None, s_noise=None, s_tmin=None, grid_sampler=None,
                grid_steps=None, num_samples=64, per_class=8,
                guidance=1.0, sample_every=1, limit=None, nonfinite="stop", log_every=1,
                show_real=False, noise="uniform", p_mean=-1.2, p_std=1.2, p_uniform=0.0, loss_weight="none",
                sigma_data=0.5, hflip=False, image_size=None, image_channels=None,
                on_bad_file="error", num_classes=None, image_shape=None,
                # latent diffusion: the autoencoder's settings, and the run a latent model uses
                latent=False, autoencoder=None, autoencoder_hash=None, latent_channels=2,
                corruption="none", corruption_level=None, latent_noise=0.0, kl_weight=0.0)

NUM_CLASSES = 10          # every data set tinydiff ships a loader for has ten classes
IMAGE_SHAPE = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar-10": (3, 32, 32)}


def is_folder(config):
    """Whether the run trains on an image folder (``dataset`` "folder:PATH")."""
    return str(config.get("dataset") or "").lower().startswith("folder:")


def resolve_config(explicit, run_dir=None, default_preset=None):
    """The run's settings (see the module docstring). ``explicit``: the flags given; ``run_dir``:
    a run whose checkpoint's settings take precedence over the preset and recipe;
    ``default_preset``: the preset when neither the flags nor the checkpoint name one."""
    saved = read_config(os.path.join(run_dir, CHECKPOINT)) if run_dir else {}
    preset = explicit.get("preset", saved.get("preset", default_preset or DEFAULTS["preset"]))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = explicit.get("recipe", saved.get("recipe", PRESETS[preset]["recipe"]))
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if saved and "model" not in saved:          # runs from before the U-Net were ScoreNets
        saved = {**saved, "model": "scorenet"}
    if saved and saved["model"].startswith("unet") and "group_channels" not in saved:
        # U-Net runs from before group_channels: one channel per group outside ResBlock.norm2
        # (tinydiff.models.unet.GROUP_CHANNELS says why new runs keep 4)
        saved = {**saved, "group_channels": 1}
    config = {**DEFAULTS, **PRESETS[preset], **RECIPES[recipe], **saved, **explicit,
              "preset": preset, "recipe": recipe}
    for key in ("channels", "attention"):       # older runs stored "32,64,128,256"
        config[key] = _int_list(config[key])
    if config["dataset"] is None:
        raise ValueError(f"preset {preset} trains on your own images: pass --dataset folder:PATH "
                         "(a folder of PNG/JPEG files, one sub-folder per class for a conditional "
                         "run)")
    if not is_folder(config):
        from .data import _ALIASES
        config["dataset"] = _ALIASES.get(config["dataset"].lower(), config["dataset"].lower())
        if config["dataset"] not in IMAGE_SHAPE:
            raise ValueError(f"unknown data set {config['dataset']!r}; choose one of "
                             f"{', '.join(IMAGE_SHAPE)}, or folder:PATH for a folder of images")
    config.update(_sde_settings(config, explicit))
    if run_dir and _sde_settings(saved, {}) != _sde_settings(config, {}):
        was, now = build_sde(saved), build_sde(config)
        raise ValueError(f"{os.path.join(run_dir, CHECKPOINT)} was trained with {was!r}, not "
                         f"{now!r}; a model learns the score of one SDE: drop --sde / --sigma / "
                         f"--beta-min / --beta-max, or train a new run")
    return config


def _sde_settings(config, explicit):
    """The SDE keys of a run configuration: "sde" and the parameters of that SDE (its defaults
    where unset); the parameters of the other SDEs are None, so a run records only what it uses
    (and a VE run written before the VP SDEs existed reads the same). A parameter flag given for
    another SDE is refused."""
    from .sde import SDE_PARAMS, make_sde
    name = config.get("sde", "ve")
    if name not in SDE_PARAMS:
        raise ValueError(f"--sde must be one of {', '.join(SDE_PARAMS)}, got {name!r}")
    for key in sorted(explicit):
        owners = [k for k, params in SDE_PARAMS.items() if key in params]
        if owners and name not in owners:
            raise ValueError(f"--{key.replace('_', '-')} {explicit[key]} is a parameter of --sde "
                             f"{' / '.join(owners)}, not of --sde {name}")
    given = {k: config[k] for k in SDE_PARAMS[name] if config.get(k) is not None}
    others = {k: None for params in SDE_PARAMS.values() for k in params}
    return {**others, **make_sde(name, **given).config()}


def _int_list(v):
    if isinstance(v, str):
        return [int(p) for p in v.split(",") if p.strip()]
    return [int(p) for p in v]


# -- building a run's pieces -----------------------------------------------------------------

def build_sde(config):
    """The run's SDE (tinydiff.sde): "sde" names it ("ve" when absent, as in older runs), its
    parameters sit under their own names (sigma; beta_min, beta_max)."""
    from .sde import sde_from_config
    return sde_from_config(config)


def build_model(config, backend="numpy", sde=None):
    """The score model the configuration describes (weights drawn from ``config['seed']``): the
    reference ScoreNet (``model`` "scorenet") or a named U-Net (tinydiff.models.unet)."""
    from . import nn
    from .models import ScoreNet
    from .models.unet import unet_from_config
    sde = sde or build_sde(config)
    nn.manual_seed(int(config["seed"]))
    if config["model"] == "autoencoder":
        return build_autoencoder(config).to(get_backend(backend))
    in_channels, size, _ = sample_shape(config)
    num_classes = num_classes_of(config) if config["conditional"] else None
    if config["model"] == "scorenet":
        if size != 28:
            raise ValueError(f"the ScoreNet fits 28x28 images, not {size}x{size}; use --model "
                             "unet-32s (or another U-Net) for this data set")
        model = ScoreNet(sde.marginal_std, channels=tuple(config["channels"]),
                         embed_dim=int(config["embed_dim"]), in_channels=in_channels,
                         num_classes=num_classes, attention=tuple(config["attention"]),
                         num_heads=int(config["num_heads"]))
    else:
        overrides = {k: config[k] for k in UNET_OVERRIDES if config.get(k) is not None}
        if "channel_mult" in overrides:
            overrides["channel_mult"] = tuple(_int_list(overrides["channel_mult"]))
        model = unet_from_config(config["model"], sde.marginal_std, in_channels=in_channels,
                                 num_classes=num_classes, image_size=size,
                                 attention=tuple(config["attention"]),
                                 num_heads=int(config["num_heads"]), **overrides)
    return model.to(get_backend(backend))


UNET_OVERRIDES = ("base_channels", "channel_mult", "num_res_blocks", "dropout", "group_channels")


def build_autoencoder(config):
    """The Autoencoder (tinydiff.models.autoencoder) of an autoencoder run's configuration, on
    the host; ``base_channels`` None is the model's 32."""
    from .models.autoencoder import Autoencoder
    c, size, _ = sample_shape(config)
    kw = {"base_channels": int(config["base_channels"])} if config.get("base_channels") else {}
    return Autoencoder(in_channels=c, image_size=size, latent_channels=int(config["latent_channels"]),
                       corruption=config["corruption"], corruption_level=config["corruption_level"],
                       latent_noise=float(config["latent_noise"]),
                       kl_weight=float(config["kl_weight"]), **kw)


def checkpoint_hash(path):
    """The first 16 hex digits of the SHA-256 of a checkpoint file: which weights a cache or a
    latent run was made with."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_autoencoder(run, backend="numpy"):
    """(autoencoder in eval mode, its checkpoint's hash) from an autoencoder run's folder (or
    checkpoint); CheckpointError if the run is not an autoencoder."""
    path = checkpoint_path(run)
    config = resolve_config({}, os.path.dirname(path) or ".")
    if config["model"] != "autoencoder":
        raise CheckpointError(f"{path} is not an autoencoder (its model is {config['model']}); "
                              "pass --autoencoder a run of --preset fashion-ae")
    model = build_model(config, backend)
    state = load_checkpoint(path)
    weights = dict(state["model"])
    if state.get("ema") is not None:
        weights.update(state["ema"]["shadow"])
    try:
        model.load_state_dict(weights)
    except Exception as e:
        raise CheckpointError(f"{path} does not fit the autoencoder its configuration "
                              f"describes: {e}") from e
    return model.eval(), checkpoint_hash(path)


def check_latent_shape(config, autoencoder, where):
    """Refuse (ValueError, one line) an autoencoder whose codes are not the latent run's shape."""
    want = tuple(int(v) for v in config["image_shape"])
    if tuple(autoencoder.latent_shape) != want:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        raise ValueError(f"{where} was trained on {shape(want)} codes, but the autoencoder "
                         f"{config['autoencoder']} makes {shape(autoencoder.latent_shape)} codes; "
                         "use the autoencoder it was trained with, or train a new latent run")


def num_classes_of(config):
    """Classes of the run's data set: ten for the built-in ones, the class sub-folders' count
    (stored in the run when it is trained) for an image folder."""
    return int(config["num_classes"]) if config.get("num_classes") else NUM_CLASSES


def build_optimizer(model, config, steps_per_epoch):
    """(optimizer, LR scheduler, EMA or None) of the recipe."""
    from . import optim
    kind, lr, wd = config["optimizer"], float(config["lr"]), float(config["weight_decay"])
    if kind == "adam":
        opt = optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    elif kind == "adamw":
        opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; choose adam or adamw")
    if config["schedule"] == "constant":
        after = optim.constant()
    elif config["schedule"] == "cosine-then-constant":
        # cosine from lr to min_lr * lr over the run's first cosine_epochs (default: all), then
        # constant: the report's fix for a loss that kept exploding late in long runs
        epochs = config.get("cosine_epochs") or config["epochs"]
        after = optim.cosine_then_constant(max(1, int(epochs) * steps_per_epoch - int(config["warmup"])),
                                           float(config["min_lr"]))
    else:
        raise ValueError(f"unknown schedule {config['schedule']!r}; choose constant or "
                         "cosine-then-constant")
    n = int(config["warmup"])    # linear warm-up from lr / n to lr over n steps
    schedule = optim.warmup_then(after, n, start_factor=1.0 / n) if n else after
    ema = optim.EMA(model, float(config["ema"]), warmup=bool(config["ema_warmup"])) \
        if config["ema"] else None
    return opt, optim.LRScheduler(opt, schedule), ema


def sample_shape(config):
    """(C, H, W) of the run's images: the data set's, or an image folder's as stored in the run."""
    if config.get("image_shape"):
        return tuple(int(v) for v in config["image_shape"])
    if is_folder(config):
        raise ValueError(f"the shape of {config['dataset']}'s images is known once it is read; "
                         "load the data first (tinydiff train does)")
    return IMAGE_SHAPE[config["dataset"]]


def model_title(config):
    """A few words naming the run's model in tables."""
    model = config.get("model", "scorenet")
    if model == "autoencoder":
        return "Autoencoder"
    name = "ScoreNet" if model == "scorenet" else f"U-Net {model}"
    return f"latent {name}" if config.get("latent") else name


def build_training_noise(config):
    """The run's TrainingNoise (tinydiff.sde): which noise levels the loss draws, how each counts."""
    from .sde import TrainingNoise
    return TrainingNoise(config["noise"], float(config["p_mean"]), float(config["p_std"]),
                         config["loss_weight"], float(config["sigma_data"]),
                         float(config.get("p_uniform") or 0.0))


def grid_labels(config):
    """Labels of the per-epoch / final grids of a conditional run: ``per_class`` of each class,
    one row per class (None for unconditional runs)."""
    if not config["conditional"]:
        return None
    return np.repeat(np.arange(num_classes_of(config)), int(config["per_class"]))


def to_unit(images):
    """Host images as the samplers draw them: float32 (N, C, H, W) in [0, 1] (uint8 / 255; a
    channel axis added to (N, H, W))."""
    x = np.asarray(images)
    x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)
    return x[:, None] if x.ndim == 3 else x


def real_examples(images, labels, like_labels=None, n=64, seed=0):
    """Training images to show beneath a grid of samples: for a conditional grid (``like_labels``,
    the grid's labels in order) one image of the same class per sample, else ``n`` images; drawn
    without replacement with ``seed`` so every epoch's grid shows the same ones."""
    rng = np.random.default_rng(seed)
    if like_labels is None:
        idx = rng.choice(len(images), size=min(n, len(images)), replace=False)
    else:
        labels = np.asarray(labels)
        idx = np.empty(len(like_labels), np.int64)
        for c in np.unique(like_labels):
            where = np.flatnonzero(like_labels == c)
            pool = np.flatnonzero(labels == c)
            if not len(pool):
                raise ValueError(f"no training image of class {c} to show beneath the grid")
            idx[where] = rng.choice(pool, size=len(where), replace=len(pool) < len(where))
    real = images[idx]
    return to_unit(backend_of(real).to_host(real) if not isinstance(real, np.ndarray) else real)


# -- trained runs ----------------------------------------------------------------------------

class Run(NamedTuple):
    model: object       # the ScoreNet in eval mode, EMA weights when the run kept them
    sde: object
    config: dict
    state: dict         # the checkpoint (epoch, step, loss history, ...)
    path: str           # the checkpoint file
    autoencoder: object = None   # a latent run's autoencoder (its decoder turns codes to images)


def checkpoint_path(run):
    """A run folder or a checkpoint file -> the checkpoint file (CheckpointError if absent)."""
    path = os.path.join(run, CHECKPOINT) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        where = (f"{run} has no {CHECKPOINT}" if os.path.isdir(run) else f"{run} does not exist")
        raise CheckpointError(f"{where}; pass a run folder written by `tinydiff train` (or its "
                              f"{CHECKPOINT})")
    return path


def load_run(run, backend="numpy", use_ema=True):
    """A trained run from its folder (or checkpoint file): ``Run(model, sde, config, state,
    path)``, the model rebuilt from the stored configuration, in eval mode, with the EMA weights
    when the run kept an EMA (``use_ema=False``: the raw weights)."""
    path = checkpoint_path(run)
    state = load_checkpoint(path)
    config = resolve_config({}, os.path.dirname(path) or ".")
    sde = build_sde(config)
    model = build_model(config, backend, sde)
    weights = dict(state["model"])
    if use_ema and state.get("ema") is not None:
        weights.update(state["ema"]["shadow"])
    try:
        model.load_state_dict(weights)
    except Exception as e:
        raise CheckpointError(f"{path} does not fit the model its configuration describes: {e}") from e
    autoencoder = None
    if config.get("latent"):
        autoencoder, digest = load_autoencoder(config["autoencoder"], backend)
        try:
            check_latent_shape(config, autoencoder, path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if config.get("autoencoder_hash") and digest != config["autoencoder_hash"]:
            raise CheckpointError(f"{path} was trained on the codes of autoencoder checkpoint "
                                  f"{config['autoencoder_hash']}, but {config['autoencoder']} now "
                                  f"holds {digest} (retrained?); its samples would decode wrongly")
    return Run(model.eval(), sde, config, state, path, autoencoder)


# -- drawing samples ---------------------------------------------------------------------------

SAMPLERS = sampling.SAMPLERS


def draw_samples(model, sde, num_samples, sampler="em", steps=500, seed=0, batch_size=500,
                 labels=None, guidance=0.0, rtol=1e-5, shape=None, progress=False, callback=None,
                 decoder=None, options=None):
    """``num_samples`` images from a score model, in batches, seeded.

    Returns (images, info): images a host float32 array (N, C, H, W) clipped to [0, 1]; info a dict
    with ``raw`` (the unclipped samples), ``nfe`` (score evaluations per sample: steps for em,
    2 steps for pc, 2 steps - 1 for heun / heun-sde, steps for dpm2m / dpm2m-sde, the solver's
    count for ode; a guided evaluation is one batched call on 2N) and ``seconds``. ``sampler`` "ancestral" (DDPM's) needs
    the VP SDE. ``callback(i, t, x)`` is passed to the sampler (every batch; see
    tinydiff.trajectory for a recorder). ``decoder``: a latent run's autoencoder; the samples are
    then normalised codes, decoded (``decode_normalised``) into the returned images, and
    ``info["latents"]`` holds the codes (``raw`` too). ``options``: keyword arguments of the
    sampler itself (``sampler_options``: e.g. S_churn for "heun-sde").
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "ancestral":
        sampling.ancestral_betas(sde, steps)          # refuses a non-VP SDE before any work
    be = model.backend
    shape = tuple(shape or (model.in_channels, getattr(model, "image_size", 28),
                            getattr(model, "image_size", 28)))
    out, nfe = [], 0
    start = time.perf_counter()
    for i in range(0, num_samples, batch_size):
        m = min(batch_size, num_samples - i)
        y = None if labels is None else be.asarray(np.asarray(labels[i:i + m], np.int64))
        score_fn = sampling.model_score_fn(model, labels=y, guidance=guidance)
        rng = be.default_rng(_batch_seed(seed, i))
        x, k = sampling.sample(sampler, score_fn, sde, (m, *shape), steps, rtol=rtol, rng=rng,
                               backend=be.name, progress=progress, callback=callback,
                               **(options or {}))
        nfe = max(nfe, k)            # the ODE's count varies by batch: report the largest
        out.append(backend_of(x).to_host(x))
    be.synchronize()
    raw = np.concatenate(out).astype(np.float32)
    if decoder is not None:
        from .models.autoencoder import decode_all
        images = decode_all(decoder, raw, batch_size)
        return np.clip(images, 0.0, 1.0), {"raw": raw, "latents": raw, "nfe": nfe,
                                           "seconds": time.perf_counter() - start}
    return np.clip(raw, 0.0, 1.0), {"raw": raw, "nfe": nfe, "seconds": time.perf_counter() - start}


KARRAS_GRID = ("heun", "heun-sde", "dpm2m", "dpm2m-sde")   # the samplers on Karras et al.'s grid
STOCHASTIC_GRID = ("heun-sde", "dpm2m-sde")                # ... of them, those that draw noise
# the run settings that are sampler options: (flag, keyword of the sampler, the samplers that
# take it, what it is)
SAMPLER_SETTINGS = {
    "churn": ("--churn", "S_churn", ("heun-sde",), "is the noise of the heun-sde sampler"),
    "s_tmin": ("--s-tmin", "S_tmin", ("heun-sde",), "is where the heun-sde sampler churns"),
    "rho": ("--rho", "rho", KARRAS_GRID,
            f"is the exponent of the noise grid of {', '.join(KARRAS_GRID)}"),
    "s_noise": ("--s-noise", "S_noise", STOCHASTIC_GRID,
                f"scales the fresh noise of {' and '.join(STOCHASTIC_GRID)}"),
}


def sampler_options(sampler, churn=None, rho=None, s_noise=None, s_tmin=None):
    """The sampler's own keyword arguments from the command line's settings, each refused (a
    one-line ValueError) for a sampler it does not apply to: ``churn`` is S_churn of "heun-sde"
    (EDM's Algorithm 2; None: its default 40) and ``s_tmin`` the smallest noise level it churns at
    (None: 0.05); ``rho`` the exponent of the Karras grid of heun, heun-sde, dpm2m and dpm2m-sde
    (None: 7); ``s_noise`` the factor on the fresh noise of heun-sde and dpm2m-sde (None: 1,
    exact for an exact score)."""
    options = {}
    given = {"churn": churn, "s_tmin": s_tmin, "rho": rho, "s_noise": s_noise}
    for name, (flag, key, owners, what) in SAMPLER_SETTINGS.items():
        if given[name] is None:
            continue
        if sampler not in owners:
            hint = " or use --sampler heun-sde" if owners == ("heun-sde",) else ""
            raise ValueError(f"{flag} {what}; sampler {sampler!r} has no such setting: drop "
                             f"{flag}{hint}")
        options[key] = float(given[name])
    return options


def run_sampler_options(config, sampler, given=None):
    """The options of samples drawn from a run with ``sampler``: the settings ``given``
    explicitly (a dict over SAMPLER_SETTINGS; None values are not given), and, where one is not
    given and ``sampler`` is the run's own sampler, the run's (its recipe's or flags') setting.
    So a recipe's sampler settings follow its sampler into the grids, ``tinydiff sample`` and
    ``evaluate``, and stay out of the samples of any other sampler."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    settings = dict(given)
    if sampler == config.get("sampler"):
        for k in SAMPLER_SETTINGS:
            if k not in given and config.get(k) is not None and setting_applies(k, sampler):
                settings[k] = config[k]            # the run's, where it fits this sampler
    return sampler_options(sampler, **settings)


def setting_applies(setting, sampler):
    """Whether sampler setting ``setting`` (a key of SAMPLER_SETTINGS) is an option of ``sampler``."""
    return sampler in SAMPLER_SETTINGS[setting][2]


# score evaluations per step of each sampler (ode: the solver decides; heun: 2 per step, one less
# at the end, where the last step to sigma = 0 is a plain Euler step; dpm2m: 1 per step)
def steps_for_nfe(sampler, nfe):
    """The most steps of ``sampler`` that spend at most ``nfe`` score evaluations per sample (so
    samplers can be compared at equal cost); None for ode, whose solver picks its own steps."""
    nfe = int(nfe)
    if sampler == "ode":
        return None
    steps = {"em": nfe, "ancestral": nfe, "pc": nfe // 2,
             "heun": (nfe + 1) // 2, "heun-sde": (nfe + 1) // 2, "dpm2m": nfe,
             "dpm2m-sde": nfe}[sampler]
    if steps < 2:
        raise ValueError(f"{nfe} score evaluations are too few for {sampler} (it needs at least "
                         f"{ {'pc': 4, 'heun': 3, 'heun-sde': 3}.get(sampler, 2) })")
    return steps


def _batch_seed(seed, offset):
    from .train import derived_seed
    return derived_seed(seed, offset)


def sample_labels(num_samples=None, labels=None, per_class=None, num_classes=NUM_CLASSES):
    """The labels to draw for a conditional model, grouped so a grid has one row per label:
    ``per_class`` K: K of each class; ``labels`` [a, b, ...]: the given classes, repeated to
    ``num_samples`` (default 8 each); neither: 0, 1, ..., 9, 0, 1, ... (balanced) up to
    ``num_samples``. Returns (labels (N,), images per grid row)."""
    if per_class is not None:
        return np.repeat(np.arange(num_classes), per_class), per_class
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        n = num_samples or 8 * len(labels)
        reps = -(-n // len(labels))
        return np.repeat(labels, reps)[:n], reps
    n = num_samples or 8 * num_classes
    return np.arange(n) % num_classes, num_classes
