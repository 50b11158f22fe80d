"""Host-to-device copies that do not stall the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory waits until the GPU has
finished everything queued before it: between training steps that idles the GPU while the
host prepares the next batch. Small per-batch tensors (token ids, packing offsets, row
indices) are built on the host and copied through pinned memory instead, which queues the
copy and returns at once.
"""

from __future__ import annotations

import torch
from jaxtyping import Shaped
from torch import Tensor


def to_device(tensor: Shaped[Tensor, "..."], device: str | torch.device) -> Shaped[Tensor, "..."]:
    """``tensor`` on ``device``; a host tensor bound for a GPU goes through pinned memory, without a sync."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
