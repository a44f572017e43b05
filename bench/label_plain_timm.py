"""The baseline `pipeline label --teacher timm:NAME` is measured against: one process, a
plain loop written with timm's API alone (create_model, resolve_data_config,
create_transform) doing the same work: read the shards, decode, eval transform, forward,
softmax, top-k."""

from __future__ import annotations

import argparse
import io

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from tar_batches import jpeg_batches  # a sibling: run as python bench/label_plain_timm.py
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
    for images in jpeg_batches(args.input, args.batch_size):
        batch = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
        with torch.inference_mode():
            model(torch.stack(batch)).softmax(dim=1).topk(args.topk, dim=1)
        count += len(batch)
    print(f"labeled {count}")


if __name__ == "__main__":
    main()
