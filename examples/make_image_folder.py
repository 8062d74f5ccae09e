"""Write CIFAR-10 training images as PNG files: a folder of images for tinydiff.data.load_image_folder.

    python3 examples/make_image_folder.py --num 1000 --out runs/cifar_folder
    python3 examples/make_image_folder.py --num 500 --out runs/cifar_flat --flat

The first N training images, lossless. By default one sub-folder per class (airplane/,
automobile/, ...; only the classes among the N images), the files named by the image's index in
the training set (00042.png); with --flat, all files in the folder itself (00042_cat.png), and
the folder loads without labels. It refuses to write into a folder that already holds files.
"""
import argparse
import os
import sys

from tinydiff import argtypes as A
from tinydiff import data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=A.positive_int, default=1000,
                   help="how many images, the first N of the training set (default: %(default)s)")
    p.add_argument("--out", type=A.out_dir, required=True,
                   help="the folder to write (created; must be empty or new)")
    p.add_argument("--flat", action="store_true",
                   help="all files in the folder itself, no class sub-folders (unlabelled)")
    p.add_argument("--data", type=A.existing_dir, default=None,
                   help="folder with the data sets (default $TINYDIFF_DATA, then the cache)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        p.error(f"argument --out: {args.out!r} is not empty; pass a new or empty folder")
    return args


def run(args):
    from PIL import Image

    images, labels = data.load_dataset("cifar-10", "train", root=args.data, limit=args.num)
    for i, (image, label) in enumerate(zip(images, labels)):
        name = data.CIFAR10_CLASSES[int(label)]
        path = (os.path.join(args.out, f"{i:05d}_{name}.png") if args.flat else
                os.path.join(args.out, name, f"{i:05d}.png"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(path)      # CHW -> HWC, RGB
    layout = "flat" if args.flat else f"{len(set(labels.tolist()))} class folders"
    print(f"wrote {len(images)} CIFAR-10 training images as PNG into {args.out} ({layout})")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
