"""The GPU check: what a freshly rented GPU machine does with this code, in a few minutes,
before a long run is trusted to it.

    python bench/gpu_check.py --json gpu.json      # on a CUDA machine (about 4 min, one H100)
    python bench/gpu_check.py --device cpu         # the same code on a CPU, at tiny sizes

Every size has a default for the device (`--device cuda`: rs-152 at 256 px, 4,096 web
images; `cpu`: rs-mini at 32 px, 96 images), and every flag below overrides it. It prints
its estimate first, a line per step, the figures of each section as it ends (and writes
them to `--json` then), and removes what it wrote.

Sections (`--sections decode,label,train`), each importing only what it needs:
- decode (torch, torchvision, Pillow, numpy; fsspec, safetensors, tqdm through the model
  code): the device decoder's pixels against themselves, the same JPEG batch decoded
  `--repeats` times on each of two threads sharing the label stage's decoder while their
  side streams are busy (pixel-exact every time; and how many repeats differ when the
  drain before each decode is left out, the race it prevents), and
  JPEGs the device refuses although they are whole (a bad Huffman table, 12-bit
  precision, an unusual subsampling) beside cut ones, with the decode calls they cost;
  progressive against baseline JPEGs, img/s on the device and on one CPU core.
- label (also PyYAML; no Beam): web-variety shards written on every core
  (bench/corpus.WEB_MIX); the bare bf16 forward; the label stage's own per-shard code
  with CPU decoding and with the device path, their img/s over the bare forward, img/s
  per decode core, the share of time waiting for input, the top-1 agreement of the two
  paths on the same keys, and the GPU-hours 130M images would take at that rate.
- train (also timm, webdataset, braceexpand, tqdm, PyYAML): the trainer's step on
  synthetic pixels on the device (compiled too with `--compile-train`), with its peak
  memory and the synchronising calls CUDA counts in a step and its EMA update, and its epoch loop fed by the real loader from JPEG shards written on every
  core, with the share of time spent waiting for data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Sizes by device: a GPU check sized to finish in minutes on one card, and the same steps
# at tiny sizes on a CPU (a rehearsal before a GPU's minutes are spent).
DEFAULTS = {
    "cuda": {
        "model": "rs-152", "size": 256, "batch_size": 256, "images": 4096, "per_shard": 512,
        "sizes": "150-1000", "steps": 20, "repeats": 50, "threads": 2,
        "train_models": "rs-50:160,rs-152:256", "micro_batch": None,
    },
    "cpu": {
        "model": "rs-mini", "size": 32, "batch_size": 8, "images": 96, "per_shard": 32,
        "sizes": "40-160", "steps": 2, "repeats": 5, "threads": 2,
        "train_models": "rs-mini:32", "micro_batch": 8,
    },
}  # fmt: skip
# Rough rates for the estimate printed first: web images written per core and second, and
# rs-152 bf16 forward img/s at 256 px by card (public figures; the check measures its own).
WRITE_PER_CORE = 25.0
FORWARD_IMG_S = {"H200": 3000.0, "H100": 2600.0, "A100": 1400.0, "L4": 450.0}
STARTED = time.perf_counter()


def say(text: str) -> None:
    """A progress line, with the seconds since the start."""
    sys.stderr.write(f"[gpu_check {time.perf_counter() - STARTED:6.1f} s] {text}\n")
    sys.stderr.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DevicePeak:
    """The device memory's peak over a stretch of work, MiB: counted afresh by `start`, read
    by `mib`; None on the CPU, whose allocator keeps no peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def mib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.cuda else None


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- corpora, written on every core -----------------------------------------------------


def _write_web_shard(root: Path, per_shard: int, sizes: tuple[int, int], index: int) -> str:
    from bench.corpus import web_samples
    from bench.fixtures import write_shard

    url = str(root / f"web-{index:06d}.tar")
    samples = web_samples(per_shard, seed=index, sizes=sizes)
    for sample in samples:
        sample["__key__"] = f"s{index:06d}-{sample['__key__']}"
    write_shard(url, samples)
    return url


def web_corpus(root: Path, images: int, per_shard: int, sizes: tuple[int, int]) -> list[str]:
    """Shards of web variety, one process per core (a shard per task)."""
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(cores()) as pool:
        work = partial(_write_web_shard, root, per_shard, sizes)
        return list(pool.map(work, range(max(1, images // per_shard))))


def _write_photo_shard(root: Path, per_shard: int, index: int) -> str:
    from bench.corpus import photo_jpeg
    from bench.fixtures import write_shard

    rng = __import__("numpy").random.default_rng(index)
    url = str(root / f"photos-{index:06d}.tar")
    samples = [
        {"__key__": f"p{index:06d}-{i:05d}", "jpg": photo_jpeg(rng, 384),
         "cls": str(int(rng.integers(1000))).encode()}
        for i in range(per_shard)
    ]  # fmt: skip
    write_shard(url, samples)
    return url


def photo_corpus(root: Path, images: int, per_shard: int) -> list[str]:
    """ImageNet-like training shards (384 px photos with a class), one process per core."""
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(cores()) as pool:
        work = partial(_write_photo_shard, root, per_shard)
        return list(pool.map(work, range(max(1, -(-images // per_shard)))))


# --- decode ------------------------------------------------------------------------------


def refused_jpegs(rng) -> dict[str, bytes]:
    """Whole JPEGs (ending in their end-of-image marker) that decoders refuse, and a cut
    one: what sends a device batch to bisection, beside what never reaches the device."""
    from bench.corpus import web_image

    def jpeg() -> bytearray:
        return bytearray(web_image(rng, "baseline", 320, 240)[1])

    huffman = jpeg()
    huffman[huffman.find(b"\xff\xc4") + 5] = 0xFF  # code counts that overflow the table
    twelve = jpeg()
    twelve[twelve.find(b"\xff\xc0") + 4] = 12  # SOF0's sample precision: 12 bits
    sampling = jpeg()
    sof = sampling.find(b"\xff\xc0")
    sampling[sof + 11] = 0x31  # the luma's sampling factors: 3 x 1
    return {
        "bad_huffman_table": bytes(huffman),
        "twelve_bit": bytes(twelve),
        "unusual_subsampling": bytes(sampling),
        "cut_short": web_image(rng, "undecodable", 320, 240)[1],
    }


def decode_section(args: argparse.Namespace, work: Path) -> dict:
    import numpy as np

    from bench.corpus import web_image
    from rs_pseudolabel.data.decode import EvalCrop
    from rs_pseudolabel.data.device import DeviceFeed
    from rs_pseudolabel.pipeline.label_decode import (
        CpuDecoder,
        DeviceDecoder,
        InputTally,
        device_takes,
    )

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    crop = EvalCrop(args.size + 32, args.size, "bicubic")
    feed = DeviceFeed(device)
    decoder = DeviceDecoder(crop, device, CpuDecoder(crop, 0, feed))
    low, high = (int(v) for v in args.sizes.split("-"))
    batch = [
        (f"k{i:03d}", web_image(rng, "baseline", *(int(v) for v in rng.integers(low, high, 2)))[1], b"")
        for i in range(args.batch_size)
    ]  # fmt: skip
    chunks = [
        batch[i : i + max(1, len(batch) // 4)]
        for i in range(0, len(batch), max(1, len(batch) // 4))
    ]

    def decode_all() -> list[torch.Tensor]:
        """The batch through the decoder in four chunks, each chunk's pixels read on the side
        stream behind a long kernel and then freed, as the label stage's input thread does."""
        copies = []
        with feed.context(), torch.inference_mode():
            side = 1024 if device.type == "cuda" else 32  # milliseconds of work either way
            busy = torch.randn(side, side, device=device)
            for decoded in decoder(iter(chunks), InputTally()):
                for _ in range(8):  # keeps the side stream busy while the next chunk decodes
                    busy = busy @ busy / side
                copies.append(decoded.pixels.clone())
                del decoded
        _sync(device)
        return [c.cpu() for c in copies]

    def same(repeats: int) -> list[bool]:
        return [
            all(torch.equal(a, b) for a, b in zip(decode_all(), reference, strict=True))
            for _ in range(repeats)
        ]

    def on_two_threads() -> list[bool]:
        """Two threads share the decoder and its feed, as a label worker's threads share
        their teacher: each has its own side stream."""
        with ThreadPoolExecutor(2) as pool:
            return [ok for run in pool.map(same, [args.repeats] * 2) for ok in run]

    say(f"decode: the same {len(batch)} JPEGs, {args.repeats} times on each of two threads")
    reference = decode_all()
    exact = on_two_threads()
    drain = feed.drain
    feed.drain = lambda: None  # the race the drain prevents: how often it shows on this card
    try:
        undrained = on_two_threads()
    finally:
        feed.drain = drain

    say("decode: JPEGs the device refuses although whole, beside a cut one")
    refused = {}
    for kind, data in refused_jpegs(rng).items():
        chunk = [(f"good{i}", d, b"") for i, (_, d, _) in enumerate(batch[:15])]
        chunk.insert(7, (kind, data, b""))
        tally = InputTally()
        with feed.context(), torch.inference_mode():
            (decoded,) = list(decoder(iter([chunk]), tally))
        refused[kind] = {
            "offered_to_device": device_takes(data),
            "decode_calls": tally.decode_calls,
            "on_device": tally.on_device,
            "on_cpu": tally.on_cpu,
            "outcome": dict(decoded.drops).get(kind, "decoded"),
        }
    say("decode: progressive against baseline JPEGs, on the device and on one CPU core")
    speeds = {}
    for kind in ("baseline", "progressive"):
        jpegs = [web_image(rng, kind, 640, 480)[1] for _ in range(args.batch_size)]
        with feed.context(), torch.inference_mode():
            decoder._decode(jpegs[:2], InputTally())  # warm-up
            _sync(device)
            tick = time.perf_counter()
            decoder._decode(jpegs, InputTally())
            _sync(device)
        speeds[f"{kind}_device_img_s"] = images_per_s(len(jpegs), time.perf_counter() - tick)
        tick = time.perf_counter()
        decoder.cpu.work(jpegs)
        speeds[f"{kind}_cpu_core_img_s"] = images_per_s(len(jpegs), time.perf_counter() - tick)
    # The device takes progressive JPEGs (the default) while it decodes them faster than the
    # CPU cores that would take them instead; this figure is what decides it on a card.
    speeds["progressive_device_over_all_cores"] = round(
        speeds["progressive_device_img_s"] / (speeds["progressive_cpu_core_img_s"] * cores()), 2
    )
    return {
        "progressive_640x480": speeds,
        "repeat_decodes_pixel_exact": f"{sum(exact)}/{len(exact)}",
        "repeats_differing_without_the_drain": f"{len(undrained) - sum(undrained)}/{len(undrained)}",
        "refused_jpegs": refused,
    }


# --- label -------------------------------------------------------------------------------


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


def label_rate(teacher, urls: list[str], out: Path, batch: int, threads: int) -> dict:
    """The label stage's per-shard work over all shards on `threads` threads sharing the
    teacher (one forward pass in flight on a GPU, as a worker runs), after one warm-up shard."""
    from rs_pseudolabel.pipeline.label_shard import forward_slot, label_shard

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
    worker = sum(r.seconds for r in reports)
    return {
        "img_s": images_per_s(sum(r.samples_out for r in reports), seconds),
        "images": sum(r.samples_out for r in reports),
        "dropped": sum(len(r.drops) for r in reports),
        "stall_share": round(sum(r.input_wait_seconds for r in reports) / worker, 3),
        "on_device": sum(r.on_device for r in reports),
        "on_cpu": sum(r.on_cpu for r in reports),
        "decode_calls": sum(r.decode_calls for r in reports),
    }


def images_per_s(images: int, seconds: float) -> float:
    return round(images / max(seconds, 1e-9), 1)


def top1_of(out: Path) -> dict[str, int]:
    from rs_pseudolabel.data.read import iter_samples
    from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo

    shards = [str(p) for p in sorted(out.glob("s*.tar"))]
    return {
        s["__key__"]: decode_pseudo(s["__key__"], s[PSEUDO_EXT]).top1
        for s in iter_samples(shards, lambda drop: None)
        if PSEUDO_EXT in s
    }


def label_section(args: argparse.Namespace, work: Path) -> dict:
    from rs_pseudolabel.pipeline.label_shard import Teacher
    from rs_pseudolabel.teachers import create_model, export_run

    device = torch.device(args.device)
    low, high = (int(v) for v in args.sizes.split("-"))
    say(f"label: writing {args.images} web images on {cores()} cores")
    started = time.perf_counter()
    urls = web_corpus(work / "corpus", args.images, args.per_shard, (low, high))
    figures: dict = {"corpus_seconds": round(time.perf_counter() - started, 1)}

    torch.manual_seed(0)
    run = work / "teacher"
    export_run(str(run), create_model(args.model, num_classes=1000).eval(), args.model, None)
    meta = json.loads((run / "model.json").read_text())
    meta.update(eval_size=args.size, crop_pct=args.size / (args.size + 32))
    (run / "model.json").write_text(json.dumps(meta))

    teachers = {
        decode: Teacher.load(str(run), None, args.device, decode=decode, processes=args.processes)
        for decode in ("cpu", "device")
    }
    say(f"label: the bare forward of {args.model} at {args.size} px, batch {args.batch_size}")
    bare = bare_forward(
        teachers["cpu"].predictor.body, device, args.batch_size, args.size, args.steps
    )
    figures["bare_forward_img_s"] = round(bare, 1)
    for decode, teacher in teachers.items():
        say(f"label: {len(urls)} shards with {decode} decoding")
        rate = label_rate(teacher, urls, work / f"labels-{decode}", args.batch_size, args.threads)
        figures[f"label_{decode}_decode"] = {
            **rate,
            "over_bare": round(rate["img_s"] / bare, 3),
            "img_s_per_decode_core": round(rate["img_s"] / max(1, args.processes), 1),
        }
    cpu, dev = top1_of(work / "labels-cpu"), top1_of(work / "labels-device")
    common = set(cpu) & set(dev)
    figures["top1_agreement_cpu_vs_device"] = round(
        sum(cpu[k] == dev[k] for k in common) / max(1, len(common)), 4
    )
    figures["keys_compared"] = len(common)
    best = max(figures[f"label_{d}_decode"]["img_s"] for d in teachers)
    figures["gpu_hours_for_130M_images"] = round(130e6 / best / 3600, 1)
    return figures


# --- train -------------------------------------------------------------------------------


def _student(name: str, size: int, device: torch.device, compile: bool):
    """A student as the trainer builds it (the table's dropout and stochastic depth), its
    EMA, optimizer, recipe (ImageNet's, at `size` px) and normaliser."""
    from rs_pseudolabel.data.device import Normalizer, memory_format
    from rs_pseudolabel.students.config import resolve_recipe
    from rs_pseudolabel.students.ema import ModelEma
    from rs_pseudolabel.students.train import param_groups
    from rs_pseudolabel.teachers import create_model, get_config

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
    normalised on the device, bf16 autocast, channels-last, backward, SGD, EMA) on one
    micro-batch of random pixels already on the device, after warm-up steps."""
    from rs_pseudolabel.students.train import micro_splits, train_step

    model, ema, optimizer, recipe, normal = _student(name, size, device, compile)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (micro, size, size, 3), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (micro,), generator=gen)
    parts, splits = (
        [(images.to(device), labels.to(device), None, None)],
        micro_splits(micro, 0, None),
    )
    model.train()
    for _ in range(3):
        train_step(model, optimizer, parts, splits, recipe, normal)
        ema.update_parameters(model)
    _sync(device)
    peak = DevicePeak(device)
    peak.start()
    tick = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, parts, splits, recipe, normal)
        ema.update_parameters(model)
    _sync(device)
    seconds = time.perf_counter() - tick
    return {
        "img_s": images_per_s(micro * steps, seconds),
        "peak_mib": peak.mib(),  # over the timed steps
        "host_syncs_per_step": host_syncs(
            lambda: (train_step(model, optimizer, parts, splits, recipe, normal),
                     ema.update_parameters(model)),
            device,
        ),
    }  # fmt: skip


def host_syncs(step, device: torch.device) -> int | None:
    """The synchronising calls CUDA reports in one `step` (every one, also those no count on
    the CPU sees: a nonzero, a boolean mask, an unpinned copy); None off CUDA."""
    import warnings

    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            _sync(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def loader_step_rate(
    name: str, size: int, micro: int, device: torch.device, steps: int, workers: int, urls
) -> dict:
    """The trainer's epoch loop (`train_one_epoch`) fed by the real loader from JPEG shards:
    the ImageNet recipe's input noise (RandAugment on) in `workers` loader processes, pinned
    uint8 micro-batches copied ahead on a side stream; img/s and the share of time the loop
    waited for data, after a warm-up epoch of a few steps."""
    from rs_pseudolabel.data.device import DeviceFeed
    from rs_pseudolabel.students.data import LabeledDecoder, train_loader
    from rs_pseudolabel.students.presets import train_preset
    from rs_pseudolabel.students.train import (
        lr_schedule,
        micro_splits,
        mixed_parts,
        on_device,
        train_one_epoch,
    )
    from rs_pseudolabel.teachers import get_config

    model, ema, optimizer, recipe, normal = _student(name, size, device, False)
    feed = DeviceFeed(device)
    loader = train_loader(
        urls, LabeledDecoder(train_preset(get_config(name), recipe), 1000), [micro],
        rank=0, world=1, first_epoch=0, seed=0, workers=workers, shuffle_buffer=256,
        pin_memory=feed.pin_memory,
    )  # fmt: skip
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
    from rs_pseudolabel.teachers import get_config

    device = torch.device(args.device)
    figures: dict = {}
    for spec in args.train_models.split(","):
        name, size = spec.split(":")
        size = int(size)
        micro = args.micro_batch or get_config(name).micro_batch
        images = micro * (args.steps + max(2, args.train_workers) + 1)
        say(f"train: writing {images} training JPEGs for {name} on {cores()} cores")
        started = time.perf_counter()
        urls = photo_corpus(work / f"train-{name}", images, max(micro, 64))
        found: dict = {
            "micro_batch": micro,
            "corpus_seconds": round(time.perf_counter() - started, 1),
        }
        say(f"train: {name} at {size} px, {args.steps} steps of {micro} synthetic images")
        found["synthetic_eager"] = synthetic_step_rate(name, size, micro, device, args.steps, False)
        if args.compile_train:
            say(f"train: {name} compiled (the first steps compile)")
            started = time.perf_counter()
            found["synthetic_compiled"] = synthetic_step_rate(
                name, size, micro, device, args.steps, True
            )
            found["compile_seconds"] = round(time.perf_counter() - started, 1)
        say(f"train: {name} fed by the loader ({args.train_workers} workers)")
        loader = loader_step_rate(name, size, micro, device, args.steps, args.train_workers, urls)
        loader["over_synthetic"] = round(loader["img_s"] / found["synthetic_eager"]["img_s"], 3)
        loader["img_s_per_worker"] = round(loader["img_s"] / args.train_workers, 1)
        found["loader"] = loader
        figures[f"{name}@{size}"] = found
    return figures


# --- the run -----------------------------------------------------------------------------

SECTIONS = {"decode": decode_section, "label": label_section, "train": train_section}


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine(device: torch.device) -> dict:
    import torchvision

    on_cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu",
        "driver": _driver() if on_cuda else None,
        "cores": cores(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def estimate_minutes(args: argparse.Namespace, card: str) -> float:
    """A rough estimate of the run: writing the corpora, two label passes, the training
    section's steps; the rates above, scaled from rs-152 at 256 px by pixels."""
    forward = next((rate for name, rate in FORWARD_IMG_S.items() if name in card), 600.0)
    if args.device.startswith("cpu"):
        forward = 200.0
    forward *= (256 / args.size) ** 2
    seconds = 0.0
    if "label" in args.sections:
        seconds += args.images / (WRITE_PER_CORE * cores()) + 2 * args.images / forward + 20
    if "decode" in args.sections:
        seconds += 2 * args.repeats * args.batch_size / forward + 10
    if "train" in args.sections:
        seconds += (
            len(args.train_models.split(","))
            * (60 + (args.steps + 16) * 464 / (forward / 3) + (240 if args.compile_train else 0))
            if not args.device.startswith("cpu")
            else 30
        )
    return seconds / 60


def write_json(path: str | None, figures: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(figures, indent=1) + "\n")
        tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="decode,label,train")
    parser.add_argument("--model", help="teacher (rs-152 on CUDA, rs-mini on CPU)")
    parser.add_argument("--size", type=int, help="eval resolution, px (256; CPU 32)")
    parser.add_argument("--batch-size", type=int, help="label batch (256; CPU 8)")
    parser.add_argument("--images", type=int, help="web images to label (4096; CPU 96)")
    parser.add_argument("--per-shard", type=int, help="images per shard (512; CPU 32)")
    parser.add_argument("--sizes", help="web image sides, px (150-1000; CPU 40-160)")
    parser.add_argument("--processes", type=int, default=cores(), help="CPU decode processes")
    parser.add_argument("--threads", type=int, help="label worker threads (2)")
    parser.add_argument("--steps", type=int, help="timed steps (20; CPU 2)")
    parser.add_argument("--repeats", type=int, help="repeat decodes of one batch (50; CPU 5)")
    parser.add_argument("--train-models", help="students, NAME:PX,... (rs-50:160,rs-152:256)")
    parser.add_argument("--micro-batch", type=int, help="training images per step (the table's)")
    parser.add_argument("--train-workers", type=int, default=cores(), help="loader processes")
    parser.add_argument("--compile-train", action="store_true", help="also time it compiled")
    parser.add_argument("--json", help="write the figures here, after each section")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[torch.device(args.device).type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections takes {', '.join(SECTIONS)}, not {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    figures: dict = {
        **machine(device),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    say(
        f"{figures['device']}, {cores()} cores: sections {args.sections}, "
        f"estimated {estimate_minutes(args, figures['device']):.0f} min"
    )
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for name in args.sections.split(","):
            started = time.perf_counter()
            figures[name] = SECTIONS[name](args, work)
            figures[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps({name: figures[name]}, indent=1), flush=True)
            write_json(args.json, figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.perf_counter() - STARTED:.0f} s")


if __name__ == "__main__":
    main()
