"""One rs-50 step at 128 px on 64 images in micro-batches of argv[1] (0: whole); prints how
much the step raised the process's peak resident memory, KiB. A process of its own for each
size, so that one peak does not hide the other."""

import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.batches

from rs_pseudolabel.data.device import Normalizer  # noqa: E402
from rs_pseudolabel.students.config import Recipe  # noqa: E402
from rs_pseudolabel.students.train import train_step  # noqa: E402
from rs_pseudolabel.teachers import create_model  # noqa: E402
from tests.batches import split_batch  # noqa: E402

torch.manual_seed(0)
model = create_model("rs-50", num_classes=100).train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (64, 128, 128, 3), generator=gen, dtype=torch.uint8)
batch = (images, torch.randint(0, 100, (64,)), None, None)
normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parts, splits = split_batch(batch, int(sys.argv[1]))
train_step(model, optimizer, parts, splits, Recipe(model="rs-50"), normal)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
