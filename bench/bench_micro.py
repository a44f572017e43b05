"""The trainer's micro-batch per model: how many images a 40 GiB GPU holds in one forward and
backward at the model's train resolution, from activation memory measured on this CPU.

    python bench/bench_micro.py

For each ResNet-RS size, the measurement of `teachers.micro` (a training forward of 2 images
at its train resolution under bf16 autocast, channels-last, on the CPU; the bytes autograd
keeps per image; 80% of a 40 GiB GPU less the weights' state and 4 GiB). The table's
`micro_batch` column holds them; timm rows measure theirs the same way when first asked.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import append  # noqa: E402
from rs_pseudolabel.teachers import create_model, get_config  # noqa: E402
from rs_pseudolabel.teachers.micro import fits, saved_bytes_per_image  # noqa: E402

PAPER = ("rs-50", "rs-101", "rs-152", "rs-200", "rs-270", "rs-350", "rs-420")


def main() -> None:
    rows = [
        "| model | train px | saved activations per image, MiB (bf16) | micro_batch for 40 GiB | in the table |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for name in PAPER:
        model = create_model(name, num_classes=1000)
        per_image = saved_bytes_per_image(model, get_config(name).train_size)
        micro = fits(sum(p.numel() for p in model.parameters()), per_image)
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
