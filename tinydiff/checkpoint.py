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

import numpy as np

from .backend import backend_of

CHECKPOINT = "checkpoint.npz"
FORMAT = "tinydiff-checkpoint-v1"
# settings that may differ between a run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = frozenset({"epochs", "out", "resume", "progress", "sampler", "sample_steps",
                               "num_samples", "backend", "sample_only", "sample_every", "nonfinite"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model / configuration."""



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


def save_checkpoint(path, state):
    """Write ``state`` (nested dicts/lists of arrays and JSON values) atomically: a temporary file
    in the same folder, flushed to disk, then renamed over ``path``."""
    arrays = {}
    meta = json.dumps({"format": FORMAT, "state": _encode(state, arrays)})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(meta.encode(), np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path):
    """The state saved by ``save_checkpoint``; CheckpointError if missing, foreign or corrupt."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "__meta__" not in f.files:
                raise CheckpointError(f"{path} is not a tinydiff training checkpoint (no metadata); "
                                      "plain weight files load with model.load(path)")
            meta = json.loads(f["__meta__"].tobytes().decode())
            arrays = {k: f[k] for k in f.files if k != "__meta__"}
    except CheckpointError:
        raise
    except Exception as e:   # zipfile.BadZipFile, EOFError, ValueError, json errors...
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); use an "
                              "older copy or start a new run") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return _decode(meta["state"], arrays)


def read_config(path):
    """The run configuration stored in a checkpoint, without loading its arrays."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(f["__meta__"].tobytes().decode())
        return meta["state"]["config"]
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable tinydiff checkpoint ({type(e).__name__}: "
                              f"{e})") from e


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


def config_differences(saved, current, allowed=RESUMABLE_CHANGES):
    """'key: checkpoint X, now Y' for every setting that differs, except those in ``allowed``."""
    saved, current = jsonable(saved), jsonable(current)
    out = []
    for k in sorted(set(saved) | set(current)):
        if k not in allowed and saved.get(k) != current.get(k):
            out.append(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}")
    return out


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
        raise CheckpointError(f"{path} does not fit this model: {e}") from e
    return state
