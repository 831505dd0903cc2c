"""Images for the vision tasks: MNIST-style IDX files and folders of PNG/JPEG images.

An `ImageSet` is a uint8 tensor of gray images (N, H, W), their labels (N,) and the class names.
Sources:
- IDX files, gzipped or not, as MNIST and Fashion-MNIST distribute them (`train-images-idx3-ubyte.gz`
  + `train-labels-idx1-ubyte.gz`): a directory holding them (split "train" or "t10k"), or the images
  file itself (its labels file is found beside it);
- a directory with one subfolder per class (the subfolder's name is the label), PNG/JPEG/... images
  read by Pillow and converted to 8-bit gray. All images of a set must have the same size.
Every problem with a file is a DataError naming it, in one line.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aiayn.data.corpus import ASSETS, DataError
from aiayn.errors import InputError

MNIST10K = ASSETS / "mnist10k"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
IDX_UBYTE = 0x08


@dataclass
class ImageSet:
    images: Tensor          # (N, H, W) uint8
    labels: Tensor          # (N,) int64, indices into classes
    classes: list[str]      # class names

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)


# -------------------------------------------------------------------------------------------- IDX
def _read_bytes(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return data


def read_idx(path: Path | str) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes -> its array, e.g. (N, 28, 28) or (N,).

    Format: two zero bytes, a type code (0x08 = uint8), the number of dimensions, each dimension as a
    big-endian int32, then the data in C order.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype != IDX_UBYTE:
        raise DataError(f"{path}: IDX type 0x{dtype:02x} is not supported (only unsigned bytes, 0x08)")
    if not 1 <= ndim <= 3 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is cut short or has {ndim} dimensions")
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise DataError(f"{path}: IDX header says {'x'.join(map(str, shape))} = {expected} bytes, "
                        f"the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def labels_path_for(images_path: Path) -> Path:
    """train-images-idx3-ubyte(.gz) -> train-labels-idx1-ubyte(.gz), the MNIST naming."""
    name = images_path.name
    if "images-idx3" not in name:
        raise DataError(f"{images_path}: cannot find its labels file (expected a name like "
                        "train-images-idx3-ubyte.gz beside train-labels-idx1-ubyte.gz)")
    for candidate in (name.replace("images-idx3", "labels-idx1"),
                      name.replace("images-idx3", "labels-idx1").removesuffix(".gz"),
                      name.replace("images-idx3", "labels-idx1") + ".gz"):
        if (images_path.parent / candidate).is_file():
            return images_path.parent / candidate
    raise DataError(f"{images_path}: no labels file "
                    f"{name.replace('images-idx3', 'labels-idx1')} beside it")


def load_idx(images_path: Path | str, labels_path: Path | str | None = None,
             classes: list[str] | None = None) -> ImageSet:
    images_path = Path(images_path)
    labels_path = Path(labels_path) if labels_path else labels_path_for(images_path)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images (N, H, W), found an array of shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels (N,), found an array of shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {len(labels)} labels in {labels_path.name}")
    if len(images) == 0:
        raise DataError(f"{images_path}: no images")
    n_classes = int(labels.max()) + 1
    classes = classes or [str(i) for i in range(max(n_classes, 10))]  # IDX labels are numbers (MNIST: 10)
    if n_classes > len(classes):
        raise DataError(f"{labels_path}: label {n_classes - 1} outside the {len(classes)} classes")
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), classes)


def _find_idx(directory: Path, split: str) -> Path | None:
    for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"):
        if (directory / name).is_file():
            return directory / name
    return None


# ------------------------------------------------------------------------------------ image files
def read_image(path: Path | str, size: tuple[int, int] | None = None) -> Tensor:
    """One image file -> (H, W) uint8 gray. With `size` (H, W), another size is an error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # transparent parts are background: composite over black, as MNIST digits lie
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if size is not None and tuple(gray.shape) != tuple(size):
        raise DataError(f"{path}: image is {gray.shape[1]}x{gray.shape[0]} pixels, the model takes "
                        f"{size[1]}x{size[0]}")
    return torch.from_numpy(gray.copy())


def load_folder(directory: Path | str) -> ImageSet:
    """One subfolder per class, named by its label; every image file inside is one example."""
    directory = Path(directory)
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{directory}: no class subfolders (expected one folder of images per class) "
                        "and no IDX files")
    images, labels, size = [], [], None
    for label, name in enumerate(classes):
        files = sorted(f for f in (directory / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            img = read_image(f, size)
            size = size or tuple(img.shape)
            images.append(img)
            labels.append(label)
    if not images:
        raise DataError(f"{directory}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its "
                        "class subfolders")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes)


# -------------------------------------------------------------------------------------- datasets
def load_images(path: Path | str | None = None, split: str = "train") -> ImageSet:
    """A data set from an IDX directory (split "train" or "t10k"), an IDX images file, or a folder
    of class subfolders. No path: the shipped mnist10k."""
    path = Path(path) if path else MNIST10K
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return load_idx(path, classes=None)
    idx = _find_idx(path, split)
    if idx is not None:
        return load_idx(idx)
    if split != "train" and _find_idx(path, "train") is not None:
        raise DataError(f"{path}: no {split}-images-idx3-ubyte(.gz) here")
    return load_folder(path)


# ---------------------------------------------------------------------------------- class names
class Labels:
    """The class names of a classifier, saved beside its weights as `labels.json` (the image models'
    counterpart of a tokenizer: checkpoints fingerprint and restore it the same way)."""

    filename = "labels.json"

    def __init__(self, classes: list[str]):
        self.classes = list(classes)

    @property
    def vocab_size(self) -> int:
        return len(self.classes)

    def save(self, directory: Path) -> None:
        import json

        (Path(directory) / self.filename).write_text(json.dumps({"classes": self.classes}) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Labels":
        import json

        data = json.loads((Path(directory) / cls.filename).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise InputError(f"{cls.filename} has no list of classes")
        return cls([str(c) for c in data["classes"]])
