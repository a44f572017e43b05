"""The GPU check: the label stage on a GPU against the bare forward pass, and the student's
training step fed by synthetic tensors and by the real loader, in one call.

    python bench/gpu_check.py --json gpu.json        # on a CUDA machine: rs-152 at 256 px
    python bench/gpu_check.py --device cpu --model rs-mini --size 32 --images 48 \\
        --sizes 40-120 --batch-size 8 --steps 2      # the same code on a CPU, at tiny sizes

It needs PyTorch, torchvision, Pillow, numpy, fsspec and safetensors, and no Beam: it runs
`pipeline.label_shard.label_shard`, the per-shard work of `pipeline label`, directly; the
training section also timm, webdataset, tqdm and PyYAML.

1. writes shards of web variety on the spot, on every core (sizes 150-1,000 px, about 12%
   progressive and 4% CMYK JPEGs, 10% PNG/WebP/GIF, 2% undecodable: bench/corpus.WEB_MIX);
2. (a) times the bare forward: batch x 3 x size x size, bf16 autocast, channels-last, CUDA
   synchronised after a warm-up, eager and through torch.compile;
3. (b) times the label stage's own per-shard code end to end (read, hash, decode, eval crop,
   forward, top-k, sidecar written) on `--threads` worker threads sharing one teacher, with
   CPU decoding in N processes and with the device path (nvJPEG on CUDA);
4. prints img/s of each, (b)/(a), img/s per decode core, the share of time the forward pass
   waited for input, the card, the driver and the core count, and writes them as JSON;
5. training (rs-50 at 160 px and rs-152 at 256, bf16, channels-last, at the table's
   micro-batch): img/s and peak GPU memory of the trainer's step on synthetic uint8 tensors
   on the device, eager and compiled, and of its epoch loop fed by the real loader from JPEG
   shards (RandAugment on, the machine's cores as workers), with the data-wait share.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import web_samples  # noqa: E402
from bench.corpus import write_corpus as photo_corpus  # noqa: E402
from data.write import write_shard  # noqa: E402
from pipeline.label_decode import default_processes  # noqa: E402
from pipeline.label_shard import Teacher, forward_slot, label_shard  # noqa: E402
from students.config import resolve_recipe  # noqa: E402
from students.data import LabeledDecoder, train_loader  # noqa: E402
from students.ema import ModelEma  # noqa: E402
from students.presets import train_preset  # noqa: E402
from students.train import (  # noqa: E402
    lr_schedule,
    micro_splits,
    mixed_parts,
    on_device,
    param_groups,
    split_batch,
    train_one_epoch,
    train_step,
)
from teachers import create_model, export_run, get_config  # noqa: E402
from teachers.inference import DeviceFeed, Normalizer, memory_format  # noqa: E402


def _write_shard(root: Path, per_shard: int, sizes: tuple[int, int], index: int) -> str:
    url = str(root / f"web-{index:06d}.tar")
    samples = web_samples(per_shard, seed=index, sizes=sizes)
    for sample in samples:
        sample["__key__"] = f"s{index:06d}-{sample['__key__']}"
    write_shard(url, samples)
    return url


def write_corpus(root: Path, images: int, per_shard: int, sizes: tuple[int, int]) -> list[str]:
    """Shards of web variety, one process per core (a shard per task)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = max(1, images // per_shard)
    with ProcessPoolExecutor(default_processes()) as pool:
        return list(pool.map(partial(_write_shard, root, per_shard, sizes), range(shards)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(body, device: torch.device, batch: int, size: int, steps: int) -> float:
    """Images/s of the forward pass alone, on a channels-last batch already on the device,
    in the precision the label stage runs it in; the device is synchronised before and after
    the timed steps, so the clock holds all their work."""
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    with (
        torch.inference_mode(),
        torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for _ in range(3):
            body(x)
        _sync(device)
        tick = time.perf_counter()
        for _ in range(steps):
            body(x)
        _sync(device)
        seconds = time.perf_counter() - tick
    return batch * steps / seconds


def label_rate(
    teacher: Teacher, urls: list[str], out: Path, batch: int, threads: int
) -> dict[str, float]:
    """The label stage's per-shard work over all shards on `threads` threads sharing the
    teacher (one forward pass in flight on a GPU, as a worker runs), after one warm-up shard."""
    slot = forward_slot(str(teacher.device), None)
    label_shard(urls[0], "warm.tar", str(out / "warm"), teacher, batch, 16, False, slot)
    _sync(teacher.device)
    tick = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        reports = list(
            pool.map(
                lambda iu: label_shard(
                    iu[1], f"s{iu[0]:06d}.tar", str(out), teacher, batch, 16, False, slot
                ),
                enumerate(urls),
            )
        )
    _sync(teacher.device)
    seconds = time.perf_counter() - tick
    images = sum(r.samples_out for r in reports)
    worker = sum(r.seconds for r in reports)
    return {
        "img_s": images / seconds,
        "images": images,
        "dropped": sum(len(r.drops) for r in reports),
        "stall_share": sum(r.input_wait_seconds for r in reports) / worker,
        "on_device": sum(r.on_device for r in reports),
        "on_cpu": sum(r.on_cpu for r in reports),
    }


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine(device: torch.device) -> dict:
    import torchvision

    on_cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu",
        "driver": _driver() if on_cuda else None,
        "cores": default_processes(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def label_section(args: argparse.Namespace, work: Path) -> dict:
    device = torch.device(args.device)
    low, high = (int(v) for v in args.sizes.split("-"))
    started = time.perf_counter()
    urls = write_corpus(work / "corpus", args.images, args.per_shard, (low, high))
    figures: dict = {"corpus_seconds": round(time.perf_counter() - started, 1)}

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000).eval()
    run = work / "teacher"
    export_run(str(run), model, args.model, None)
    meta = json.loads((run / "model.json").read_text())
    meta.update(eval_size=args.size, crop_pct=args.size / (args.size + 32))
    (run / "model.json").write_text(json.dumps(meta))

    teacher = Teacher.load(str(run), None, args.device, decode="cpu", processes=args.processes)
    predictor = teacher.predictor
    bare = bare_forward(predictor.body, device, args.batch_size, args.size, args.steps)
    figures["bare_forward_img_s"] = round(bare, 1)
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(predictor.body)
        figures["bare_compiled_img_s"] = round(
            bare_forward(compiled, device, args.batch_size, args.size, args.steps), 1
        )
        figures["compile_seconds"] = round(time.perf_counter() - started, 1)
    for decode in ("cpu", "device"):
        if decode == "device":
            teacher = Teacher.load(
                str(run), None, args.device, decode="device", processes=args.processes
            )
        rate = label_rate(teacher, urls, work / f"labels-{decode}", args.batch_size, args.threads)
        figures[f"label_{decode}_decode"] = {
            **{k: round(v, 3) for k, v in rate.items()},
            "over_bare": round(rate["img_s"] / bare, 3),
            "img_s_per_decode_core": round(rate["img_s"] / max(1, args.processes), 1),
        }
    return figures


def _student(name: str, size: int, device: torch.device, compile: bool):
    """A student as the trainer builds it (the table's dropout and stochastic depth), its
    EMA, optimizer, recipe (ImageNet's, at `size` px) and normaliser."""
    table = get_config(name)
    recipe = resolve_recipe("imagenet", model=name, image_size=size)
    torch.manual_seed(0)
    model = create_model(
        name, 1000, drop_rate=recipe.dropout, drop_path_rate=recipe.stochastic_depth
    ).to(device, memory_format=memory_format(device))
    ema = ModelEma(model, recipe.ema_decay)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(param_groups(model, recipe.weight_decay), lr=0.01, momentum=0.9)
    return model, ema, optimizer, recipe, Normalizer(table.mean, table.std, device)


def synthetic_step_rate(
    name: str, size: int, micro: int, device: torch.device, steps: int, compile: bool
) -> dict:
    """Images/s and peak device memory of the trainer's step (`train_step`: uint8 images
    normalised on the device, bf16 autocast, channels-last, backward, SGD) on one micro-batch
    of random pixels already on the device, after warm-up steps (compilation among them)."""
    model, _, optimizer, recipe, normal = _student(name, size, device, compile)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (micro, size, size, 3), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (micro,), generator=gen)
    parts, splits = split_batch((images.to(device), labels.to(device), None, None), None)
    model.train()
    for _ in range(3):
        train_step(model, optimizer, parts, splits, recipe, normal)
    _sync(device)
    feed = DeviceFeed(device)
    feed.reset_peak()
    tick = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, parts, splits, recipe, normal)
    _sync(device)
    return {
        "img_s": round(micro * steps / (time.perf_counter() - tick), 1),
        "peak_mib": feed.peak_mib(),
    }


def loader_step_rate(
    name: str, size: int, micro: int, device: torch.device, steps: int, workers: int, urls
) -> dict:
    """The trainer's epoch loop (`train_one_epoch`) fed by the real loader from JPEG shards:
    the ImageNet recipe's input noise (RandAugment on) in `workers` loader processes, pinned
    uint8 micro-batches copied ahead on a side stream; img/s and the share of time the loop
    waited for data, after a warm-up epoch of a few steps."""
    model, ema, optimizer, recipe, normal = _student(name, size, device, False)
    feed = DeviceFeed(device)
    preset = train_preset(get_config(name), recipe)
    loader = train_loader(
        urls,
        LabeledDecoder(preset, 1000),
        [micro],
        rank=0,
        world=1,
        first_epoch=0,
        seed=0,
        workers=workers,
        shuffle_buffer=256,
        pin_memory=feed.pin_memory,
    )
    scheduler = lr_schedule(optimizer, warmup_steps=1, total_steps=10**6)
    parts = on_device(mixed_parts(loader, None), feed)
    epoch = partial(
        train_one_epoch, model, optimizer, scheduler, ema, parts,
        splits=micro_splits(micro, 0, None), recipe=recipe, normal=normal,
    )  # fmt: skip
    epoch(steps=max(2, workers))  # warm-up: the workers' start and first batches
    stats = epoch(steps=steps)
    return {"img_s": round(stats["images_per_s"], 1), "data_wait": round(stats["data_wait"], 3)}


def train_section(args: argparse.Namespace, work: Path) -> dict:
    device = torch.device(args.device)
    figures: dict = {}
    for spec in args.train_models.split(","):
        name, size = spec.split(":")
        size = int(size)
        micro = args.micro_batch or get_config(name).micro_batch
        images = micro * (args.steps + max(2, args.train_workers) + 1)
        started = time.perf_counter()
        urls = photo_corpus(
            str(work / f"train-{name}"), images, shard_size=max(micro, 64), size=384, classes=1000
        )
        found: dict = {
            "micro_batch": micro,
            "corpus_seconds": round(time.perf_counter() - started, 1),
        }
        found["synthetic_eager"] = synthetic_step_rate(name, size, micro, device, args.steps, False)
        if args.compile:
            started = time.perf_counter()
            found["synthetic_compiled"] = synthetic_step_rate(
                name, size, micro, device, args.steps, True
            )
            found["compile_seconds"] = round(time.perf_counter() - started, 1)
        found["loader"] = loader_step_rate(
            name, size, micro, device, args.steps, args.train_workers, urls
        )
        found["loader"]["over_synthetic"] = round(
            found["loader"]["img_s"] / found["synthetic_eager"]["img_s"], 3
        )
        found["loader"]["img_s_per_worker"] = round(
            found["loader"]["img_s"] / args.train_workers, 1
        )
        figures[f"{name}@{size}"] = found
    return figures


SECTIONS = {"label": label_section, "train": train_section}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="rs-152")
    parser.add_argument("--size", type=int, default=256, help="eval resolution (256)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--per-shard", type=int, default=512)
    parser.add_argument("--sizes", default="150-1000", help="web image sides, px (150-1000)")
    parser.add_argument("--processes", type=int, default=default_processes(), help="decode")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (2)")
    parser.add_argument("--steps", type=int, default=20, help="timed bare forward steps")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--train-models", default="rs-50:160,rs-152:256", help="students to train, NAME:PX"
    )
    parser.add_argument(
        "--micro-batch", type=int, help="images per training step (default: the table's)"
    )
    parser.add_argument(
        "--train-workers", type=int, default=default_processes(), help="loader processes"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="label,train")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    figures: dict = {
        **machine(device),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    for name in args.sections.split(","):
        started = time.perf_counter()
        figures[name] = SECTIONS[name](args, work)
        figures[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: figures[name]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
