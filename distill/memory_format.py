"""Channels-last (NHWC) storage for the frozen convolution weights of the networks a run holds.

Convolutions whose weight is stored channels-last run the NHWC kernels of cuDNN and oneDNN, which are faster for the
small channel counts of UNet and VAE blocks and need no layout conversion of the activations between them.

Only frozen weights are converted. A trainable weight stays contiguous: its optimizer moments, and the moments a
resumed run loads into the optimizer, are contiguous, and torch's fused AdamW indexes parameter, gradient and moments
as flat buffers, so a channels-last parameter beside contiguous moments would be updated at the wrong elements.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def frozen_weights_channels_last(networks: Iterable[torch.nn.Module | None]) -> int:
    """Store every frozen 4-D weight of ``networks`` channels-last, in place; returns how many tensors changed.

    Trainable parameters (``requires_grad``) and the buffers of the modules are left as they are.
    """
    done: set[int] = set()
    changed = 0
    for network in networks:
        if network is None:
            continue
        for param in network.parameters():
            if id(param) in done or param.requires_grad or param.dim() != 4:
                continue
            done.add(id(param))
            if param.is_contiguous(memory_format=torch.channels_last):
                continue
            param.data = param.data.contiguous(memory_format=torch.channels_last)
            changed += 1
    return changed
