"""Image sources: codec, exact byte accounting, reader, corruption, codec curve, Fashion-MNIST."""

import numpy as np
import pytest

from mixer_contract.errors import CorruptData, InvalidInput, NotFound
from mixer_contract.image_samples import decode
from mixer_service.planner.codec import CodecCurve, measure_codec_curve
from mixer_service.planner.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from mixer_service.planner.image_budget import EncodedSizes
from mixer_service.sources.image_codec import LOSSLESS, encode, split_header
from mixer_service.sources.image_source import ImageSource, prepare_image_source


def images(n: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.outer(np.hanning(28), np.hanning(28)) * 200
    return np.clip(base + rng.normal(0, 25, (n, 28, 28)), 0, 255).astype(np.uint8)


def test_lossless_round_trips_exactly_and_jpeg_approximately():
    img = images(1)[0]
    assert np.array_equal(decode(encode(img, LOSSLESS)), img)
    jpeg = decode(encode(img, 90))
    assert jpeg.shape == (28, 28) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - img).mean() < 12


def test_header_split_is_exact_and_shared_within_one_quality():
    a, b = images(2)
    for quality in (30, LOSSLESS):
        (ha, pa), (hb, _) = split_header(encode(a, quality)), split_header(encode(b, quality))
        assert ha + pa == encode(a, quality)
        assert ha == hb and len(ha) > 0
    assert split_header(encode(a, 30))[0] != split_header(encode(a, 31))[0]


def test_invalid_quality_is_rejected():
    with pytest.raises(InvalidInput, match="quality must be an integer"):
        encode(images(1)[0], 0)


def test_prepared_source_accounts_bytes_exactly_and_reads_back(tmp_path):
    imgs, labels = images(40), np.arange(40) % 10
    qualities = np.where(np.arange(40) % 3 == 0, LOSSLESS, 20 + np.arange(40) % 5)
    meta = prepare_image_source(imgs, labels, tmp_path / "src", qualities, shard_bytes=2000)
    stored = sum(p.stat().st_size for p in (tmp_path / "src").glob("*.bin"))
    assert meta.total_bytes == stored == EncodedSizes(imgs).total_bytes(qualities)
    assert len(list((tmp_path / "src").glob("shard-*.bin"))) > 1

    source = ImageSource.open(tmp_path / "src")
    assert len(source) == 40 and source.meta.num_samples == 40
    assert np.array_equal(source.meta.qualities, qualities)
    assert source.meta.total_bytes == meta.total_bytes
    for i in (0, 1, 39):
        data, label = source.sample(i)
        assert label == labels[i]
        assert data == encode(imgs[i], int(qualities[i]))  # header + payload reassemble the exact file
    assert np.array_equal(source.image(0)[0], imgs[0])  # sample 0 is lossless


def test_existing_output_and_bad_indices_are_refused(tmp_path):
    prepare_image_source(images(3), np.zeros(3), tmp_path / "src", 50)
    with pytest.raises(InvalidInput, match="already exists"):
        prepare_image_source(images(3), np.zeros(3), tmp_path / "src", 50)
    with pytest.raises(NotFound, match="out of range"):
        ImageSource.open(tmp_path / "src").sample(3)
    with pytest.raises(NotFound, match="no image source"):
        ImageSource.open(tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match="one label per image"):
        prepare_image_source(images(3), np.zeros(2), tmp_path / "other", 50)


def test_truncated_shard_is_reported_with_its_file(tmp_path):
    prepare_image_source(images(10), np.zeros(10), tmp_path / "src", 50)
    shard = tmp_path / "src" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(CorruptData, match="shard-00000.bin.*truncated"):
        ImageSource.open(tmp_path / "src")


def test_codec_curve_is_monotone_and_invertible():
    curve = measure_codec_curve(images(20), [1, 10, 30, 60, 90, 100])
    q = np.arange(1, 101)
    sizes = curve.bytes_at(q)
    assert np.all(np.diff(sizes) >= 0)
    assert curve.bytes_at(30) == pytest.approx(curve.mean_bytes[2])
    target = float(curve.bytes_at(45))
    assert curve.quality_for(target) == 45
    assert curve.quality_for(0.0) == 1
    with pytest.raises(InvalidInput, match="increasing qualities"):
        CodecCurve(np.array([50.0, 10.0]), np.array([100.0, 50.0]))


def have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except InvalidInput:
        return False
    return True


@pytest.mark.skipif(
    not have_fashion_mnist(), reason="Fashion-MNIST not fetched (scripts/fetch_fashion_mnist.sh)"
)
def test_fashion_mnist_prepares_into_a_jpeg_source(tmp_path):
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    meta = prepare_image_source(x[:200], y[:200], tmp_path / "fm", 50)
    assert 150 < meta.bytes_per_sample < 260  # JPEG q50 payload of 28×28 clothing, header stored once
    img, label = ImageSource.open(tmp_path / "fm").image(7)
    assert label == y[7] and np.abs(img.astype(int) - x[7]).mean() < 10
