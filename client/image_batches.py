"""Decode image batches served by image sources into tensors."""

from __future__ import annotations

import numpy as np
import torch

from mixer_contract.image_samples import decode
from mixer_contract.wire import WireSamples


def to_tensors(batch: WireSamples) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [b, H, W(, C)], int64 labels [b])."""
    images = np.stack([decode(sample) for sample in batch.samples])
    return torch.from_numpy(images), torch.from_numpy(batch.labels)
