"""The trainer's micro-batch per model: how many images a 40 GiB GPU holds in one forward and
backward at the model's train resolution, from activation memory measured on this CPU.

    python bench/bench_micro.py

For each ResNet-RS size, one training forward of 2 images at its train resolution under
bf16 autocast, channels-last (the GPU recipe's precision and layout, run on the CPU): the
bytes of every tensor the backward pass keeps (autograd's saved-tensor hooks, each storage
counted once) per image. A GPU step also holds the fp32 weights, gradients, momentum and
EMA (16 bytes a parameter) and about 4 GiB besides (CUDA context, cuDNN workspaces, the
allocator's slack); of what is left, 80% goes to activations (a backward pass holds a few
layers' transients beyond the saved tensors). The micro-batch is that over the bytes per
image, rounded down to a multiple of 8. These are estimates from CPU measurements: cuDNN
may keep other tensors than the CPU kernels do. The table's `micro_batch` column holds them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import append  # noqa: E402
from teachers import create_model, get_config  # noqa: E402

GPU_BYTES = 40 << 30
RESERVED = 4 << 30
ACTIVATION_SHARE = 0.8
PAPER = ("rs-50", "rs-101", "rs-152", "rs-200", "rs-270", "rs-350", "rs-420")


def saved_bytes_per_image(name: str, images: int = 2) -> float:
    size = get_config(name).train_size
    model = create_model(name, num_classes=1000).train().to(memory_format=torch.channels_last)
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


def fits(name: str, per_image: float) -> int:
    params = sum(p.numel() for p in create_model(name, num_classes=1000).parameters())
    free = ACTIVATION_SHARE * (GPU_BYTES - RESERVED - 16 * params)
    return max(8, int(free / per_image) // 8 * 8)


def main() -> None:
    rows = [
        "| model | train px | saved activations per image, MiB (bf16) | micro_batch for 40 GiB | in the table |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for name in PAPER:
        per_image = saved_bytes_per_image(name)
        micro = fits(name, per_image)
        figures[name] = {"mib_per_image": round(per_image / 2**20, 1), "micro_batch": micro}
        rows.append(
            f"| {name} | {get_config(name).train_size} | {per_image / 2**20:.1f} | {micro} | "
            f"{get_config(name).micro_batch} |"
        )
    append(
        "train: micro-batch per model for a 40 GiB GPU (activation memory measured on CPU)",
        "python bench/bench_micro.py",
        rows,
        "micro",
        figures,
    )


if __name__ == "__main__":
    main()
