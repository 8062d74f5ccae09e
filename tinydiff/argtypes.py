"""Validators for command-line values, shared by every tinydiff command line.

Each is an ``argparse`` ``type=``: it turns the string into a value or raises
``argparse.ArgumentTypeError`` with what is allowed, which argparse prints as one line
(``error: argument --lr: must be a finite number > 0, got '-1'``) with exit code 2, before any
data is loaded or any training starts.
"""
from __future__ import annotations

import argparse
import math
import os

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "finite_float",
           "unit_interval", "half_open_unit", "int_list", "float_list", "positive_int_list",
           "boolean", "out_dir", "existing_file", "existing_dir", "int_at_least", "float_above", "out_file",
           "choice_list", "int_list_at_least"]


def _fail(what, value):
    raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")


def _int(value, what):
    try:
        f = float(value)
    except (TypeError, ValueError):
        _fail(what, value)
    if not math.isfinite(f) or f != int(f):
        _fail(what, value)
    return int(f)


def _float(value, what):
    try:
        f = float(value)
    except (TypeError, ValueError):
        _fail(what, value)
    if not math.isfinite(f):
        _fail(what, value)
    return f


def int_at_least(k):
    """A validator for integers >= k (e.g. sampler steps >= 2)."""
    what = f"an integer >= {k}"

    def check(value):
        v = _int(value, what)
        if v < k:
            _fail(what, value)
        return v
    check.__name__ = f"int_at_least_{k}"
    return check


def float_above(k, inclusive=False):
    """A validator for finite numbers > k (>= k with ``inclusive``), e.g. the VE SDE's sigma > 1."""
    what = f"a finite number {'>=' if inclusive else '>'} {k:g}"

    def check(value):
        v = _float(value, what)
        if v < k or (v == k and not inclusive):
            _fail(what, value)
        return v
    check.__name__ = f"float_above_{k:g}"
    return check


positive_int = int_at_least(1)          # counts: epochs, batch size, steps, samples
positive_int.__name__ = "positive_int"
nonnegative_int = int_at_least(0)       # warm-up steps, a count that may be zero
nonnegative_int.__name__ = "nonnegative_int"
positive_float = float_above(0.0)       # learning rate, tolerances
positive_float.__name__ = "positive_float"
nonnegative_float = float_above(0.0, inclusive=True)
nonnegative_float.__name__ = "nonnegative_float"


def finite_float(value):
    """Any finite number (a guidance weight may be negative)."""
    return _float(value, "a finite number")


def unit_interval(value):
    """A number in [0, 1] (a probability, a decay)."""
    v = _float(value, "a number in [0, 1]")
    if not 0.0 <= v <= 1.0:
        _fail("a number in [0, 1]", value)
    return v


def half_open_unit(value):
    """A number in [0, 1) (an EMA decay: 1 would never move)."""
    v = _float(value, "a number in [0, 1)")
    if not 0.0 <= v < 1.0:
        _fail("a number in [0, 1)", value)
    return v


def _list(value, item, what):
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or any(p == "" for p in parts):
        _fail(what, value)
    try:
        return [item(p) for p in parts]
    except argparse.ArgumentTypeError:
        _fail(what, value)


def int_list(value):
    """Comma-separated integers, e.g. ``0,1,2``."""
    return _list(value, lambda p: _int(p, "an integer"), "comma-separated integers, e.g. 0,1,2")


def positive_int_list(value):
    """Comma-separated integers >= 1, e.g. ``32,64,128,256``."""
    return _list(value, positive_int, "comma-separated integers >= 1, e.g. 32,64,128,256")


def float_list(value):
    """Comma-separated finite numbers, e.g. ``0,0.5,1,2``."""
    return _list(value, finite_float, "comma-separated finite numbers, e.g. 0,0.5,1,2")


def choice_list(choices):
    """A validator for comma-separated names from ``choices``, e.g. ``em,heun``."""
    choices = list(choices)
    what = f"comma-separated names among {', '.join(choices)}, e.g. {','.join(choices[:2])}"

    def one(p):
        if p not in choices:
            _fail(what, p)
        return p

    def check(value):
        return _list(value, one, what)
    check.__name__ = "choice_list"
    return check


def int_list_at_least(k):
    """A validator for comma-separated integers >= k, e.g. sampler steps ``10,20,50``."""
    single = int_at_least(k)

    def check(value):
        return _list(value, single, f"comma-separated integers >= {k}, e.g. 10,20,50")
    check.__name__ = f"int_list_at_least_{k}"
    return check


def boolean(value):
    """yes/no, true/false, 1/0, on/off."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    _fail("one of yes/no, true/false, 1/0, on/off", value)


def out_dir(value):
    """A folder that exists or can be created: not a file, not under a file, writable."""
    path = os.path.abspath(os.path.expanduser(str(value)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a folder; pass a folder path")
    parent = path
    while not os.path.exists(parent):   # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot create folder {value!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {parent!r} (permission denied); pass a "
                                         "folder you can write to")
    return str(value)


def existing_file(value):
    """A path to a file that exists."""
    if not os.path.isfile(str(value)):
        what = "is a folder" if os.path.isdir(str(value)) else "does not exist"
        raise argparse.ArgumentTypeError(f"{value!r} {what}; pass the path of a file")
    return str(value)


def existing_dir(value):
    """A path to a folder that exists."""
    if not os.path.isdir(str(value)):
        what = "is a file" if os.path.exists(str(value)) else "does not exist"
        raise argparse.ArgumentTypeError(f"{value!r} {what}; pass the path of a folder")
    return str(value)


def out_file(suffix):
    """A validator for a file to write: ends with ``suffix``, is not a folder, and its folder
    exists or can be created."""
    def check(value):
        value = str(value)
        if not value.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"must be a {suffix} file name, got {value!r}")
        if os.path.isdir(value):
            raise argparse.ArgumentTypeError(f"{value!r} is a folder; pass a {suffix} file name")
        out_dir(os.path.dirname(os.path.abspath(value)))
        return value
    check.__name__ = f"out_file{suffix.replace('.', '_')}"
    return check
