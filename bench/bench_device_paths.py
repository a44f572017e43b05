"""What the device paths cost in calls, counted on the CPU through the code a GPU runs:

1. host reads in the student's training step: every call that brings a tensor's value back
   to the host (on a GPU, a wait for the device to finish all it was given), counted per
   step by a TorchFunctionMode: `.item()`, `bool()`, `int()`, `float()`, `.tolist()`,
   `.numpy()` and a copy to the CPU. The step (`train_step`), the EMA update (`ModelEma`)
   and torch's `AveragedModel` with the same decay rule (what the EMA was before) apart;
   the epoch loop reads the losses every `SHOW_EVERY` steps for its bar, not counted here.
   Only explicit reads are seen here; the GPU check counts every synchronising call of a
   step on a GPU (CUDA's sync debug mode), a nonzero or an unpinned copy included;
2. the device decoder's calls for one chunk of n JPEGs of which one is refused (torchvision
   gives no partial result): the goal is at most 2 log2 n + 1.

    python bench/bench_device_paths.py     # rs-mini, 4 micro-batches a step; n = 256
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import append  # noqa: E402
from rs_pseudolabel.data.device import Normalizer  # noqa: E402
from rs_pseudolabel.students.config import resolve_recipe  # noqa: E402
from rs_pseudolabel.students.ema import ModelEma, decay_at  # noqa: E402
from rs_pseudolabel.students.train import micro_splits, param_groups, train_step  # noqa: E402
from rs_pseudolabel.teachers import create_model  # noqa: E402

READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host, by name: reads of a value,
    and copies to the CPU from another device (none where everything is on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_host = (
            name in ("to", "cpu")
            and source is not None
            and source.device.type != "cpu"
            and (name == "cpu" or any(str(a) == "cpu" for a in [*args[1:], *kwargs.values()]))
        )
        if name in READS or to_host:
            self.calls[name] += 1
        return func(*args, **kwargs)


def _old_update(averaged, current, num_averaged, decay):
    """The EMA's update as it was: the step read back from the counter tensor."""
    step = int(num_averaged) - 1
    torch._foreach_lerp_(averaged, current, 1.0 - decay_at(decay, step))


def measure(steps: int, micro: int) -> dict:
    torch.manual_seed(0)
    recipe = resolve_recipe(str(ROOT / "configs" / "digits.yaml"))
    model = create_model("rs-mini", 10)
    optimizer = torch.optim.SGD(param_groups(model, 4e-5), lr=0.1, momentum=0.9)
    normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    ema = ModelEma(model, 0.9999)
    old = AveragedModel(model, multi_avg_fn=partial(_old_update, decay=0.9999))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,), generator=gen)
    splits = micro_splits(16, 0, micro)
    parts = [(images[lab], labels[lab], None, None) for lab, _ in splits]
    counted = {"step": HostReads(), "ema": HostReads(), "averaged_model": HostReads()}
    model.train()
    for _ in range(steps):
        with counted["step"]:
            train_step(model, optimizer, parts, splits, recipe, normal)
        with counted["ema"]:
            ema.update_parameters(model)
        with counted["averaged_model"]:
            old.update_parameters(model)
    return {
        f"{name}_reads_per_step": round(sum(c.calls.values()) / steps, 2)
        for name, c in counted.items()
    } | {f"{name}_calls": dict(c.calls) for name, c in counted.items() if c.calls}


def decode_calls(n: int, refused_at: int) -> dict:
    """The device decoder over one chunk of n baseline JPEGs with a refused one at
    `refused_at` (a whole file with a Huffman table libjpeg-turbo and nvJPEG refuse)."""
    import numpy as np

    from bench.corpus import web_image
    from rs_pseudolabel.data.decode import EvalCrop
    from rs_pseudolabel.data.device import DeviceFeed
    from rs_pseudolabel.pipeline.label_decode import CpuDecoder, DeviceDecoder, InputTally

    rng = np.random.default_rng(0)
    jpegs = [web_image(rng, "baseline", 64 + i % 7, 48)[1] for i in range(n)]
    broken = bytearray(jpegs[refused_at])
    broken[broken.find(b"\xff\xc4") + 5] = 0xFF
    jpegs[refused_at] = bytes(broken)
    crop = EvalCrop(40, 32, "bicubic")
    feed = DeviceFeed(torch.device("cpu"))
    decoder = DeviceDecoder(crop, torch.device("cpu"), CpuDecoder(crop, 0, feed))
    tally = InputTally()
    list(decoder(iter([[(f"k{i}", d, b"") for i, d in enumerate(jpegs)]]), tally))
    return {"images": n, "decode_calls": tally.decode_calls, "on_cpu": tally.on_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4, help="images per micro-batch")
    parser.add_argument("--chunk", type=int, default=256, help="JPEGs in the decoded chunk")
    args = parser.parse_args()
    figures = measure(args.steps, args.micro_batch)
    figures["refused_jpeg"] = decode_calls(args.chunk, args.chunk // 3)
    figures["refused_jpeg"]["goal"] = 2 * int(np.ceil(np.log2(args.chunk))) + 1
    lines = [f"- {k}: {v}" for k, v in figures.items()]
    print("\n".join(lines))
    append(
        "Device paths in calls: host reads per training step, decoder calls for a refused JPEG",
        f"python bench/bench_device_paths.py --steps {args.steps} --micro-batch "
        f"{args.micro_batch} --chunk {args.chunk}",
        [
            "rs-mini, 16 images a step in micro-batches, on the CPU: every read counted here "
            "is a host sync on a GPU. The decoder's chunk has one whole JPEG it refuses.",
            "",
            *lines,
        ],
        "device_paths",
        figures,
    )


if __name__ == "__main__":
    main()
