"""The baseline `pipeline filter` is measured against: one process, one plain loop doing the
same work with the standard library's tarfile and the project's record codec and rules.

    read the sidecars -> per-class confidence histograms -> Noisy Student's rules ->
    read the sidecars again and walk the source shards -> check each kept image against its
    content hash -> write image + cls + pl copies through a shuffle buffer into shards
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rs_pseudolabel.data.records import content_hash, decode_pseudo, encode_pseudo  # noqa: E402
from rs_pseudolabel.pipeline.confidence import BINS, conf_bin  # noqa: E402
from rs_pseudolabel.pipeline.strategies import Threshold  # noqa: E402

BUFFER = 64


def sidecar_records(path: str):
    """(source shard, pseudo-label) of one sidecar, in order."""
    with tarfile.open(path) as tar:
        source = ""
        for member in tar:
            data = tar.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if ext == "json":
                source = json.loads(data).get("source", "")
            elif ext == "pl":
                yield source, decode_pseudo(key, data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True, help="label output folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--per-class", type=int, default=130_000)
    parser.add_argument("--max-copies", type=float, default=32)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()

    sidecars = sorted(glob.glob(f"{args.input}/*.tar"))
    hist: dict[int, np.ndarray] = {}
    for path in sidecars:
        for _, label in sidecar_records(path):
            hist.setdefault(label.top1, np.zeros(BINS, np.int64))[conf_bin(label.confidence)] += 1
    rules = Threshold(
        threshold=args.threshold,
        per_class=args.per_class,
        max_copies=args.max_copies,
        hard=False,
        balance="top",
    ).rules(hist)

    Path(args.output).mkdir(parents=True, exist_ok=True)
    rng, buffer, written, shard_index = random.Random(0), [], 0, 0
    out = tarfile.open(f"{args.output}/train-{shard_index:06d}.tar", "w")

    def put(sample: dict) -> None:
        nonlocal out, written, shard_index
        for ext in sorted(k for k in sample if k != "__key__"):
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size = len(sample[ext])
            out.addfile(info, io.BytesIO(sample[ext]))
        written += 1
        if written % args.shard_size == 0:
            out.close()
            shard_index += 1
            out = tarfile.open(f"{args.output}/train-{shard_index:06d}.tar", "w")

    for path in sidecars:
        source = None
        for shard, label in sidecar_records(path):
            rule = rules.get(label.top1)
            if rule is None or not rule.keeps(conf_bin(label.confidence), label.key):
                continue
            copies = rule.copies(label.key)
            if not copies:
                continue
            if shard != source:  # one forward walk per source shard
                source, tar = shard, tarfile.open(shard)
                members = iter(tar)
            member = next(m for m in members if m.name.startswith(label.key + "."))
            image = tar.extractfile(member).read()
            if content_hash(image) != label.content_hash:
                continue
            for copy in range(copies):
                buffer.append(
                    {
                        "__key__": f"{label.key}_c{copy:03d}",
                        member.name.split(".", 1)[1]: image,
                        "cls": str(label.top1).encode(),
                        "pl": encode_pseudo(label),
                    }
                )
                if len(buffer) > BUFFER:
                    put(buffer.pop(rng.randrange(len(buffer))))
    while buffer:
        put(buffer.pop(rng.randrange(len(buffer))))
    out.close()
    print(f"wrote {written} training samples")


if __name__ == "__main__":
    main()
