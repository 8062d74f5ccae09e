"""Your own images: a folder of PNG/JPEG files (one sub-folder per class for a conditional run),
centre-cropped and resized to --image-size (32), cached as one uint8 .npz after the first read,
trained with the unet-32s U-Net.

  python examples/make_image_folder.py --num 3000 --out my_images   # a folder from CIFAR-10
  python examples/image_folder.py --dataset folder:my_images --out runs/mine            # classes
  python examples/image_folder.py --preset folder --dataset folder:faces --out runs/faces
  tinydiff evaluate runs/mine --classifier tinydiff/weights/classifier_cifar_10.npz

The same as `tinydiff train --preset folder-cond --dataset folder:PATH ...`; docs/data.md
describes the folder layout, the cache and its errors.
"""
import sys

from tinydiff import cli


def main(argv=None):
    return cli.train_main(argv, preset="folder-cond", prog="image_folder.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
