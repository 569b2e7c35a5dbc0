"""Image samples as a source kind: compressed images in shards, with storage bytes accounted exactly.

Layout of a prepared image source directory::

    meta.json         format, counts, image shape, total_bytes, shard sizes, header offsets
    index.npy         per sample: shard, offset, length, header id, label, quality code
    headers.bin       each distinct codec header once (see ``codec.split_header``)
    shard-00000.bin   payloads back to back

``total_bytes`` = all payload bytes + all distinct headers: exactly the bytes of ``headers.bin`` and the
shards, i.e. what the storage budget buys. The index adds a fixed 20 bytes per sample whatever the quality.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixer_contract.errors import CorruptData, InvalidInput, NotFound
from mixer_contract.image_samples import decode
from mixer_service.sources.image_codec import check_quality, encode, split_header

__all__ = ["ImageSource", "ImageSourceMeta", "decode", "prepare_image_source"]

FORMAT = "mixer-image-source"
VERSION = 1
DEFAULT_SHARD_BYTES = 64 << 20
INDEX_DTYPE = np.dtype(
    [
        ("shard", "<u4"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("header", "<i2"),
        ("label", "<i4"),
        ("quality", "u1"),
    ]
)


@dataclass(frozen=True)
class ImageSourceMeta:
    num_samples: int
    total_bytes: int
    qualities: np.ndarray  # quality code per sample (1..100 JPEG, 101 lossless PNG)
    image_shape: tuple[int, ...]

    @property
    def bytes_per_sample(self) -> float:
        return self.total_bytes / self.num_samples


def prepare_image_source(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    qualities: int | np.ndarray,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ImageSourceMeta:
    """Encode ``images`` (uint8 [N, H, W(, 3)]) at one quality code or one per sample and write a source.

    The directory appears atomically (written under a temporary name, then renamed); an existing one is
    refused rather than overwritten, so a prepared source is never half-replaced.
    """
    out = Path(out_dir)
    n = len(images)
    if n == 0 or len(labels) != n:
        raise InvalidInput(
            f"need >= 1 image and one label per image, got {n} images and {len(labels)} labels"
        )
    q = np.broadcast_to(np.asarray(qualities), (n,)).astype(np.int64)
    for value in np.unique(q):
        check_quality(int(value))
    if out.exists():
        raise InvalidInput(f"output directory already exists: {out}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_source(tmp, images, labels, q, shard_bytes)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImageSource.open(out).meta


def _write_source(
    root: Path, images: np.ndarray, labels: np.ndarray, q: np.ndarray, shard_bytes: int
) -> None:
    index = np.zeros(len(images), dtype=INDEX_DTYPE)
    headers: dict[bytes, int] = {}
    shard_sizes: list[int] = []
    shard = None
    try:
        for i in range(len(images)):
            header, payload = split_header(encode(np.ascontiguousarray(images[i]), int(q[i])))
            if shard is None or (shard_sizes[-1] > 0 and shard_sizes[-1] + len(payload) > shard_bytes):
                if shard is not None:
                    shard.close()
                shard = open(root / f"shard-{len(shard_sizes):05d}.bin", "wb")  # noqa: SIM115  closed below
                shard_sizes.append(0)
            shard.write(payload)
            header_id = headers.setdefault(header, len(headers))
            index[i] = (len(shard_sizes) - 1, shard_sizes[-1], len(payload), header_id, labels[i], q[i])
            shard_sizes[-1] += len(payload)
    finally:
        if shard is not None:
            shard.close()

    header_blobs = sorted(headers, key=headers.__getitem__)
    (root / "headers.bin").write_bytes(b"".join(header_blobs))
    np.save(root / "index.npy", index)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": len(images),
        "image_shape": list(images.shape[1:]),
        "total_bytes": sum(shard_sizes) + sum(map(len, header_blobs)),
        "shard_bytes": shard_sizes,
        "header_offsets": np.cumsum([0, *map(len, header_blobs)]).tolist(),
        "quality_counts": {
            str(int(v)): int(c) for v, c in zip(*np.unique(q, return_counts=True), strict=True)
        },
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


class ImageSource:
    """Random-access reader of a prepared image source; shards are memory-mapped, reads are O(1)."""

    def __init__(
        self,
        path: Path,
        meta: ImageSourceMeta,
        index: np.ndarray,
        headers: list[bytes],
        shards: list[np.ndarray],
    ):
        self.path = path
        self.meta = meta
        self._index = index
        self._headers = headers
        self._shards = shards

    @classmethod
    def open(cls, path: str | Path) -> ImageSource:
        """Open and verify a source: every file present with exactly the size its metadata records."""
        root = Path(path)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise NotFound(f"no image source at {root} (missing meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise CorruptData(
                    f"{meta_path}: not a {FORMAT} v{VERSION} "
                    f"(got {meta.get('format')} v{meta.get('version')})"
                )
            index = np.load(root / "index.npy")
            offsets = meta["header_offsets"]
            header_blob = (root / "headers.bin").read_bytes()
            shard_sizes = meta["shard_bytes"]
        except (OSError, ValueError, KeyError) as e:
            raise CorruptData(f"{root}: unreadable image source ({e})") from None
        if index.dtype != INDEX_DTYPE or len(index) != meta["num_samples"]:
            raise CorruptData(
                f"{root / 'index.npy'}: expected {meta['num_samples']} entries of {INDEX_DTYPE}"
            )
        if len(header_blob) != offsets[-1]:
            raise CorruptData(f"{root / 'headers.bin'}: {len(header_blob)} bytes, expected {offsets[-1]}")
        shards: list[np.ndarray] = []
        for k, size in enumerate(shard_sizes):
            shard_path = root / f"shard-{k:05d}.bin"
            actual = shard_path.stat().st_size if shard_path.is_file() else -1
            if actual != size:
                raise CorruptData(
                    f"{shard_path}: {actual} bytes on disk, expected {size} (truncated or missing)"
                )
            shards.append(np.memmap(shard_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8))
        headers = [header_blob[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        info = ImageSourceMeta(
            num_samples=int(meta["num_samples"]),
            total_bytes=int(meta["total_bytes"]),
            qualities=index["quality"].astype(np.int64),
            image_shape=tuple(meta["image_shape"]),
        )
        return cls(root, info, index, headers, shards)

    def __len__(self) -> int:
        return self.meta.num_samples

    def sample(self, i: int) -> tuple[bytes, int]:
        """(encoded image bytes — JPEG, or PNG for lossless — , label) of sample ``i``."""
        if not 0 <= i < len(self):
            raise NotFound(f"sample {i} out of range [0, {len(self)}) in {self.path}")
        row = self._index[i]
        start = int(row["offset"])
        payload = self._shards[int(row["shard"])][start : start + int(row["length"])].tobytes()
        return self._headers[int(row["header"])] + payload, int(row["label"])

    def image(self, i: int) -> tuple[np.ndarray, int]:
        """Decoded sample ``i`` as (uint8 array, label)."""
        data, label = self.sample(i)
        return decode(data), label
