"""Image sources served like token sources: deterministic epochs, rank slices, decoded on the client."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import prepare_real_sources

from client import MixerClient
from client.image_batches import to_tensors
from mixer_contract.errors import InvalidInput
from mixer_service.engine.samples import sample_indices
from mixer_service.planner.fashion_mnist import load_fashion_mnist
from mixer_service.sources.image_source import ImageSource, prepare_image_source

N = 500


@pytest.fixture(scope="module")
def server_sources(tmp_path_factory):
    """Small token sources and the first N Fashion-MNIST test images as the image source "fmnist"."""
    root = prepare_real_sources(tmp_path_factory.mktemp("sources"), domain_docs=200, web_docs=5)
    images, labels = load_fashion_mnist("test")
    prepare_image_source(images[:N], labels[:N], root / "fmnist", qualities=50)
    return root


def test_image_batches_decode_to_the_stored_samples(server, server_sources):
    local = ImageSource.open(server_sources / "fmnist")
    with MixerClient(server.url) as client:
        batch = client.image_batch("fmnist", step=3, batch_size=50, seed=1)
    images, labels = to_tensors(batch)
    assert images.shape == (50, 28, 28) and images.dtype.is_floating_point is False
    for row, i in enumerate(batch.header["sample_ids"]):
        want, label = local.image(i)
        assert labels[row] == label
        np.testing.assert_array_equal(images[row].numpy(), want)


def test_every_sample_once_per_epoch_and_rank_slices_tile(server):
    with MixerClient(server.url) as client:
        epoch = [
            i for step in range(N // 50) for i in client.image_batch("fmnist", step, 50).header["sample_ids"]
        ]
        assert sorted(epoch) == list(range(N))
        whole = client.image_batch("fmnist", 12, 50).header["sample_ids"]
        parts = [client.image_batch("fmnist", 12, 50, rank=r, world=5).header["sample_ids"] for r in range(5)]
    assert sum(parts, []) == whole


def test_bad_image_requests_are_refused():
    with pytest.raises(InvalidInput, match="world"):
        sample_indices(10, "x", 0, 0, batch_size=8, world=3)
    with pytest.raises(InvalidInput, match="step"):
        sample_indices(10, "x", 0, -1, batch_size=8)


def test_unknown_image_source_is_404(server):
    import httpx

    r = httpx.get(f"{server.url}/v1/images/nope/batches/0", params={"batch_size": 4})
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
