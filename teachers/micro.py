"""How many images of a model fit one forward and backward on a 40 GiB GPU, from activation
memory measured on the CPU: the table's `micro_batch` for the ResNet-RS rows
(bench/bench_micro.py wrote them) and, measured when first asked, for a timm row.

One training forward of 2 images at the train resolution under bf16 autocast, channels-last
(the GPU recipe's precision and layout): the bytes of every tensor the backward pass keeps
(autograd's saved-tensor hooks, each storage counted once), per image. A GPU step also
holds the fp32 weights, gradients, momentum and EMA (16 bytes a parameter) and about 4 GiB
besides (CUDA context, cuDNN workspaces, the allocator's slack); of what is left, 80% goes to
activations. The micro-batch is that over the bytes per image, rounded down to a multiple
of 8: an estimate, since cuDNN may keep other tensors than the CPU kernels do.
"""

from __future__ import annotations

import torch
from torch import nn

GPU_BYTES = 40 << 30
RESERVED = 4 << 30
ACTIVATION_SHARE = 0.8


def saved_bytes_per_image(model: nn.Module, size: int, images: int = 2) -> float:
    """Bytes the backward pass keeps per image of `size` px, for `model` in train mode."""
    model = model.train().to(memory_format=torch.channels_last)
    seen: set = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return tensor

    x = torch.randn(images, 3, size, size).contiguous(memory_format=torch.channels_last)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model(x)
    return total / images


def fits(params: int, per_image: float) -> int:
    """Images per micro-batch on a 40 GiB GPU for a model of `params` parameters."""
    free = ACTIVATION_SHARE * (GPU_BYTES - RESERVED - 16 * params)
    return max(8, int(free / per_image) // 8 * 8)


def measured_micro_batch(model: nn.Module, size: int) -> int:
    params = sum(p.numel() for p in model.parameters())
    return fits(params, saved_bytes_per_image(model, size))
