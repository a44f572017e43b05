"""The label stage on a GPU, against the bare forward pass: one script, a few minutes.

    python bench/gpu_label.py                        # on a CUDA machine: rs-152 at 256 px
    python bench/gpu_label.py --device cpu --model rs-mini --images 64 --size 96   # a check

It needs PyTorch, torchvision, Pillow, numpy, fsspec and safetensors, and no Beam: it runs
`pipeline.label_shard.label_shard`, the per-shard work of `pipeline label`, directly.

1. writes synthetic photo-like JPEG shards (web size, 500x375 at quality 90) on the spot;
2. (a) times the bare forward: batch x 3 x size x size, bf16 autocast, channels-last, CUDA
   events after a warm-up;
3. (b) times the label stage's own per-shard code end to end (read, decode, eval crop,
   forward, top-k, sidecar written) with CPU decoding in N processes and with GPU (nvJPEG)
   decoding;
4. prints img/s of each and (b)/(a), and writes them as JSON (`--json`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.write import write_shard  # noqa: E402
from pipeline.label_decode import default_processes  # noqa: E402
from pipeline.label_shard import Teacher, label_shard  # noqa: E402
from teachers import create_model, export_run  # noqa: E402


def web_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A photo-like JPEG: smooth colour fields, edges and noise, so decode costs are real."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(img, np.float64) + rng.normal(0, 10, (height, width, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.DETAIL)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_corpus(root: Path, images: int, per_shard: int, width: int, height: int) -> list[str]:
    rng = np.random.default_rng(0)
    pool = [web_jpeg(rng, width, height, 90) for _ in range(min(images, 64))]
    urls = []
    for start in range(0, images, per_shard):
        url = str(root / f"web-{start // per_shard:06d}.tar")
        count = min(per_shard, images - start)
        write_shard(
            url,
            [
                {"__key__": f"img{start + i:08d}", "jpg": pool[(start + i) % len(pool)]}
                for i in range(count)
            ],
        )
        urls.append(url)
    return urls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: torch.nn.Module, device: torch.device, batch: int, size: int, steps: int):
    """Images/s of the forward pass alone, on a batch already on the device."""
    on_cuda = device.type == "cuda"
    x = torch.randn(batch, 3, size, size, device=device)
    if on_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=on_cuda):
        for _ in range(3):
            model(x)
        _sync(device)
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                model(x)
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1000
        else:
            tick = time.perf_counter()
            for _ in range(steps):
                model(x)
            seconds = time.perf_counter() - tick
    return batch * steps / seconds


def label_rate(teacher: Teacher, urls: list[str], out: Path, batch: int) -> tuple[float, int]:
    """Images/s of the label stage's per-shard work over all shards (after one warm-up)."""
    label_shard(urls[0], "warm.tar", str(out / "warm"), teacher, batch, 16, False)
    _sync(teacher.predictor.device)
    tick = time.perf_counter()
    images = 0
    for i, url in enumerate(urls):
        images += label_shard(url, f"s{i:06d}.tar", str(out), teacher, batch, 16, False).samples_out
    _sync(teacher.predictor.device)
    return images / (time.perf_counter() - tick), images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="rs-152")
    parser.add_argument("--size", type=int, default=256, help="eval resolution (256)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--per-shard", type=int, default=1024)
    parser.add_argument("--web-size", default="500x375", help="JPEG width x height")
    parser.add_argument("--decode-processes", type=int, default=default_processes())
    parser.add_argument("--steps", type=int, default=20, help="timed bare forward steps")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu-label-"))
    width, height = (int(v) for v in args.web_size.split("x"))
    urls = write_corpus(work / "corpus", args.images, args.per_shard, width, height)

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000).eval()
    run = work / "teacher"
    export_run(str(run), model, args.model, None)
    meta = json.loads((run / "model.json").read_text())
    meta.update(eval_size=args.size, crop_pct=args.size / (args.size + 32))
    (run / "model.json").write_text(json.dumps(meta))

    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    bare = bare_forward(model, device, args.batch_size, args.size, args.steps)
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "size": args.size,
        "batch_size": args.batch_size,
        "images": args.images,
        "web_size": args.web_size,
        "bare_forward_img_s": round(bare, 1),
    }
    decoders = [("cpu", args.decode_processes)]
    if device.type == "cuda":
        decoders.append(("gpu", args.decode_processes))
    for decode, processes in decoders:
        teacher = Teacher.load(str(run), None, args.device, decode=decode, processes=processes)
        rate, images = label_rate(teacher, urls, work / f"labels-{decode}", args.batch_size)
        figures[f"label_{decode}_decode_img_s"] = round(rate, 1)
        figures[f"label_{decode}_decode_over_bare"] = round(rate / bare, 3)
        figures[f"label_{decode}_decode_images"] = images
    figures["decode_processes"] = args.decode_processes
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
