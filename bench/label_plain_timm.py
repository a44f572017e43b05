"""The baseline `pipeline label --teacher timm:NAME` is measured against: one process, a
plain loop written with timm's API alone (create_model, resolve_data_config,
create_transform) doing the same work: read the shards, decode, eval transform, forward,
softmax, top-k."""

from __future__ import annotations

import argparse
import glob
import io
import tarfile

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="timm architecture name")
    parser.add_argument("--weights", required=True, help=".safetensors in timm's layout")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--input", required=True, help="folder of .tar shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--topk", type=int, default=16)
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    model.load_state_dict(load_file(args.weights))
    model.eval()
    transform = create_transform(**resolve_data_config(model=model))
    count = 0
    for path in sorted(glob.glob(f"{args.input}/*.tar")):
        with tarfile.open(path) as tar:
            images = [
                tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")
            ]
        for start in range(0, len(images), args.batch_size):
            batch = [
                transform(Image.open(io.BytesIO(b)).convert("RGB"))
                for b in images[start : start + args.batch_size]
            ]
            with torch.inference_mode():
                model(torch.stack(batch)).softmax(dim=1).topk(args.topk, dim=1)
            count += len(batch)
    print(f"labeled {count}")


if __name__ == "__main__":
    main()
