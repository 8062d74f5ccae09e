"""The one training loop every example shares (unconditional, class-conditional, latent).

    trainer = Trainer(model, optimizer, score_matching_loss(sde), images, labels=None,
                      out_dir="runs/mnist", epochs=5, batch_size=32, seed=0, ema=EMA(model),
                      sample_fn=make_sample_fn(sde, "em", 500, (64, 1, 28, 28)), config=config)
    history = trainer.fit(resume=True)

What a run writes to ``out_dir``:
    checkpoint.npz      the last good state (model, optimizer, EMA, LR schedule, RNG, position,
                        loss history, configuration), replaced atomically after every epoch and
                        on Ctrl-C; never written after a NaN/Inf
    config.json         the run's configuration, for people
    loss_steps.csv      step, epoch, loss, grad_norm, lr, skipped
    loss_epochs.csv     epoch, steps, mean_loss, seconds, skipped
    loss.png            loss per step (with moving average) and per epoch
    samples/epoch_NNN.png  a sample grid after every epoch (EMA weights when there is an EMA)

Exact resume: every random number of training comes from host-seeded generators whose state is
checkpointed: the data order of epoch e is a permutation drawn from seed (seed, e), and the noise
of the loss (t and z of eq. 5, docs/design.md) from one host generator saved with the checkpoint. So on the CPU,
stopping at any step and resuming gives bit-identical losses to an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import threading
import time

import numpy as np

from . import data as _data
from . import plot as _plot
from .backend import Generator, backend_of, get_backend
from .checkpoint import (CHECKPOINT, RESUMABLE_CHANGES, CheckpointError,  # noqa: F401 (re-exports)
                         SaveError, config_differences, jsonable, load_checkpoint,
                         load_model_weights, misfit_message, read_config, resolve_config,
                         resume_advice, save_checkpoint)
from .sampling import SAMPLERS  # noqa: F401 (re-exported)
from .tensor import no_grad


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN or Inf."""


# -- randomness ------------------------------------------------------------------------------

class HostGenerator(Generator):
    """A tinydiff Generator for any backend that draws on the host (NumPy PCG64) and copies the
    result to the backend. Its state is a plain dict on every backend, so checkpoints restore it
    exactly, and a run draws the same numbers on numpy, strict and cupy."""

    def __init__(self, backend, seed=None):
        super().__init__(get_backend("numpy"), seed)
        self.backend = get_backend(backend)

    def normal(self, size, mean=0.0, std=1.0, dtype=np.float32):
        return self.backend.asarray(super().normal(size, mean, std, dtype))

    def uniform(self, size, low=0.0, high=1.0, dtype=np.float32):
        return self.backend.asarray(super().uniform(size, low, high, dtype))

    def integers(self, low, high, size):
        return self.backend.asarray(super().integers(low, high, size))

    def get_state(self):
        return self._gen.bit_generator.state


def derived_seed(*keys):
    """An int seed derived from a tuple of ints (e.g. (seed, purpose, epoch))."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


_ORDER, _NOISE, _SAMPLES = 1, 2, 3   # purposes, so each stream is independent of the others


# -- the objective and the per-epoch samples -------------------------------------------------

def score_matching_loss(sde, eps=1e-5, use_labels=False, label_dropout=0.0, null_label=None,
                        noise=None):
    """loss_fn(model, x, y, rng) for the Trainer: denoising score matching, eq. 5 (sde.dsm_loss).

    With ``use_labels`` the class labels y are passed to the model; ``label_dropout`` > 0 replaces
    each label by ``null_label`` (default: ``model.null_label``) with that probability, so one
    model also learns the unconditional score (classifier-free guidance). The dropout draws come
    from the trainer's generator, so resuming stays exact. ``noise``: a ``sde.TrainingNoise``
    (the distribution of training noise levels and their weights; None: eq. 5 as written).
    """
    from .sde import dsm_loss

    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")

    def loss_fn(model, x, y, rng):
        labels = None
        if use_labels:
            if y is None:
                raise ValueError("use_labels=True but the trainer got no labels; pass labels=")
            labels = y
            if label_dropout > 0:
                null = model.null_label if null_label is None else null_label
                drop = rng.uniform((y.shape[0],)) < label_dropout
                labels = backend_of(y).xp.where(drop, null, y)
        return dsm_loss(model, x, sde, rng, eps=eps, labels=labels, noise=noise)
    return loss_fn




def make_sample_fn(sde, sampler="em", num_steps=500, shape=(64, 1, 28, 28), labels=None,
                   eps=1e-3, guidance=0.0, nrow=None, options=None):
    """sample_fn(model, seed) -> host images in [0, 1], drawn with one of the samplers.

    sampler: "em" (Euler-Maruyama, eq. 2), "pc" (predictor-corrector), "ode" (probability flow;
    num_steps is ignored, the solver picks its steps) or "ancestral" (DDPM's, VP SDE only).
    labels: host int array (N,) for conditional models (None for unconditional), sampled with
    classifier-free guidance weight ``guidance``. ``nrow`` (images per grid row) is kept as
    ``sample_fn.nrow`` for the grids, and the labels as ``sample_fn.labels``; set
    ``sample_fn.real`` to data images to draw them beneath the samples in every grid.
    ``options``: keyword arguments of the sampler itself (e.g. S_churn of "heun-sde").
    """
    from . import sampling

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    # checked now, not after the first epoch of training when the samples are drawn
    sampling._check(f"make_sample_fn({sampler!r})", sde, eps,
                    None if sampler == "ode" else num_steps, shape)
    if sampler == "ancestral":
        sampling.ancestral_betas(sde, num_steps, eps)      # refuses a non-VP SDE

    def sample_fn(model, seed):
        be = model.backend
        y = None if labels is None else be.asarray(np.asarray(labels, np.int64))
        score_fn = sampling.model_score_fn(model, labels=y, guidance=guidance if y is not None else 0.0)
        x, _ = sampling.sample(sampler, score_fn, sde, shape, num_steps, eps=eps,
                               rng=be.default_rng(seed), backend=be.name, **(options or {}))
        return backend_of(x).to_host(x)
    sample_fn.nrow = nrow
    sample_fn.real = None
    sample_fn.labels = None if labels is None else np.asarray(labels, np.int64)
    return sample_fn


def sample_and_save(model, sample_fn, prefix, seed, ema=None, **info):
    """Draw samples (EMA weights if given, no_grad, eval mode) and write ``prefix``.png (a grid)
    and ``prefix``.npz: ``images`` float32 (N, C, H, W) clipped to [0, 1] (what ``tinydiff sample``
    writes), ``labels`` (N,) for conditional samples, ``samples`` as drawn (unclipped), plus
    ``info``. Returns the host samples."""
    import contextlib

    model.eval()
    try:
        with no_grad(), (ema.average_parameters(model) if ema is not None else contextlib.nullcontext()):
            samples = np.asarray(sample_fn(model, seed), np.float32)
    finally:
        model.train()
    _plot.save_image_grid(samples, prefix + ".png", nrow=getattr(sample_fn, "nrow", None),
                          real=getattr(sample_fn, "real", None))
    labels = getattr(sample_fn, "labels", None)
    extra = {} if labels is None else {"labels": labels}
    np.savez(prefix + ".npz", images=np.clip(samples, 0.0, 1.0), samples=samples, seed=seed,
             **extra, **info)
    _say(f"{len(samples)} samples: {prefix}.png, {prefix}.npz")
    return samples


# -- the loop --------------------------------------------------------------------------------

class Trainer:
    """Runs epochs of mini-batch training with logging, plots, sample grids and checkpoints.

    Args:
        model: a tinydiff Module already on its backend.
        optimizer: a tinydiff optimizer over model.parameters().
        loss_fn: loss_fn(model, x, y, rng) -> scalar Tensor (see ``score_matching_loss``).
        images, labels: host arrays of the training set (see ``data.batches``); labels optional.
        out_dir: where everything is written.
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size, seed: the data order and every training random number derive from seed.
        ema: an optim.EMA of the model, updated after every step (samples use its weights).
        scheduler: an optim.LRScheduler, stepped after every optimizer step.
        clip_grad: max global gradient norm (None: no clipping; the norm is still logged).
        sample_fn: sample_fn(model, seed) -> images (N, C, H, W) in [0, 1], drawn after every
            ``sample_every`` epochs into samples/epoch_NNN.png.
        on_nonfinite: "stop" (raise NonFiniteError, keep the last good checkpoint) or "skip" (drop
            the step, count it; stop after ``max_consecutive_skips`` in a row).
        config: the run's settings (JSON-able dict) stored with each checkpoint; a resumed run
            must match it, except the keys in RESUMABLE_CHANGES.
        drop_last: leave out the last partial batch of each epoch.
        hflip: mirror each training image left-right with probability 1/2 (``data.batches``).
        progress: show a tqdm bar with the running loss.
        log_every: read the losses and gradient norms back to the host every this many steps
            (one host sync for all of them; every step is still logged). 1 (the default) reads
            each step before its update, as always. With N > 1 a step's finiteness is checked on
            the device: a step with a NaN/Inf loss or norm, and every step after it, leaves the
            weights, optimizer state and EMA as they were (restored on the device), and the next
            read stops the run (NonFiniteError naming that step); the in-memory step counts of
            the optimizer, EMA and schedule have then moved on, so continue from the checkpoint.
            Needs on_nonfinite="stop" (skipping needs the host to know before the next step).
        flat_parameters: make the model's parameters views into one flat buffer
            (``Module.flatten_parameters``) so the optimizer, EMA and clipping run a few
            whole-buffer ops per step instead of a dozen per parameter array (same results).
    """

    def __init__(self, model, optimizer, loss_fn, images, labels=None, *, out_dir, epochs,
                 batch_size, seed=0, ema=None, scheduler=None, clip_grad=None, sample_fn=None,
                 sample_every=1, on_nonfinite="stop", max_consecutive_skips=20, config=None,
                 drop_last=False, hflip=False, progress=True, log_every=1, flat_parameters=True):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) or log_every < 1:
            raise ValueError(f"Trainer: log_every must be an integer >= 1, got {log_every!r}")
        if log_every > 1 and on_nonfinite == "skip":
            raise ValueError("Trainer: on_nonfinite='skip' needs log_every=1 (the host decides "
                             "before each update whether to skip it); use on_nonfinite='stop' "
                             "with log_every > 1")
        self.log_every, self._pending, self._bad = int(log_every), [], None
        for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                                 ("sample_every", sample_every, 1),
                                 ("max_consecutive_skips", max_consecutive_skips, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"Trainer: {name} must be an integer >= {low}, got {value!r}")
        if clip_grad is not None and not (isinstance(clip_grad, (int, float, np.number))
                                          and math.isfinite(clip_grad) and clip_grad > 0):
            raise ValueError(f"Trainer: clip_grad must be None (no clipping) or a finite number "
                             f"> 0, got {clip_grad!r}")
        if len(images) == 0:
            raise ValueError("no training images")
        if flat_parameters:
            model.flatten_parameters()
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.images, self.labels = images, labels
        self.out_dir, self.epochs, self.batch_size = out_dir, int(epochs), int(batch_size)
        self.seed, self.ema, self.scheduler, self.clip_grad = int(seed), ema, scheduler, clip_grad
        self.sample_fn, self.sample_every = sample_fn, int(sample_every)
        self.on_nonfinite, self.max_consecutive_skips = on_nonfinite, int(max_consecutive_skips)
        self.drop_last, self.progress, self.hflip = drop_last, progress, bool(hflip)
        self.backend = model.backend
        self.config = dict(config or {})
        # the value a setting missing from an older checkpoint had (set by the command line)
        self.config_defaults = {}
        # what fixes the trajectory besides the user's config
        self.run_key = {"batch_size": self.batch_size, "seed": self.seed, "drop_last": drop_last,
                        **({"hflip": True} if self.hflip else {}),
                        "num_images": len(images), "data_fingerprint": _fingerprint(images, labels),
                        "model_class": type(model).__name__}
        self.batches_per_epoch = _data.num_batches(len(images), self.batch_size, drop_last)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(images)} images make no batch of {batch_size} with drop_last")
        self.rng = HostGenerator(self.backend, derived_seed(self.seed, _NOISE))
        # position: epochs completed, batches done in the current epoch, steps overall
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.skipped, self.consecutive_skips, self.epoch_seconds = 0, 0, 0.0
        self.steps = {"loss": [], "grad_norm": [], "lr": [], "epoch": [], "skipped": []}
        self.epoch_log = []   # dicts: epoch, steps, mean_loss, seconds, skipped
        self._stop_requested = False
        self._saved_at = None    # (epoch, step) of the checkpoint on disk, once there is one
        self._mutating = False
        self._phase = "idle"

    # paths
    def path(self, *names):
        return os.path.join(self.out_dir, *names)

    @property
    def checkpoint_path(self):
        return self.path(CHECKPOINT)

    # -- state ---------------------------------------------------------------------------------
    def state(self, rng_state=None):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_state if rng_state is not None else self.rng.get_state(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "skipped": self.skipped, "consecutive_skips": self.consecutive_skips,
            "epoch_seconds": self.epoch_seconds,
            "steps": {k: np.asarray(v, np.float64) for k, v in self.steps.items()},
            "epoch_log": self.epoch_log,
            "config": jsonable(self.config), "run_key": self.run_key,
        }

    def save(self, rng_state=None):
        if not self._params_finite():
            raise NonFiniteError("the model's weights contain NaN or Inf; not overwriting "
                                 f"{self.checkpoint_path}")
        path = save_checkpoint(self.checkpoint_path, self.state(rng_state))
        self._saved_at = (self.epoch, self.step)
        return path

    def _save_or_stop(self, when, rng_state=None):
        """Save; when the disk is full (or any write fails) keep the previous checkpoint, write
        the CSV logs if they still fit, and stop the run with one line saying what to do.
        Stopping, not retrying next epoch: a full disk rarely frees itself, and hours of training
        that can never be saved are worse than a clear stop now."""
        try:
            return self.save(rng_state)
        except OSError as e:
            try:
                self._write_logs()
                logs = "the CSV logs are written"
            except OSError:
                logs = "the CSV logs could not be written either"
            if self._saved_at is not None:
                kept = (f"the previous checkpoint ({self._saved_at[0]} epochs done, step "
                        f"{self._saved_at[1]}) is kept; free some space and run again with "
                        "--resume (resume=True) to continue from it")
            else:
                kept = "no checkpoint exists yet; free some space and run again without --resume"
            raise SaveError(f"could not save {self.checkpoint_path} {when} ({e.strerror or e}); "
                            f"{logs}; {kept}") from e

    def load(self, path=None):
        """Restore everything from a checkpoint; clear errors when it is from another run."""
        path = path or self.checkpoint_path
        st = load_checkpoint(path)
        problems = config_differences(st["config"], self.config, defaults=self.config_defaults)
        problems += config_differences(st["run_key"], self.run_key, allowed=())
        if problems:
            raise CheckpointError(f"{path} was written by a different run ({'; '.join(problems)}); "
                                  "resume with the same settings, or use a new output folder")
        try:
            self.model.load_state_dict(st["model"])
        except Exception as e:   # settings or tensors of another architecture: say which
            raise CheckpointError(misfit_message(path, st["model"], self.model, st["config"])) from e
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            if (st["ema"] is None) != (self.ema is None):
                raise CheckpointError("one of the checkpoint and this run keeps an EMA, the other "
                                      "does not")
            if self.ema is not None:
                self.ema.load_state_dict(st["ema"])
            if (st["scheduler"] is None) != (self.scheduler is None):
                raise CheckpointError("one of the checkpoint and this run has an LR schedule, the "
                                      "other does not")
            if self.scheduler is not None:
                self.scheduler.load_state_dict(st["scheduler"])
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        except Exception as e:   # StateDictError, ValueError from the optimizer/EMA
            raise CheckpointError(f"{path} does not fit this model/optimizer: {e}") from e
        self.rng.set_state(st["rng"])
        self.epoch, self.batch_in_epoch, self.step = st["epoch"], st["batch_in_epoch"], st["step"]
        self.skipped, self.consecutive_skips = st["skipped"], st["consecutive_skips"]
        self.epoch_seconds = st["epoch_seconds"]
        self.steps = {k: [int(v) if k in ("epoch", "skipped") else float(v) for v in st["steps"][k]]
                      for k in self.steps}
        self.epoch_log = st["epoch_log"]
        self._saved_at = (self.epoch, self.step)
        return st

    def _params_finite(self):
        for p in self.model.parameters():
            xp = backend_of(p.data).xp
            if not bool(xp.isfinite(p.data).all()):
                return False
        return True

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, x, y):
        """Loss, backward, finiteness check, clip, optimizer, EMA, schedule. Returns (loss, norm,
        lr, skipped) as host floats; with log_every > 1 it returns None: the step's loss and norm
        stay on the device until ``flush_log`` reads them with the others."""
        from .optim import clip_grad_norm_, grad_norm
        params = list(self.model.parameters())
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model, x, y, self.rng)
        loss.backward()
        if self.clip_grad is not None:
            norm = clip_grad_norm_(params, self.clip_grad, return_array=True)
        else:
            norm = grad_norm(params)
        xp = backend_of(loss.data).xp
        pair = xp.stack([loss.data.astype(np.float32, copy=False).reshape(()),
                         xp.asarray(0.0 if norm is None else norm, dtype=np.float32).reshape(())])
        if self.log_every > 1:
            return self._guarded_step(pair)
        loss_value, norm_value = (float(v) for v in backend_of(pair).to_host(pair))   # one sync
        lr = float(self.optimizer.lr)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            if self.on_nonfinite == "stop" or self.consecutive_skips + 1 > self.max_consecutive_skips:
                self.optimizer.zero_grad()
                extra = ("" if self.on_nonfinite == "stop" else
                         f" after {self.consecutive_skips} skipped steps in a row")
                raise self._nonfinite(loss_value, norm_value, lr, extra)
            self.optimizer.zero_grad()
            self.skipped += 1
            self.consecutive_skips += 1
            return loss_value, norm_value, lr, True
        self._mutating = True   # from here to the end the state is half-updated
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self._mutating = False
        self.consecutive_skips = 0
        return loss_value, norm_value, lr, False

    def _nonfinite(self, loss_value, norm_value, lr, extra=""):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        msg = (f"the {what} is {loss_value if what == 'loss' else norm_value} at epoch "
               f"{self.epoch + 1}, step {self.step + 1} (lr {lr:.3g})")
        kept = (f"the last good checkpoint {self.checkpoint_path} is kept unchanged"
                if os.path.exists(self.checkpoint_path) else "no checkpoint was written")
        labels = ("; on a GPU a class label out of range gives NaN too"
                  if getattr(self.model, "num_classes", None) and self.backend.name != "numpy" else "")
        return NonFiniteError(f"training stopped: {msg}{extra}; {kept}. Lower the learning "
                              "rate, enable gradient clipping, or skip such steps "
                              f"(on_nonfinite='skip'){labels}.")

    def _guarded_step(self, pair):
        """The update of a step whose finiteness only the device knows yet (log_every > 1): it
        runs, then every array it changed is put back on the device where this step or an
        earlier one of the pending ones was not finite (no host sync)."""
        xp = backend_of(pair).xp
        bad = ~xp.isfinite(pair).all()
        self._bad = bad if self._bad is None else self._bad | bad    # after a bad step: no more
        lr = float(self.optimizer.lr)
        self._mutating = True
        arrays = self.optimizer.state_arrays() + ([] if self.ema is None else self.ema.arrays())
        saved = [a.copy() for a in arrays]
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        for a, old in zip(arrays, saved):
            xp.copyto(a, old, where=self._bad)
        self._mutating = False
        self._pending.append((pair, lr))
        return None

    def flush_log(self):
        """The one host read of the pending steps' losses and norms (log_every > 1): records
        them and returns their rows (loss, norm, lr, skipped); at the first non-finite one it
        raises NonFiniteError (the steps from there on were not applied)."""
        if not self._pending:
            return []
        pending, self._pending, self._bad = self._pending, [], None
        pairs = pending[0][0] if len(pending) == 1 else backend_of(pending[0][0]).xp.stack(
            [p for p, _ in pending])
        values = np.asarray(backend_of(pairs).to_host(pairs), np.float64).reshape(-1, 2)  # one sync
        rows = []
        for (loss_value, norm_value), (_, lr) in zip(values.tolist(), pending):
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise self._nonfinite(loss_value, norm_value, lr)
            self._record(loss_value, norm_value, lr, False)
            rows.append((loss_value, norm_value, lr, False))
        return rows

    # -- Ctrl-C --------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        # The first Ctrl-C only asks the loop to stop after the current step, so the weights are
        # never saved half-updated; a second one (or one during sampling) stops at once.
        if self._stop_requested or self._phase == "sampling":
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\n[tinydiff.train] Ctrl-C: saving a checkpoint after this step "
              "(press Ctrl-C again to stop at once)", flush=True)

    # -- the run -------------------------------------------------------------------------------
    def fit(self, resume=False):
        """Train up to ``epochs`` epochs; with ``resume`` continue from out_dir's checkpoint.
        Returns the history: {"epoch_loss": [...], "step_loss": [...], "seconds": [...]}."""
        os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise CheckpointError(f"--resume: no checkpoint at {self.checkpoint_path}; start "
                                      "without --resume, or point --out at the run to continue")
            self.load()
            if self.epoch >= self.epochs:
                raise CheckpointError(
                    f"{self.checkpoint_path} has already trained {self.epoch} of epochs={self.epochs}; "
                    f"pass a larger number (--epochs {self.epoch + 1} or more) to train further, or "
                    "sample from it without training")
            _say(f"resumed from {self.checkpoint_path}: epoch {self.epoch} done, "
                 f"step {self.step}, batch {self.batch_in_epoch} of epoch {self.epoch + 1}")
        elif os.path.exists(self.checkpoint_path):
            raise CheckpointError(f"{self.checkpoint_path} exists; pass resume=True (--resume) to "
                                  "continue that run, or choose another output folder")
        try:
            with open(self.path("config.json"), "w") as f:
                json.dump({**jsonable(self.config), **self.run_key}, f, indent=2)
        except OSError as e:
            raise SaveError(f"cannot write {self.path('config.json')} ({e.strerror or e}); "
                            "nothing was trained; free some space or choose another folder") from e

        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while self.epoch < self.epochs:
                self._run_epoch()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        return self.history()

    def history(self):
        return {"epoch_loss": [e["mean_loss"] for e in self.epoch_log],
                "seconds": [e["seconds"] for e in self.epoch_log],
                "step_loss": list(self.steps["loss"]), "skipped": self.skipped, "step": self.step}

    def _run_epoch(self):
        from tqdm.auto import tqdm

        e = self.epoch
        order = np.random.default_rng(derived_seed(self.seed, _ORDER, e))
        it = _data.batches(self.images, self.batch_size, rng=order, backend=self.backend,
                           labels=self.labels, drop_last=self.drop_last, start=self.batch_in_epoch,
                           hflip=self.hflip)
        bar = tqdm(total=self.batches_per_epoch, initial=self.batch_in_epoch, disable=not self.progress,
                   desc=f"epoch {e + 1}/{self.epochs}", dynamic_ncols=True, leave=True)
        self.model.train()
        done = [(v, s) for v, ep, s in zip(self.steps["loss"], self.steps["epoch"],
                                           self.steps["skipped"]) if ep == e + 1]
        running = [sum(v for v, s in done if not s), sum(1 for _, s in done if not s)]
        start = time.perf_counter()
        self._phase = "training"

        def failed():          # a non-finite step: logged as NaN, the logs written, then raise
            self._record(float("nan"), float("nan"), float(self.optimizer.lr), True)
            self.epoch_seconds += time.perf_counter() - start
            self._write_logs()

        def flush():           # the pending steps' one host read (log_every > 1), shown
            try:
                rows = self.flush_log()
            except NonFiniteError:
                failed()
                raise
            for loss, _, lr, _ in rows:
                running[0] += loss
                running[1] += 1
                bar.set_postfix(loss=f"{running[0] / max(running[1], 1):.4g}", lr=f"{lr:.2g}",
                                refresh=False)
        try:
            for x, y in it:
                rng_before = self.rng.get_state()
                try:
                    out = self.train_step(x, y)
                except KeyboardInterrupt:
                    if not self._mutating:
                        flush()                     # the steps done, before the checkpoint
                    self._interrupted(start, rng_before, bar)
                except NonFiniteError:
                    failed()
                    raise
                if out is None:                     # deferred: log_every > 1
                    if len(self._pending) >= self.log_every:
                        flush()
                else:
                    loss, norm, lr, skipped = out
                    self._record(loss, norm, lr, skipped)
                    if not skipped:
                        running[0] += loss
                        running[1] += 1
                    bar.set_postfix(loss=f"{running[0] / max(running[1], 1):.4g}", lr=f"{lr:.2g}",
                                    refresh=False)
                bar.update(1)
                if self._stop_requested:
                    flush()
                    self._interrupted(start, None, bar)
            flush()                                 # the epoch's last pending steps
        finally:
            bar.close()
            self._phase = "idle"
        self.epoch_seconds += time.perf_counter() - start
        self._finish_epoch()

    def _record(self, loss, norm, lr, skipped):
        for k, v in (("loss", loss), ("grad_norm", norm), ("lr", lr), ("epoch", self.epoch + 1),
                     ("skipped", int(skipped))):
            self.steps[k].append(v)
        self.step += 1
        self.batch_in_epoch += 1

    def _interrupted(self, start, rng_before, bar):
        """Save the state as of the last completed step, then let the interrupt through."""
        bar.close()
        self.epoch_seconds += time.perf_counter() - start
        if self._mutating:
            kept = (f"the last good checkpoint {self.checkpoint_path} is kept" if
                    self._saved_at is not None else "nothing was saved (no checkpoint yet)")
            _say(f"interrupted while the weights were being updated: not saving; {kept}; "
                 + resume_advice(self.out_dir))
            raise KeyboardInterrupt
        self._save_or_stop("on Ctrl-C", rng_state=rng_before)   # a step cut short leaves the noise of that step unused
        self._write_logs()
        _say(f"interrupted: saved {self.checkpoint_path} at epoch {self.epoch + 1}, step "
             f"{self.step}; continue with resume=True (--resume)")
        raise KeyboardInterrupt

    def _finish_epoch(self):
        e = self.epoch + 1
        losses = [v for v, ep, s in zip(self.steps["loss"], self.steps["epoch"],
                                        self.steps["skipped"]) if ep == e and not s]
        n_skipped = sum(s for ep, s in zip(self.steps["epoch"], self.steps["skipped"]) if ep == e)
        self.epoch_log.append({"epoch": e, "steps": self.step, "mean_loss": float(np.mean(losses))
                               if losses else float("nan"), "seconds": self.epoch_seconds,
                               "skipped": int(n_skipped)})
        self.epoch, self.batch_in_epoch, self.epoch_seconds = e, 0, 0.0
        self._save_or_stop(f"after epoch {e}")
        try:
            self._write_logs()
        except OSError as err:   # the checkpoint (which holds the history) is what matters
            _say(f"could not write the logs in {self.out_dir} ({err.strerror or err}); the "
                 "checkpoint is saved and the logs are rewritten after the next epoch")
        last = self.epoch_log[-1]
        _say(f"epoch {e}/{self.epochs}: mean loss {last['mean_loss']:.4f}, {last['seconds']:.1f} s, "
             f"checkpoint {self.checkpoint_path}")
        if self.sample_fn is not None and (e % self.sample_every == 0 or e == self.epochs):
            self._phase = "sampling"
            try:
                path = self.sample_grid(self.path("samples", f"epoch_{e:03d}.png"),
                                        derived_seed(self.seed, _SAMPLES, e))
            except KeyboardInterrupt:
                _say(f"interrupted while sampling; the checkpoint of epoch {e} is saved in "
                     f"{self.checkpoint_path}; continue with resume=True (--resume)")
                raise
            finally:
                self._phase = "idle"
            _say(f"samples after epoch {e}: {path}")

    def sample_grid(self, path, seed):
        """Draw samples with sample_fn (EMA weights when available) and save them as a grid."""
        images = self.sample(seed)
        return _plot.save_image_grid(images, path, nrow=getattr(self.sample_fn, "nrow", None),
                                     real=getattr(self.sample_fn, "real", None))

    def sample(self, seed):
        self.model.eval()
        try:
            with no_grad():
                if self.ema is not None:
                    with self.ema.average_parameters(self.model):
                        return self.sample_fn(self.model, seed)
                return self.sample_fn(self.model, seed)
        finally:
            self.model.train()

    def _write_logs(self):
        rows = zip(range(1, len(self.steps["loss"]) + 1), self.steps["epoch"], self.steps["loss"],
                   self.steps["grad_norm"], self.steps["lr"], self.steps["skipped"])
        _write_csv(self.path("loss_steps.csv"), ["step", "epoch", "loss", "grad_norm", "lr", "skipped"],
                   rows)
        _write_csv(self.path("loss_epochs.csv"), ["epoch", "steps", "mean_loss", "seconds", "skipped"],
                   ([r[k] for k in ("epoch", "steps", "mean_loss", "seconds", "skipped")]
                    for r in self.epoch_log))
        if self.epoch_log or self.steps["loss"]:
            _plot.plot_losses(self.path("loss.png"), [r["mean_loss"] for r in self.epoch_log],
                              self.steps["loss"], grad_norms=self.steps["grad_norm"])


def train(model, optimizer, loss_fn, images, labels=None, resume=False, **kwargs):
    """Build a Trainer and run it: ``train(...)`` = ``Trainer(...).fit(resume)``."""
    return Trainer(model, optimizer, loss_fn, images, labels, **kwargs).fit(resume=resume)


# -- small helpers ---------------------------------------------------------------------------

def _say(msg):
    print(f"[tinydiff.train] {msg}", flush=True)


def _fingerprint(images, labels):
    """A short hash of a sample of the training set, so resuming on other data is caught."""
    import hashlib
    idx = np.linspace(0, len(images) - 1, num=min(len(images), 64)).astype(np.int64)
    h = hashlib.md5(np.ascontiguousarray(np.asarray(images[idx])).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels[idx])).tobytes())
    return h.hexdigest()[:16]


def _write_csv(path, header, rows):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in rows:
                w.writerow([repr(v) if isinstance(v, float) else v for v in r])
        os.replace(tmp, path)
    finally:   # a failed write (full disk) leaves the previous file and no debris
        if os.path.exists(tmp):
            os.remove(tmp)
