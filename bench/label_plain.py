"""The baseline `pipeline label` is measured against: one process, one plain loop doing the
same work (read the shards, decode, eval transform, forward, top-k), nothing else."""

from __future__ import annotations

import argparse
import io
import json
import time

import torch
from PIL import Image
from tar_batches import jpeg_batches  # a sibling: run as python bench/label_plain.py

from rs_pseudolabel.data.device import normalize
from rs_pseudolabel.teachers import Predictor, load_teacher
from rs_pseudolabel.teachers.inference import eval_pixels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--weights")
    parser.add_argument("--input", required=True, help="folder of .tar shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--timing", help="write the steady state's window here, as JSON")
    args = parser.parse_args()

    model, info = load_teacher(args.teacher, args.weights)
    predictor, pixels = Predictor(model), eval_pixels(info)
    count, forwards = 0, []  # (wall clock at the end of each forward, images so far)
    for images in jpeg_batches(args.input, args.batch_size):
        batch = [
            normalize(pixels(Image.open(io.BytesIO(b)).convert("RGB")), info.mean, info.std)
            for b in images
        ]
        probs, _ = predictor.predict(torch.stack(batch))
        probs.topk(args.topk, dim=1)
        count += len(batch)
        forwards.append((time.time(), count))
    print(f"labeled {count}")
    if args.timing:
        with open(args.timing, "w") as f:
            json.dump({"first_forward": forwards[0], "last_forward": forwards[-1]}, f)


if __name__ == "__main__":
    main()
