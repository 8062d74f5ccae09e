"""tinydiff.data.load_image_folder (and load_dataset("folder:PATH")): layouts, decoding, crop and
resize, errors, and the cache with its invalidation. Every test writes its own folder of tiny
PNG/JPEG files into tmp_path with Pillow, and the cache goes to a temporary TINYDIFF_CACHE."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from tinydiff import data
from conftest import data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TINYDIFF_CACHE", str(folder))
    return folder


def rgb(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return array


def load(folder, **kw):
    return data.load_image_folder(str(folder), verbose=False, **kw)


def no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("Image.open was called: the cache was not used")
    monkeypatch.setattr(Image, "open", refuse)


# -- layouts and pixel values ------------------------------------------------------------------

def test_flat_folder_of_pngs_round_trips_exactly(tmp_path):
    folder = tmp_path / "flat"
    arrays = {name: save(str(folder / name), rgb(i)) for i, name in
              enumerate(["b.png", "a.PNG", "c.png"])}
    (folder / "notes.txt").write_text("not an image")          # other files are ignored
    save(str(folder / ".hidden.png"), rgb(9))                    # and so are hidden ones
    images, labels, classes = load(folder)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.uint8
    assert labels is None and classes is None
    for got, name in zip(images, ["a.PNG", "b.png", "c.png"]):  # sorted by name
        np.testing.assert_array_equal(got.transpose(1, 2, 0), arrays[name])


def test_class_subfolders_give_sorted_labels_and_names(tmp_path):
    folder = tmp_path / "classes"
    layout = {"dog": ["x.png", "y.png"], "ant": ["1.jpeg"], "cat": ["deep/z.png", "w.JPG"]}
    arrays = {}
    for k, (cls, names) in enumerate(layout.items()):
        for j, name in enumerate(names):
            arrays[f"{cls}/{name}"] = save(str(folder / cls / name), rgb(10 * k + j))
    os.makedirs(folder / ".ipynb_checkpoints")                  # hidden: not a class
    images, labels, classes = load(folder)
    assert classes == ["ant", "cat", "dog"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1, 2, 2]
    order = ["ant/1.jpeg", "cat/deep/z.png", "cat/w.JPG", "dog/x.png", "dog/y.png"]
    for got, rel in zip(images, order):
        expect = arrays[rel].astype(int)
        tol = 0 if rel.endswith(".png") else 255                 # JPEG: lossy (checked below)
        assert np.abs(got.transpose(1, 2, 0) - expect).max() <= tol, rel


def test_jpeg_pixels_are_close(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([8 * x, 8 * y, 4 * (x + y)], axis=-1).astype(np.uint8)   # JPEG-friendly
    save(str(tmp_path / "f" / "a.jpg"), smooth, quality=95)
    images, _, _ = load(tmp_path / "f")
    diff = np.abs(images[0].transpose(1, 2, 0).astype(int) - smooth)
    assert images.shape == (1, 3, 32, 32) and diff.mean() < 2 and diff.max() < 24


def test_grey_images_give_one_channel(tmp_path):
    grey = [np.random.default_rng(i).integers(0, 256, (6, 6), dtype=np.uint8) for i in range(2)]
    for i, g in enumerate(grey):
        save(str(tmp_path / "g" / f"{i}.png"), g)
    images, _, _ = load(tmp_path / "g")
    assert images.shape == (2, 1, 6, 6)
    np.testing.assert_array_equal(images[:, 0], grey)
    forced, _, _ = load(tmp_path / "g", channels=3)              # L -> RGB repeats the grey
    np.testing.assert_array_equal(forced, np.repeat(images, 3, axis=1))
    colour = save(str(tmp_path / "g" / "2.png"), rgb(5, 6, 6))   # one colour image: all RGB
    mixed, _, _ = load(tmp_path / "g")
    assert mixed.shape == (3, 3, 6, 6)
    np.testing.assert_array_equal(mixed[:2], np.repeat(images, 3, axis=1))
    np.testing.assert_array_equal(mixed[2].transpose(1, 2, 0), colour)
    as_grey, _, _ = load(tmp_path / "g", channels=1)             # Pillow's L of the colour one
    assert as_grey.shape == (3, 1, 6, 6)
    np.testing.assert_array_equal(as_grey[2, 0], np.asarray(Image.fromarray(colour).convert("L")))


def test_alpha_and_palette_images_become_rgb(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8)
    save(str(tmp_path / "p" / "a.png"), rgba)
    Image.fromarray(rgb(1, 4, 4)).convert("P").save(tmp_path / "p" / "b.png")
    images, _, _ = load(tmp_path / "p")
    assert images.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(images[0].transpose(1, 2, 0), rgba[..., :3])   # alpha dropped


# -- sizes: centre crop and resize -------------------------------------------------------------

def test_same_size_non_square_images_are_kept_as_they_are(tmp_path):
    a = save(str(tmp_path / "n" / "a.png"), rgb(0, 6, 10))
    images, _, _ = load(tmp_path / "n")
    assert images.shape == (1, 3, 6, 10)
    np.testing.assert_array_equal(images[0].transpose(1, 2, 0), a)


def test_image_size_centre_crops_and_resizes(tmp_path):
    wide = save(str(tmp_path / "m" / "a.png"), rgb(0, 8, 12))   # 12 wide, 8 high
    tall = save(str(tmp_path / "m" / "b.png"), rgb(1, 15, 9))   # 9 wide, 15 high
    big = save(str(tmp_path / "m" / "c.png"), rgb(2, 16, 16))
    images, _, _ = load(tmp_path / "m", image_size=8)
    assert images.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(images[0].transpose(1, 2, 0), wide[:, 2:10])   # exact crop
    crop = Image.fromarray(tall[3:12])                                         # 9 x 9 centre
    np.testing.assert_array_equal(images[1].transpose(1, 2, 0), np.asarray(
        crop.resize((8, 8), Image.Resampling.LANCZOS)))
    np.testing.assert_array_equal(images[2].transpose(1, 2, 0), np.asarray(
        Image.fromarray(big).resize((8, 8), Image.Resampling.LANCZOS)))
    up, _, _ = load(tmp_path / "m", image_size=20)                              # enlarging
    assert up.shape == (3, 3, 20, 20)
    np.testing.assert_array_equal(up[2].transpose(1, 2, 0), np.asarray(
        Image.fromarray(big).resize((20, 20), Image.Resampling.BICUBIC)))


def test_mixed_sizes_without_image_size_is_one_line_error(tmp_path):
    save(str(tmp_path / "s" / "a.png"), rgb(0, 8, 8))
    save(str(tmp_path / "s" / "b.jpg"), rgb(1, 48, 64))
    with pytest.raises(data.DataError, match=r"images have different sizes \(8x8 in a.png, "
                                             r"64x48 in b.jpg\); pass --image-size N") as err:
        load(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value) and "\n" not in str(err.value)


# -- errors ------------------------------------------------------------------------------------

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        load(tmp_path / "file.png")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DataError, match=r"has no image files \(looked for .png/.jpg/.jpeg"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "photo.gif").write_bytes(b"GIF89a")
    with pytest.raises(data.DataError, match=r"1 other files \(photo.gif\)"):
        load(tmp_path / "empty")


def test_layout_errors(tmp_path):
    save(str(tmp_path / "mix" / "a.png"), rgb(0))
    save(str(tmp_path / "mix" / "cat" / "b.png"), rgb(1))
    with pytest.raises(data.DataError, match=r"both image files \(a.png\) and sub-folders \(cat/\)"):
        load(tmp_path / "mix")
    save(str(tmp_path / "cls" / "cat" / "b.png"), rgb(1))
    os.makedirs(tmp_path / "cls" / "dog")
    (tmp_path / "cls" / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=r"class folder .*cls/dog has no image files"):
        load(tmp_path / "cls")


def test_corrupt_file_is_named_or_skipped(tmp_path, capsys):
    folder = tmp_path / "bad"
    good = [save(str(folder / f"{i}.png"), rgb(i)) for i in range(3)]
    (folder / "3.png").write_bytes(b"this is not a PNG")
    blob = open(folder / "1.png", "rb").read()
    (folder / "4.png").write_bytes(blob[:len(blob) // 2])        # truncated
    with pytest.raises(data.DataError, match=r"bad/3.png: cannot read this image") as err:
        load(folder)
    assert "on_bad_file='skip'" in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    images, _, _ = load(folder, on_bad_file="skip")
    np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), good)
    lines = capsys.readouterr().err.strip().splitlines()
    assert sum("skipping" in line for line in lines) == 2
    assert any("3.png" in line for line in lines) and any("4.png" in line for line in lines)
    assert "skipped 2 of 5 image files" in lines[-1]
    # a cache built skipping files is not used when bad files are errors: the error comes back
    with pytest.raises(data.DataError, match="3.png: cannot read"):
        load(folder)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG broken too")
    with pytest.raises(data.DataError, match=r"none of its 5 image files could be read"):
        load(folder, on_bad_file="skip")


def test_argument_checks(tmp_path):
    save(str(tmp_path / "a" / "a.png"), rgb(0))
    for kw, word in [({"image_size": 0}, "image_size"), ({"image_size": 2.5}, "image_size"),
                     ({"image_size": True}, "image_size"), ({"channels": 2}, "channels"),
                     ({"on_bad_file": "ignore"}, "on_bad_file")]:
        with pytest.raises(ValueError, match=word):
            load(tmp_path / "a", **kw)


# -- load_dataset("folder:PATH") ---------------------------------------------------------------

def test_load_dataset_names_a_folder(tmp_path, monkeypatch, capsys):
    for i, cls in enumerate(["b", "a", "b", "a"]):
        save(str(tmp_path / "ds" / cls / f"{i}.png"), rgb(i))
    images, labels = data.load_dataset(f"folder:{tmp_path / 'ds'}", limit=3)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 1]
    assert "image folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)                                  # relative to the working dir
    images2, labels = data.load_dataset("folder:ds", verbose=False)
    assert len(images2) == 4
    x, y = next(data.batches(images2, 4, rng=0, labels=labels, hflip=True))
    assert x.dtype == np.float32 and x.shape == (4, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(data.DataError, match="no 'test' split"):
        data.load_dataset("folder:ds", "test")
    with pytest.raises(data.DataError, match="names no folder"):
        data.load_dataset("folder:")
    with pytest.raises(ValueError, match="apply to image folders"):
        data.load_dataset("mnist", image_size=32)
    with pytest.raises(ValueError, match="folder:PATH"):
        data.load_dataset("imagenet")
    save(str(tmp_path / "flat" / "a.png"), rgb(0))
    images, labels = data.load_dataset("folder:flat", limit=1, verbose=False)
    assert labels is None and images.shape == (1, 3, 8, 8)
    assert data.image_folder_path("mnist") is None
    assert data.image_folder_path("folder:ds") == str(tmp_path / "ds")


# -- the cache ---------------------------------------------------------------------------------

def test_cache_is_written_and_reused(tmp_path, cache, monkeypatch, capsys):
    folder = tmp_path / "c"
    for i, cls in enumerate(["x", "y", "x"]):
        save(str(folder / cls / f"{i}.png"), rgb(i, 4, 6))
    first = load(folder, image_size=4)
    path = data.image_folder_cache_path(str(folder), 4, None)
    assert os.path.dirname(path) == str(cache / "image-folders")
    assert os.listdir(cache / "image-folders") == [os.path.basename(path)]   # no temp files left
    with np.load(path, allow_pickle=False) as f:
        assert f["images"].shape == (3, 4, 4, 3) and f["images"].dtype == np.uint8   # N, H, W, C
        assert f["labels"].tolist() == [0, 0, 1] and f["class_names"].tolist() == ["x", "y"]
    no_decoding(monkeypatch)
    capsys.readouterr()
    second = data.load_image_folder(str(folder), image_size=4)
    assert "the cache" in capsys.readouterr().err
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert second[2] == ["x", "y"] and second[1].dtype == np.int64
    # another image_size or channels is another cache file, so it decodes
    with pytest.raises(AssertionError, match="Image.open was called"):
        load(folder, image_size=2)
    with pytest.raises(AssertionError, match="Image.open was called"):
        load(folder, image_size=4, channels=1)


def test_cache_false_neither_reads_nor_writes(tmp_path, cache):
    save(str(tmp_path / "n" / "a.png"), rgb(0))
    load(tmp_path / "n", cache=False)
    assert not os.path.exists(cache)


def test_cache_is_rebuilt_when_the_folder_changes(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ch"
    a = save(str(folder / "a.png"), rgb(0))
    load(folder)
    b = save(str(folder / "b.png"), rgb(1))                      # a file added
    capsys.readouterr()
    images, _, _ = load(folder)
    np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), [a, b])
    err = capsys.readouterr().err
    assert "changed since" in err and "1 added, 0 removed, 0 modified" in err
    new_a = save(str(folder / "a.png"), rgb(7))                  # a file modified
    st = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    images, _, _ = load(folder)
    np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), [new_a, b])
    assert "0 added, 0 removed, 1 modified" in capsys.readouterr().err
    os.remove(folder / "b.png")                                  # a file removed
    images, _, _ = load(folder)
    assert len(images) == 1 and "0 added, 1 removed, 0 modified" in capsys.readouterr().err
    no_decoding(monkeypatch)                                     # and now it is current again
    np.testing.assert_array_equal(load(folder)[0], images)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage, capsys):
    folder = tmp_path / "cc"
    save(str(folder / "a.png"), rgb(0))
    first, _, _ = load(folder)
    path = data.image_folder_cache_path(str(folder))
    blob = open(path, "rb").read()
    open(path, "wb").write({"garbage": b"\x00garbage" * 50, "truncated": blob[:len(blob) // 2],
                            "empty": b""}[damage])
    capsys.readouterr()
    again, _, _ = load(folder)
    np.testing.assert_array_equal(again, first)
    assert "is unreadable" in capsys.readouterr().err
    with np.load(path, allow_pickle=False) as f:                 # and the cache is whole again
        np.testing.assert_array_equal(f["images"].transpose(0, 3, 1, 2), first)


def test_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch, cache):
    folder = tmp_path / "iw"
    save(str(folder / "a.png"), rgb(0))

    def fail(f, **arrays):
        f.write(b"PK half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(KeyboardInterrupt):
        load(folder)
    assert not os.path.exists(data.image_folder_cache_path(str(folder)))
    assert os.listdir(cache / "image-folders") == []             # the temporary file is gone too


def test_unwritable_cache_is_not_fatal(tmp_path, monkeypatch, capsys):
    save(str(tmp_path / "u" / "a.png"), rgb(0))
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "blocker"))
    images, _, _ = load(tmp_path / "u")
    assert images.shape == (1, 3, 8, 8) and "could not write the cache" in capsys.readouterr().err


# -- examples/make_image_folder.py -------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_image_folder", os.path.join(ROOT, "examples", "make_image_folder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_image_folder_flags(tmp_path, capsys):
    mod = load_script()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv in (["--num", "0", "--out", str(tmp_path / "o")], ["--out", str(tmp_path / "full")]):
        with pytest.raises(SystemExit) as exit_:
            mod.main(argv)
        assert exit_.value.code == 2
        assert "error: argument" in capsys.readouterr().err


@pytest.mark.skipif(data_dir() is None or not os.path.exists(
    os.path.join(data_dir() or "", "cifar-10", "cifar10.npz")), reason="CIFAR-10 npz not available")
def test_make_image_folder_writes_cifar_pngs(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYDIFF_OFFLINE", "1")
    mod = load_script()
    cifar, labels = data.load_cifar10("train", root=data_dir(), verbose=False)
    assert mod.main(["--num", "30", "--out", str(tmp_path / "classes"), "--data", data_dir()]) == 0
    images, got_labels, classes = load(tmp_path / "classes")
    assert set(classes) <= set(data.CIFAR10_CLASSES) and len(images) == 30
    files, _ = data.scan_image_folder(str(tmp_path / "classes"))
    index = [int(os.path.basename(rel)[:5]) for rel, _ in files]   # 00042.png: training index
    np.testing.assert_array_equal(images, cifar[index])           # PNG: lossless
    assert [classes[k] for k in got_labels] == [data.CIFAR10_CLASSES[labels[i]] for i in index]
    assert mod.main(["--num", "5", "--out", str(tmp_path / "flat"), "--flat",
                     "--data", data_dir()]) == 0
    images, got_labels, _ = load(tmp_path / "flat")
    assert got_labels is None
    np.testing.assert_array_equal(images, cifar[:5])
