"""Image loaders on tiny generated data: IDX files (gzipped or not, MNIST's own layout), folders of
PNG/JPEG images, and one clear error for each kind of bad file."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from aiayn.data.corpus import DataError
from aiayn.data.images import MNIST10K, Labels, load_folder, load_images, read_idx, read_image


def idx_bytes(array: np.ndarray) -> bytes:
    """MNIST's layout: 0, 0, type 0x08, ndim, big-endian int32 dims, raw bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_pair(directory, split, images, labels, gz=True):
    for kind, arr, dims in (("images", images, 3), ("labels", labels, 1)):
        name = f"{split}-{kind}-idx{dims}-ubyte" + (".gz" if gz else "")
        data = idx_bytes(arr)
        (directory / name).write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 5, 5), dtype=np.uint8), np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, tiny, gz):
    images, labels = tiny
    write_idx_pair(tmp_path, "train", images, labels, gz)
    data = load_images(tmp_path)
    assert torch.equal(data.images, torch.from_numpy(images))
    assert data.labels.tolist() == labels.tolist()
    assert data.classes == [str(i) for i in range(10)]
    # the images file itself finds its labels beside it
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert torch.equal(load_images(tmp_path / name).images, data.images)


def test_split_is_chosen_by_name(tmp_path, tiny):
    images, labels = tiny
    write_idx_pair(tmp_path, "train", images, labels)
    write_idx_pair(tmp_path, "t10k", images[:2], labels[:2])
    assert len(load_images(tmp_path, "train")) == 6 and len(load_images(tmp_path, "t10k")) == 2
    with pytest.raises(DataError, match="no val-images"):
        load_images(tmp_path, "val")


def test_shipped_mnist10k():
    train, test = load_images(), load_images(split="t10k")
    assert train.images.shape == (8006, 28, 28) and test.images.shape == (997, 28, 28)
    assert train.images.dtype == torch.uint8 and set(train.labels.tolist()) == set(range(10))
    assert test.labels.bincount().tolist() == [100, 112, 99, 103, 98, 86, 101, 107, 94, 97]
    assert MNIST10K.is_dir()


@pytest.mark.parametrize("content, message", [
    (b"", "bad magic"),
    (b"\x89PNG\r\n\x1a\n....", "bad magic"),
    (bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 2) + b"\0" * 8, "type 0x0d"),
    (bytes([0, 0, 8, 3]) + struct.pack(">3i", 2, 2, 2) + b"\0" * 5, "8 bytes, the file holds 5"),
    (bytes([0, 0, 8, 3]) + b"\0\0", "cut short"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
])
def test_bad_idx_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        read_idx(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_mismatched_counts_and_missing_labels(tmp_path, tiny):
    images, labels = tiny
    write_idx_pair(tmp_path, "train", images, labels[:4])
    with pytest.raises(DataError, match="6 images but 4 labels"):
        load_images(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no labels file"):
        load_images(tmp_path / "train-images-idx3-ubyte.gz")


def test_folder_of_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {}
    for cls, suffix in (("cat", ".png"), ("dog", ".png"), ("emu", ".bmp")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            a = rng.integers(0, 256, (6, 6), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / cls / f"{i}{suffix}")
            arrays[(cls, i)] = a
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not read")
    data = load_folder(tmp_path)
    assert data.classes == ["cat", "dog", "emu"] and data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(data.images[2].numpy(), arrays[("dog", 0)])  # lossless formats: exact pixels
    assert torch.equal(load_images(tmp_path).images, data.images)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no class subfolders"):
        load_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_folder(tmp_path)
    Image.new("L", (6, 6)).save(tmp_path / "a" / "0.png")
    Image.new("L", (7, 6)).save(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match="1.png: image is 7x6 pixels"):
        load_folder(tmp_path)


def test_read_image_converts_to_gray_and_reports_bad_files(tmp_path):
    Image.new("RGB", (4, 3), (255, 255, 255)).save(tmp_path / "white.jpg")
    img = read_image(tmp_path / "white.jpg")
    assert img.shape == (3, 4) and img.dtype == torch.uint8 and int(img.min()) >= 250
    rgba = Image.new("RGBA", (2, 2), (255, 255, 255, 0))  # fully transparent: background = black
    rgba.save(tmp_path / "clear.png")
    assert int(read_image(tmp_path / "clear.png").max()) == 0
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.new("L", (4, 4)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:45])
    for name, message in (("empty.png", "empty file"), ("text.png", "not an image"), ("missing.png", "no such file"),
                          ("cut.png", "unreadable image")):
        with pytest.raises(DataError, match=message) as e:
            read_image(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="the model takes 5x5"):
        read_image(tmp_path / "white.jpg", (5, 5))


def test_labels_round_trip(tmp_path):
    Labels(["a", "b c", "ü"]).save(tmp_path)
    assert Labels.load(tmp_path).classes == ["a", "b c", "ü"]
