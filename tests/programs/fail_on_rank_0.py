"""The trainer's command under torchrun with a bug put into rank 0's first step (not a
user's mistake): what tests/test_ddp.py runs to see the job end with rank 0's traceback."""

import os
import sys

from rs_pseudolabel.pipeline.cli import main
from rs_pseudolabel.students import train

real = train.train_step


def train_step(*args, **kwargs):
    if os.environ["RANK"] == "0":
        raise RuntimeError("an unexpected failure on rank 0")
    return real(*args, **kwargs)


train.train_step = train_step
sys.exit(main(sys.argv[1:]))
