"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, gzip-compressed).

The data must come from a package registry, never a hub at run time: ``scripts/fetch_fashion_mnist.sh``
unpacks the package under ``data/raw/`` when it is not installed system-wide.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from mixer_contract.errors import CorruptData, InvalidInput

INSTALLED_DIR = Path("/usr/share/datasets/fashion-mnist")
UNPACKED_DIR = Path(__file__).resolve().parents[2] / "data/raw/fashion-mnist/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLITS = {"train": "train", "test": "t10k"}


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path:
    """The directory with the IDX files: ``data_dir`` if given, else the installed, else the unpacked copy."""
    candidates = [Path(data_dir)] if data_dir is not None else [INSTALLED_DIR, UNPACKED_DIR]
    for d in candidates:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise InvalidInput(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; run scripts/fetch_fashion_mnist.sh"
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) for ``split`` "train" (60k) or "test" (10k)."""
    if split not in _SPLITS:
        raise InvalidInput(f"unknown Fashion-MNIST split {split!r}; choose train or test")
    root = find_fashion_mnist(data_dir)
    prefix = _SPLITS[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", ndim=3)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", ndim=1)
    if len(images) != len(labels):
        raise CorruptData(f"{root}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: magic 0x0000080N, then N big-endian uint32 dims, then data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise CorruptData(f"{path}: not a {ndim}-d uint8 IDX file (magic {magic:#x})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise CorruptData(
            f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, found {data.size}"
        )
    return data.reshape(dims)
