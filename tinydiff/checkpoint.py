"""Training checkpoints: one .npz holding nested dicts of arrays plus JSON metadata.

A checkpoint is written atomically (a temporary file in the same folder, flushed to disk, then
renamed over the old one), so a crash or Ctrl-C while saving never leaves a broken file and the
last good checkpoint survives. It is read without pickle (``allow_pickle=False``): arrays are
stored as .npz members, everything else (RNG states with 128-bit integers, optimizer settings,
the run's configuration) as JSON, with tuples and non-string dict keys kept exactly.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .backend import backend_of

CHECKPOINT = "checkpoint.npz"
FORMAT = "tinydiff-checkpoint-v1"
# settings that may differ between a run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = frozenset({"epochs", "out", "resume", "progress", "sampler", "sample_steps", "churn",
                               "grid_sampler", "grid_steps", "rho", "s_noise", "s_tmin",
                               "num_samples", "backend", "sample_only", "sample_every", "nonfinite",
                               # what the grids show and how often the host reads the loss do not
                               # change the trajectory (log_every > 1 undoes a NaN step on device)
                               "per_class", "guidance", "show_real", "log_every"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model / configuration."""


class SaveError(CheckpointError):
    """A run's files could not be written (a full disk, a folder turned read-only); the previous
    checkpoint is kept."""



# -- checkpoint files: nested dicts of arrays and JSON values, in one .npz --------------------

def _encode(obj, arrays):
    """A JSON-able copy of ``obj`` whose arrays are moved into ``arrays`` (host copies)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__array__" not in obj and "__tuple__" not in obj:
            return {k: _encode(v, arrays) for k, v in obj.items()}
        return {"__items__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        key = f"a{len(arrays)}"
        arrays[key] = np.array(backend_of(obj).to_host(obj))
        return {"__array__": key}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj, arrays):
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if "__array__" in obj:
            return arrays[obj["__array__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, arrays) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["__items__"]}
        return {k: _decode(v, arrays) for k, v in obj.items()}
    return obj


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    except OSError:
        return False
    return True


def remove_stale_temp_files(path):
    """Remove ``.NAME.tmp-PID`` files beside ``path`` left by saves that were killed (kill -9,
    power loss) mid-write: a save only removes its own temporary file when it gets the chance,
    and each one is as big as a checkpoint. Files of a process still alive are left alone.
    Returns the paths removed."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{os.path.basename(path)}.tmp-") + r"(\d+)$")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def save_checkpoint(path, state):
    """Write ``state`` (nested dicts/lists of arrays and JSON values) atomically: a temporary file
    in the same folder, flushed to disk, then renamed over ``path``. A failed write (a full disk)
    raises OSError and leaves the previous file at ``path`` untouched."""
    arrays = {}
    meta = json.dumps({"format": FORMAT, "state": _encode(state, arrays)})
    remove_stale_temp_files(path)
    return atomic_write(path, lambda f: np.savez(f, __meta__=np.frombuffer(meta.encode(), np.uint8),
                                                 **arrays), fsync=True)


def atomic_write(path, write, fsync=False):
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it over ``path``:
    a reader (or a crash) never sees half a file, and a failed write leaves the old file as it
    was. ``fsync`` flushes the data to the disk before the rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read_meta(path, f):
    """The checkpoint's metadata dict from an open .npz, or CheckpointError saying what the file is."""
    if "__meta__" not in f.files:
        raise CheckpointError(f"{path} is not a tinydiff training checkpoint (an .npz without "
                              "tinydiff metadata); plain weight files load with model.load(path)")
    raw = f["__meta__"]
    if raw.dtype.kind == "U":   # a classifier weights file stores its metadata as a string
        kind = "a file of another kind"
        try:
            if str(json.loads(str(raw)).get("format", "")).startswith("tinydiff-classifier"):
                kind = "a classifier weights file (load it with tinydiff.models.classifier." \
                       "load_classifier(path=...))"
        except Exception:
            pass
        raise CheckpointError(f"{path} is {kind}, not a tinydiff training checkpoint")
    meta = json.loads(raw.tobytes().decode())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has format {got!r}, expected {FORMAT!r}: not a tinydiff "
                              "training checkpoint of this version")
    return meta


def _unreadable(path, e):
    """One line for a file np.load cannot read: not an .npz at all, or a cut-off one."""
    return CheckpointError(f"{path} is corrupt or truncated, or not a tinydiff checkpoint (not a "
                           f"readable .npz archive: {type(e).__name__}); use an older copy or "
                           "start a new run in another folder")


def load_checkpoint(path):
    """The state saved by ``save_checkpoint``; CheckpointError if missing, foreign or corrupt."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it "
                                  f"({os.path.join(path, CHECKPOINT)})")
        raise CheckpointError(f"no checkpoint at {path}")
    remove_stale_temp_files(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = _read_meta(path, f)
            arrays = {k: f[k] for k in f.files if k != "__meta__"}
    except CheckpointError:
        raise
    except Exception as e:   # ValueError (not a zip: NumPy's pickle hint), BadZipFile, EOFError..
        raise _unreadable(path, e) from e
    return _decode(meta["state"], arrays)


def read_config(path):
    """The run configuration stored in a checkpoint, without loading its arrays."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = _read_meta(path, f)
    except CheckpointError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from e
    return meta["state"]["config"]


def resolve_config(recipes, defaults, explicit, resume_from=None):
    """A run's settings: ``defaults``, then ``recipes[recipe]``, then the config stored in
    ``resume_from``/checkpoint.npz (when resuming or sampling), then the ``explicit`` flags.
    The recipe itself comes from the flags, else the checkpoint, else the defaults."""
    saved = read_config(os.path.join(resume_from, CHECKPOINT)) if resume_from else {}
    recipe = explicit.get("recipe", saved.get("recipe", defaults.get("recipe")))
    if recipe not in recipes:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(recipes)}")
    return {**defaults, **recipes[recipe], **saved, **explicit, "recipe": recipe}


def jsonable(config):
    return json.loads(json.dumps(config, default=str)) if config is not None else {}


def config_differences(saved, current, allowed=RESUMABLE_CHANGES, defaults=None):
    """'key: checkpoint X, now Y' for every setting that differs, except those in ``allowed``.
    A key the checkpoint lacks (a setting added after it was written) counts as its value in
    ``defaults``, so a run from an older tinydiff resumes when the new setting keeps its default."""
    saved, current = jsonable(saved), jsonable(current)
    defaults = jsonable(defaults or {})
    out = []
    for k in sorted(set(saved) | set(current)):
        was = saved[k] if k in saved else defaults.get(k)
        if k not in allowed and was != current.get(k):
            out.append(f"{k}: checkpoint {was!r}, now {current.get(k)!r}")
    return out


def architecture_differences(config, model):
    """'channels=[32, 64, 128, 256], you asked for [16, 32, 64, 128]' for every setting stored in
    a checkpoint's config that is also an attribute of ``model`` and differs from it."""
    out = []
    for k, v in sorted(jsonable(config).items()):
        if k in RESUMABLE_CHANGES or not hasattr(model, k) or callable(getattr(model, k)):
            continue
        mine = jsonable({k: getattr(model, k)})[k]
        if isinstance(v, str) and isinstance(mine, list):   # "32,64" as the command line stores it
            v = [int(c) if c.strip().lstrip("-").isdigit() else c for c in v.split(",")]
        if v != mine:
            out.append(f"{k}={v}, you asked for {mine}")
    return out


def misfit_message(path, weights, model, config=None):
    """One line on why ``weights`` (from the checkpoint ``path``) do not load into ``model``: the
    stored settings that differ from the model's, else a count of the mismatched tensors and the
    first one (not every key, and no strict=False advice a command line cannot take)."""
    diffs = architecture_differences(config or {}, model)
    if diffs:
        return (f"{path} does not fit this model: this checkpoint was trained with "
                f"{'; '.join(diffs)}; build the model with the checkpoint's settings")
    mine = model.state_dict()
    misshaped = [k for k in mine if k in weights   # in the model's order: the first layer first
                 and tuple(weights[k].shape) != tuple(mine[k].shape)]
    first = (f" (first: {misshaped[0]} is {tuple(weights[misshaped[0]].shape)} in the checkpoint, "
             f"{tuple(mine[misshaped[0]].shape)} here)" if misshaped else "")
    return (f"{path} does not fit this {type(model).__name__}: {len(misshaped)} mis-shaped, "
            f"{len(set(mine) - set(weights))} missing and {len(set(weights) - set(mine))} "
            f"unexpected tensors{first}; it was saved from another architecture")


def load_model_weights(path, model, use_ema=True):
    """Load a training checkpoint's weights into ``model`` (the EMA average when the run kept one
    and ``use_ema``); returns the checkpoint state (for its config, epoch, ...)."""
    state = load_checkpoint(path)
    weights = state["model"]
    if use_ema and state.get("ema") is not None:
        weights = dict(weights)
        weights.update(state["ema"]["shadow"])
    try:
        model.load_state_dict(weights)
    except Exception as e:
        raise CheckpointError(misfit_message(path, weights, model, state.get("config"))) from e
    return state


def resume_advice(out_dir):
    """What to tell a user whose run in ``out_dir`` was interrupted: resume when a checkpoint
    exists, else start again (``--resume`` would only fail)."""
    path = os.path.join(out_dir, CHECKPOINT)
    if os.path.isfile(path):
        return f"run again with --resume to continue from {path}"
    return f"nothing was saved in {out_dir}; run again without --resume to start over"
