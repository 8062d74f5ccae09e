"""Data sets (MNIST, Fashion-MNIST, CIFAR-10) and the batch iterator.

Where a file comes from, in order (the first folder that has it wins):

1. ``root=`` when given, else the folder named by the ``TINYDIFF_DATA`` environment variable;
2. the user cache, ``$TINYDIFF_CACHE`` or ``~/.cache/tinydiff``;
3. a download into that cache from the canonical mirrors.

Each data set lives in its own sub-folder (``mnist/``, ``fashion-mnist/``, ``cifar-10/``) under
the original file names. Every file is checked against its published MD5 before it is read, so a
corrupt or truncated copy stops the program with an error that names the file and the checksum
it should have, instead of training on garbage. Loaders print one line saying where the data came
from (or that it was downloaded).

Images come back as uint8 arrays: MNIST and Fashion-MNIST ``(N, 28, 28)``, CIFAR-10
``(N, 3, 32, 32)``; labels as uint8 ``(N,)``. ``batches`` turns them into float32 batches in
[0, 1], shape ``(B, C, H, W)``, on any backend, optionally mirroring half of them (``hflip``).

``load_image_folder`` (``load_dataset("folder:PATH")``) reads a folder of PNG/JPEG files, flat or
one sub-folder per class, as uint8 ``(N, C, H, W)``, decoding it once into a cache.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
import warnings
import zlib
from urllib.request import urlopen   # module-level name, so tests can monkeypatch it

import numpy as np

from .backend import Generator, get_backend


class DataError(RuntimeError):
    """A data file is missing, corrupt, truncated, or could not be downloaded."""


# -- the catalogue: file names, published MD5s, mirrors ----------------------------------------

_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

DATASETS = {
    "mnist": {
        "title": "MNIST",
        "folder": "mnist",
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
    },
    "fashion-mnist": {
        "title": "Fashion-MNIST",
        "folder": "fashion-mnist",
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    },
    "cifar-10": {
        "title": "CIFAR-10",
        "folder": "cifar-10",
        # cifar10.npz is the lossless uint8 copy this project ships beside the code (not
        # downloadable); the python tarball is the official distribution.
        "md5": {"cifar10.npz": "c4b6e9d972a48ee0dbb489cba1290594",
                "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
    },
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar10": "cifar-10", "cifar_10": "cifar-10"}


def _dataset(name):
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[key]


def _say(msg):
    print(f"[tinydiff.data] {msg}", file=sys.stderr, flush=True)


# -- where files are looked for ----------------------------------------------------------------

def cache_dir():
    """The user cache folder: $TINYDIFF_CACHE, else ~/.cache/tinydiff (downloads go here)."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get("TINYDIFF_CACHE") or os.path.join("~", ".cache", "tinydiff")))


def data_roots(root=None):
    """The folders searched, in order, each with a word saying where it came from."""
    first = (root, "root=") if root else (os.environ.get("TINYDIFF_DATA"), "$TINYDIFF_DATA")
    roots = [(os.path.abspath(os.path.expanduser(first[0])), first[1])] if first[0] else []
    roots.append((cache_dir(), "the user cache"))
    return roots


def data_root():
    """The folder a user's data is read from first: $TINYDIFF_DATA if set, else the cache."""
    return data_roots()[0][0]


# -- checksums ---------------------------------------------------------------------------------

_VERIFIED = {}   # (path, size, mtime) -> md5, so a file is hashed once per process


def file_md5(path, chunk=1 << 20):
    key = (os.path.abspath(path), os.path.getsize(path), os.stat(path).st_mtime_ns)
    if key not in _VERIFIED:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


def offline():
    """True when TINYDIFF_OFFLINE forbids downloads: 1, true or yes (0, false, no or unset allow)."""
    return os.environ.get("TINYDIFF_OFFLINE", "").strip().lower() in ("1", "true", "yes")


# what each IDX file of MNIST and Fashion-MNIST holds (both have the same layout)
_IDX_CONTENT = {"train-images-idx3-ubyte.gz": ("training images", (60000, 28, 28)),
                "train-labels-idx1-ubyte.gz": ("training labels", (60000,)),
                "t10k-images-idx3-ubyte.gz": ("test images", (10000, 28, 28)),
                "t10k-labels-idx1-ubyte.gz": ("test labels", (10000,))}


def _known_file(md5):
    """(title, filename) of the catalogue file with this MD5, or None."""
    for info in DATASETS.values():
        for name, m in info["md5"].items():
            if m == md5:
                return info["title"], name
    return None


def _idx_shape(path, opener):
    """The shape an IDX header declares, or None when the file is not IDX at all."""
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
                return None
            return tuple(int(d) for d in np.frombuffer(f.read(4 * head[3]), ">u4"))
    except (OSError, EOFError, zlib.error, ValueError):
        return None


def _mismatch_reason(path, dataset_title, filename):
    """Why a file with the right name has the wrong MD5, when it can be told: another data set's
    file, another file of the same set, a gunzipped copy, or an IDX file of the wrong size."""
    other = _known_file(file_md5(path))
    if other is not None:
        return f"this is the {other[0]} file {other[1]}, not the {dataset_title} file {filename}"
    if filename not in _IDX_CONTENT:
        return None
    what, shape = _IDX_CONTENT[filename]
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        if _idx_shape(path, open) is not None:
            return ("it is not gzip-compressed (a gunzipped copy under the .gz name?); the "
                    "original .gz is expected: compress it (`gzip -c RAW > NAME.gz`) or fetch it again")
        return "it is not a gzip file"
    found = _idx_shape(path, gzip.open)
    if found is not None and found != shape:
        return (f"this is not the {dataset_title} {what} file: its IDX header says shape {found}, "
                f"the {what} file holds {shape}")
    return None


def verify_md5(path, expected, url=None, dataset_title=None):
    """Raise DataError naming ``path`` and the expected checksum unless its MD5 is ``expected``."""
    actual = file_md5(path)
    if actual != expected:
        filename = os.path.basename(path)
        reason = _mismatch_reason(path, dataset_title or "expected", filename)
        if offline():
            fix = f"Replace it with a good copy of {filename} (TINYDIFF_OFFLINE is set)."
        else:
            fix = f"Delete it and run again to download a fresh copy{f' from {url}' if url else ''}."
        if reason is not None:
            raise DataError(f"{path}: {reason} (MD5 {actual}, expected {expected}). {fix}")
        raise DataError(f"{path} is corrupt or truncated: its MD5 is {actual}, expected {expected} "
                        f"({os.path.getsize(path)} bytes on disk). {fix}")


# -- finding or downloading one file -----------------------------------------------------------

def fetch(dataset, filename, root=None, download=True):
    """Path to a verified copy of ``filename`` of ``dataset``: found locally or downloaded.

    Args:
        dataset: "mnist", "fashion-mnist" or "cifar-10".
        filename: one of the data set's file names (see ``DATASETS``).
        root: a folder to search instead of $TINYDIFF_DATA.
        download: if False, a missing file is an error instead of a download.
    Returns:
        the absolute path of the file, whose MD5 has been checked.
    """
    info = _dataset(dataset)
    expected = info["md5"][filename]
    searched = []
    for folder, origin in data_roots(root):
        path = os.path.join(folder, info["folder"], filename)
        searched.append(path)
        if os.path.isfile(path):
            verify_md5(path, expected, url=info["mirrors"][0] + filename,
                       dataset_title=info["title"])
            return path
    gunzipped = [p[:-3] for p in searched if p.endswith(".gz") and os.path.isfile(p[:-3])]
    if gunzipped:   # the MD5s are of the compressed files, so the .gz is what must be there
        raise DataError(f"found {gunzipped[0]} but {filename} (the gzip-compressed file) is "
                        f"expected; compress it again with `gzip -k {gunzipped[0]}`, or put the "
                        "original .gz beside it")
    if not download or offline():
        why = ("TINYDIFF_OFFLINE is set, so nothing is fetched" if offline() else
               "download=False")
        raise DataError(f"{info['title']} file {filename} not found ({why}); looked at: "
                        + ", ".join(searched) + ". Set TINYDIFF_DATA to the folder holding "
                        f"{info['folder']}/{filename}, or copy the file into one of those folders.")
    return _download(info, filename, os.path.join(cache_dir(), info["folder"]), searched)


def _download(info, filename, folder, searched):
    """Try each mirror; keep the first copy whose MD5 matches (written atomically)."""
    from tqdm.auto import tqdm

    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, filename)
    expected = info["md5"][filename]
    _say(f"{info['title']} {filename} is not on this machine (looked at {', '.join(searched)}); "
         f"downloading it into {folder}")
    failures = []
    for mirror in info["mirrors"]:
        url = mirror + filename
        tmp = f"{target}.part-{os.getpid()}"
        try:
            h = hashlib.md5()
            with urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=filename, leave=False,
                          disable=None) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
            if h.hexdigest() != expected:
                failures.append(f"{url}: MD5 {h.hexdigest()} != expected {expected}")
                os.remove(tmp)
                continue
            os.replace(tmp, target)
            _say(f"downloaded {url} -> {target} (MD5 {expected} verified)")
            return target
        except Exception as e:   # network errors come in many types (URLError, timeout, OSError)
            failures.append(f"{url}: {type(e).__name__}: {e}")
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {info['title']} {filename}:\n  " + "\n  ".join(failures)
                    + f"\nDownload it by hand into {folder}/ (expected MD5 {expected}), or set "
                    "TINYDIFF_DATA to a folder that holds " + f"{info['folder']}/{filename}.")


# -- file formats ------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Parse an IDX file (the MNIST format), gzipped if its name ends in .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is corrupt or truncated (cannot decompress: {e}); delete it and "
                        "fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header is cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != need:
        raise DataError(f"{path} is truncated or corrupt: header says shape {shape} "
                        f"({need} bytes of data), found {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _load_idx_pair(dataset, split, root, download):
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_file, label_file = _IDX_FILES[split]
    image_path = fetch(dataset, image_file, root, download)
    label_path = fetch(dataset, label_file, root, download)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{image_path} and {label_path} do not match: images {images.shape}, "
                        f"labels {labels.shape}")
    return images, labels, os.path.dirname(image_path)


def load_mnist(split="train", root=None, download=True, verbose=True):
    """MNIST digits: (images uint8 (N, 28, 28), labels uint8 (N,)); N = 60000 train, 10000 test."""
    images, labels, where = _load_idx_pair("mnist", split, root, download)
    if verbose:
        _say(f"MNIST {split}: {len(images)} images from {where}")
    return images, labels


def load_fashion_mnist(split="train", root=None, download=True, verbose=True):
    """Fashion-MNIST: same layout as MNIST (28x28 grey images, 10 classes)."""
    images, labels, where = _load_idx_pair("fashion-mnist", split, root, download)
    if verbose:
        _say(f"Fashion-MNIST {split}: {len(images)} images from {where}")
    return images, labels


def _find_local(dataset, filename, root):
    """Verified local path of a file, or None when no searched folder has it."""
    info = _dataset(dataset)
    for folder, _ in data_roots(root):
        path = os.path.join(folder, info["folder"], filename)
        if os.path.isfile(path):
            verify_md5(path, info["md5"][filename], dataset_title=info["title"])
            return path
    return None


def read_cifar10_tarball(path, split="train"):
    """CIFAR-10 from the official python tarball: images uint8 (N, 3, 32, 32), labels uint8."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise DataError(f"{path} has no member {name}; is it cifar-10-python.tar.gz?")
                # The official batches are pickles; the tarball's MD5 was verified before this.
                batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")
                images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], np.uint8))
    except (tarfile.TarError, EOFError, zlib.error, pickle.UnpicklingError) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(split="train", root=None, download=True, verbose=True):
    """CIFAR-10: (images uint8 (N, 3, 32, 32) RGB, labels uint8 (N,)).

    Reads cifar-10/cifar10.npz when present (this project's lossless copy: full train split, only
    the first 1000 test images, with a warning), else the official cifar-10-python.tar.gz,
    downloading the tarball when neither is found.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    npz = _find_local("cifar-10", "cifar10.npz", root)
    if npz is not None:
        with np.load(npz, allow_pickle=False) as f:
            images = np.ascontiguousarray(f[f"x_{split}"].transpose(0, 3, 1, 2))   # HWC -> CHW
            labels = f[f"y_{split}"].astype(np.uint8)
        if split == "test" and len(images) < 10000:
            warnings.warn(f"{npz} holds only the first {len(images)} of the 10000 CIFAR-10 test "
                          "images; use cifar-10-python.tar.gz for the full test split",
                          stacklevel=2)
        where = npz
    else:
        where = fetch("cifar-10", "cifar-10-python.tar.gz", root, download)
        images, labels = read_cifar10_tarball(where, split)
    if verbose:
        _say(f"CIFAR-10 {split}: {len(images)} images from {where}")
    return images, labels


_LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar-10": load_cifar10}


def load_dataset(name, split="train", root=None, limit=None, download=True, verbose=True,
                 image_size=None, channels=None, on_bad_file="error"):
    """Any of the above by name, optionally only the first ``limit`` images (for tiny runs).

    ``name`` is "mnist", "fashion-mnist", "cifar-10" (or an alias), or ``"folder:PATH"`` for a
    folder of PNG/JPEG files (see ``load_image_folder``; its only split is "train", and ``root``
    and ``download`` do not apply). ``image_size``, ``channels`` and ``on_bad_file`` are passed to
    ``load_image_folder`` and apply only to folders. Returns ``(images, labels)``: uint8 host
    arrays as the loaders return them; labels None for an unlabelled folder.
    """
    folder = image_folder_path(name)
    if folder is not None:
        if split != "train":
            raise DataError(f"{name}: an image folder is one set of images (split='train'); it "
                            f"has no {split!r} split")
        images, labels, _ = load_image_folder(folder, image_size=image_size, channels=channels,
                                              on_bad_file=on_bad_file, verbose=verbose)
    else:
        if (image_size, channels, on_bad_file) != (None, None, "error"):
            raise ValueError(f"image_size, channels and on_bad_file apply to image folders "
                             f"(folder:PATH), not to the data set {name!r}")
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in DATASETS:
            raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}, or "
                             "folder:PATH for a folder of images")
        images, labels = _LOADERS[key](split, root=root, download=download, verbose=verbose)
    if limit is not None and limit < len(images):
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
        if verbose:
            _say(f"using the first {limit} of them")
    return images, labels


# -- image folders -----------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")      # matched case-insensitively
FOLDER_PREFIX = "folder:"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")                          # label 0..9, as cifar10.npz's label_names
BAD_FILE_POLICIES = ("error", "skip")
_FOLDER_CACHE_VERSION = 1
# Pillow modes that hold one grey channel (1-bit, 8-bit, with alpha, 16/32-bit int, float)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def image_folder_path(name):
    """The absolute folder that a data-set name ``folder:PATH`` names, or None for other names.

    PATH may be relative (to the working directory) and may start with ``~``.
    """
    if not isinstance(name, str) or not name.lower().startswith(FOLDER_PREFIX):
        return None
    path = name[len(FOLDER_PREFIX):]
    if not path:
        raise DataError(f"data set {name!r} names no folder; write folder:PATH")
    return os.path.abspath(os.path.expanduser(path))


def _is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


_LOOKED_FOR = "/".join(IMAGE_EXTENSIONS) + " in any letter case"


def _preview(names, k=3):
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def scan_image_folder(folder):
    """The image files of a folder and its layout, without decoding anything.

    Returns ``(files, class_names)``: ``files`` a list of ``(relative path, label)`` in the order
    the images are loaded (by class, then by path), ``class_names`` the sorted sub-folder names
    (label i is ``class_names[i]``), or None for a flat folder (labels None). Names starting
    with "." are ignored, and so are files of other types.
    """
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"image folder {folder} {what}")
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    top = [e for e in entries if e not in subdirs and _is_image_file(e)]
    if subdirs and top:
        raise DataError(f"{folder} has both image files ({_preview(top)}) and sub-folders "
                        f"({_preview([d + '/' for d in subdirs])}); put every image in a class "
                        "sub-folder (one per class), or none (an unlabelled set)")
    if not subdirs:
        if not top:
            others = [e for e in entries if e not in subdirs]
            found = f"; it holds {len(others)} other files ({_preview(others)})" if others else ""
            raise DataError(f"{folder} has no image files (looked for {_LOOKED_FOR}, directly in "
                            f"it or in one sub-folder per class){found}")
        return [(e, None) for e in top], None
    files = []
    for label, cls in enumerate(subdirs):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, cls)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            found += [f"{rel}/{f}" for f in filenames if _is_image_file(f)]
        if not found:
            raise DataError(f"class folder {os.path.join(folder, cls)} has no image files (looked "
                            f"for {_LOOKED_FOR}); every sub-folder of {folder} is a class: add "
                            "images to it or remove it")
        files += [(p, label) for p in sorted(found)]
    return files, subdirs


def _fingerprint(folder, files):
    """Sorted [relative path, size in bytes, mtime_ns] of the files: what the cache depends on."""
    out = []
    for rel, _ in files:
        st = os.stat(os.path.join(folder, rel))
        out.append([rel, int(st.st_size), int(st.st_mtime_ns)])
    return sorted(out)


def _what_changed(old, new):
    old, new = {r: (s, t) for r, s, t in old}, {r: (s, t) for r, s, t in new}
    added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
    modified = sum(old[r] != new[r] for r in new.keys() & old.keys())
    return f"{added} added, {removed} removed, {modified} modified"


def image_folder_cache_path(folder, image_size=None, channels=None):
    """Where ``load_image_folder`` caches a folder: a file in ``cache_dir()/image-folders/`` named
    by the folder's name and a hash of its absolute path, ``image_size`` and ``channels``."""
    folder = os.path.abspath(os.path.expanduser(folder))
    key = json.dumps([_FOLDER_CACHE_VERSION, folder, image_size, channels])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder))[:40].strip("._") or "folder"
    return os.path.join(cache_dir(), "image-folders", f"{stem}-{digest}.npz")


def _read_folder_cache(path, folder, fingerprint):
    """(images HWC, labels or None, class names or None, skipped files) from a cache whose
    fingerprint matches, else None (with one line saying why, unless there is no cache)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != _FOLDER_CACHE_VERSION:
                raise ValueError(f"cache format {int(f['version'])}, "
                                 f"expected {_FOLDER_CACHE_VERSION}")
            stored = json.loads(str(f["fingerprint"]))
            if stored != fingerprint:
                _say(f"{folder} changed since {path} was written "
                     f"({_what_changed(stored, fingerprint)}); decoding it again")
                return None
            images, labels = f["images"], f["labels"]
            labelled = bool(f["labelled"])
            class_names = [str(c) for c in f["class_names"]] if labelled else None
            skipped = [str(s) for s in json.loads(str(f["skipped"]))]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or (
                labelled and labels.shape != images.shape[:1]):
            raise ValueError(f"images {images.dtype} {images.shape}, labels {labels.shape}")
    except Exception as e:   # a cache never stops a run: whatever is wrong with it, rebuild it
        _say(f"the cache {path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())}); "
             f"decoding {folder} again")
        return None
    return images, (labels.astype(np.int64) if labelled else None), class_names, skipped


def _write_folder_cache(path, images, labels, class_names, fingerprint, skipped):
    from .checkpoint import atomic_write   # a temporary file renamed over the old one

    arrays = {"version": np.int64(_FOLDER_CACHE_VERSION), "images": images,
              "labels": np.zeros(0, np.int64) if labels is None else labels,
              "labelled": np.bool_(labels is not None),
              "class_names": np.array(class_names or [], dtype=str),
              "fingerprint": np.array(json.dumps(fingerprint)),
              "skipped": np.array(json.dumps(skipped))}
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return True
    except OSError as e:
        _say(f"could not write the cache {path} ({e}); the folder will be decoded again next time")
        return False


def _decode_image(path, mode, image_size):
    """One image as uint8 (H, W) or (H, W, 3): converted to ``mode`` ("L", "RGB", or None: "L" for
    a grey image, else "RGB"), centre-cropped to a square and resized when ``image_size`` is set."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)   # as a viewer shows it (camera JPEGs' orientation tag)
        img = img.convert(mode or ("L" if img.mode in _GRAY_MODES else "RGB"))
    if image_size is not None:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))   # nothing outside it leaks in
        if side != image_size:   # Lanczos when shrinking (it filters out what N x N cannot hold)
            resample = Image.Resampling.LANCZOS if side > image_size else Image.Resampling.BICUBIC
            img = img.resize((image_size, image_size), resample)
    return np.asarray(img, dtype=np.uint8)


def _decode_errors():
    import struct

    from PIL import Image
    return (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError,
            Image.DecompressionBombError)


def load_image_folder(folder, image_size=None, channels=None, on_bad_file="error", cache=True,
                      verbose=True):
    """A folder of PNG/JPEG images as a data set, decoded once and then read from a cache.

    Layout: either every image directly in ``folder`` (unlabelled), or one sub-folder per class
    (images anywhere below it), the sorted sub-folder names giving labels 0..K-1. Extensions
    .png, .jpg, .jpeg in any case; names starting with "." and other files are ignored.

    Args:
        folder: the folder's path.
        image_size: None keeps the images as they are (all must have the same size, square or
            not); an int N centre-crops each image to a square and resizes it to N x N (Lanczos
            when shrinking, bicubic when enlarging, untouched when the square is already N).
        channels: 3 (RGB), 1 (grey, Pillow's L) or None: 1 when every image is grey, else 3.
            Alpha is dropped.
        on_bad_file: "error" stops at a file Pillow cannot read, naming it; "skip" leaves it
            out with one line each and a count.
        cache: read and write the cache, a uint8 .npz in ``cache_dir()/image-folders/``; it is
            rebuilt when a file is added, removed or modified (size or mtime), or the cache
            itself is unreadable.
        verbose: print one line saying what was loaded and from where.
    Returns:
        ``(images, labels, class_names)``: images uint8 (N, C, H, W), like the other loaders
        (``batches`` scales them to [0, 1]); labels int64 (N,) and class_names a list of K
        names, or both None for a flat folder.
    """
    import time

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(
            image_size, (int, np.integer)) or image_size < 1):
        raise ValueError(f"image_size must be an integer >= 1 or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (1 if every image is grey, else 3), "
                         f"got {channels!r}")
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    image_size = None if image_size is None else int(image_size)
    channels = None if channels is None else int(channels)
    folder = os.path.abspath(os.path.expanduser(str(folder)))
    files, class_names = scan_image_folder(folder)
    # taken before decoding: a file changed while it is decoded makes the next call rebuild
    fingerprint = _fingerprint(folder, files)
    cache_path = image_folder_cache_path(folder, image_size, channels)
    cached = _read_folder_cache(cache_path, folder, fingerprint) if cache else None
    if cached is not None and cached[3] and on_bad_file == "error":
        cached = None   # built skipping bad files: decode again, so the first one is an error
    if cached is not None:
        hwc, labels, class_names, skipped = cached
        where = f"read from the cache {cache_path}"
        if skipped:
            where += f" ({len(skipped)} unreadable files were skipped when it was built)"
    else:
        start = time.perf_counter()
        hwc, labels, skipped = _decode_folder(folder, files, class_names, image_size, channels,
                                              on_bad_file)
        where = f"decoded in {time.perf_counter() - start:.1f} s"
        if cache and _write_folder_cache(cache_path, hwc, labels, class_names, fingerprint,
                                         skipped):
            where += f", cached in {cache_path}"
    images = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))   # (N, H, W, C) -> (N, C, H, W)
    if verbose:
        n, c, h, w = images.shape
        kind = (f"{len(class_names)} classes ({_preview(class_names)})" if class_names is not None
                else "no labels")
        _say(f"image folder {folder}: {n} images, {c} x {h} x {w}, {kind}; {where}")
    return images, labels, class_names


def _decode_folder(folder, files, class_names, image_size, channels, on_bad_file):
    """Decode every file: (images uint8 (N, H, W, C), labels int64 or None, skipped paths)."""
    errors = _decode_errors()
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    arrays, labels, skipped, first = [], [], [], None
    for rel, label in files:
        path = os.path.join(folder, rel)
        try:
            a = _decode_image(path, mode, image_size)
        except errors as e:
            reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
            if on_bad_file == "error":
                raise DataError(f"{path}: cannot read this image ({reason}); replace or delete "
                                "it, or pass on_bad_file='skip' to leave such files out") from e
            _say(f"skipping {path}: {reason}")
            skipped.append(rel)
            first = first or f"{rel}: {reason}"
            continue
        if arrays and a.shape[:2] != arrays[0].shape[:2]:
            (h0, w0), (h, w) = arrays[0].shape[:2], a.shape[:2]
            raise DataError(f"{folder}: images have different sizes ({w0}x{h0} in {first_kept}, "
                            f"{w}x{h} in {rel}); pass --image-size N (image_size=N) to crop and "
                            "resize them all to N x N")
        if not arrays:
            first_kept = rel
        arrays.append(a)
        labels.append(label)
    if not arrays:
        raise DataError(f"{folder}: none of its {len(files)} image files could be read (the "
                        f"first: {first})")
    if skipped:
        _say(f"{folder}: skipped {len(skipped)} of {len(files)} image files that could not be read")
        if class_names is not None:
            present = set(labels)
            empty = [c for i, c in enumerate(class_names) if i not in present]
            if empty:
                _say(f"{folder}: no readable images left in class folder(s) {_preview(empty)}")
    if channels is None and any(a.ndim == 3 for a in arrays):   # some colour: all RGB (L -> R=G=B)
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    images = np.stack([a if a.ndim == 3 else a[:, :, None] for a in arrays])
    return images, (None if class_names is None else np.asarray(labels, np.int64)), skipped


# -- batches -----------------------------------------------------------------------------------

def num_batches(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else -(-n // batch_size)


def _host_generator(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, Generator):
        if rng.backend.name != "numpy":
            raise TypeError("batches shuffles on the host: pass a seed, a numpy Generator or a "
                            "tinydiff Generator of the numpy backend")
        return rng._gen
    return np.random.default_rng(rng)   # an int seed, a sequence of ints, or None


def mirror_some(images, which):
    """A copy of ``images`` (N, ..., W) with the images where ``which`` (N,) is true mirrored
    left-right (the last axis reversed); the others are unchanged."""
    which = np.asarray(which, dtype=bool)
    if which.shape != images.shape[:1]:
        raise ValueError(f"which has shape {which.shape}, expected ({len(images)},)")
    out = np.array(images, copy=True)
    out[which] = out[which][..., ::-1]
    return out


def batches(images, batch_size, rng=None, backend="numpy", labels=None, shuffle=True,
            drop_last=False, start=0, hflip=False):
    """Iterate over ``(x, y)`` batches of a data set, once (one epoch).

    Args:
        images: host array (N, H, W) or (N, C, H, W); uint8 is scaled to float32 in [0, 1],
            float arrays (e.g. latent codes) are passed as float32 unchanged.
        batch_size: images per batch.
        rng: seed (int or tuple of ints), numpy Generator or host tinydiff Generator that draws
            the shuffling permutation (one permutation per call).
        backend: "numpy", "cupy", "strict" or a Backend; the batches live there.
        labels: optional host array (N,); y is then an int64 array on the backend, else None.
        shuffle: draw a random order; False keeps the stored order.
        drop_last: leave out a final batch smaller than batch_size.
        start: skip the first ``start`` batches of this order (resuming in the middle of an epoch).
        hflip: mirror each image left-right with probability 1/2 (data augmentation, e.g. for
            CIFAR-10). The coin flips of the whole epoch are drawn from ``rng`` right after the
            permutation, one per image, so ``start`` resumes with the same flips; the flip is done
            on the host, on the gathered uint8 batch, before the copy to the backend.
    Yields:
        (x, y): x float32 (B, C, H, W) on the backend, y as described above.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    backend = get_backend(backend)
    n = len(images)
    gen = _host_generator(rng) if shuffle or hflip else None
    order = gen.permutation(n) if shuffle else np.arange(n)
    # drawn after the permutation (hflip=False draws exactly what it always did), for the whole
    # epoch at once (a resumed epoch, start > 0, draws the same numbers and skips the same ones)
    flips = gen.random(n) < 0.5 if hflip else None
    for b in range(start, num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        host = np.asarray(images[idx])
        if hflip:
            host = mirror_some(host, flips[b * batch_size:(b + 1) * batch_size])
        if host.ndim == 3:
            host = host[:, None]                      # (B, H, W) -> (B, 1, H, W)
        # move uint8 to the device (a quarter of the bytes of float32) and scale there
        x = backend.asarray(np.ascontiguousarray(host))
        x = x.astype(np.float32) / np.float32(255) if host.dtype == np.uint8 else x.astype(np.float32)
        y = None if labels is None else backend.asarray(np.asarray(labels[idx], dtype=np.int64))
        yield x, y
