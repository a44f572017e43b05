"""The student's loaders: webdataset stages joined in one visible chain per stream.

Training streams are infinite (resampled shards), so an epoch is a number of steps; each
epoch's stream starts afresh from (seed, epoch, rank) in worker processes that live for the
whole run: the data a rank sees in epoch e is the same whether or not the run was
interrupted before it. The evaluation stream reads every sample
once. Both split shards by node (disjoint across ranks) and then by loader worker.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from webdataset.tariterators import base_plus_ext
from webdataset.utils import make_seed

from rs_pseudolabel.data.decode import IMAGE_EXTS, decode_image, find_image, no_image_detail
from rs_pseudolabel.data.errors import USER_ERRORS, Drop, UsageError
from rs_pseudolabel.data.read import ShardFault, iter_shard, member_names, small_members
from rs_pseudolabel.data.records import PSEUDO_EXT, SHARD_HEADER_KEY, decode_pseudo, read_cls
from rs_pseudolabel.students.seeding import seed_everything

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
MAX_DROPS_IN_A_ROW = 1000
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


# --- shard lists -------------------------------------------------------------------------


def node_shards(urls: Sequence[str], rank: int, world: int, seed: int | None = None) -> list[str]:
    """The shards one rank reads: a slice of the list, disjoint across ranks.

    With a seed the list is first permuted the same way on every rank, so ranks stay disjoint
    within an epoch and trade shards between epochs. With fewer shards than ranks no split can
    be disjoint; every rank then reads all of them (training resamples them with its own seed).
    """
    urls = list(urls)
    if seed is not None:
        random.Random(seed).shuffle(urls)
    if len(urls) < world:
        return urls
    return urls[rank::world]


def resample(src: Iterable[dict], seed: int) -> Iterator[dict]:
    """Stage: draw shards with replacement, forever, from what reached this worker.

    Not webdataset's own: the loaders split shards by node and then by worker (SPEC 6), and
    `ResampledShards` is a source, drawing from the whole list it is given, so it cannot come
    after `split_by_worker`; its stage form, `resampled`, seeds itself from /dev/random, so a
    resumed run could not draw the shards the uninterrupted one drew.
    """
    shards = list(src)
    info = torch.utils.data.get_worker_info()
    rng = random.Random(make_seed(seed, info.id if info else 0))
    while True:
        yield rng.choice(shards)


def _log_drop(drop: Drop) -> None:
    """Each drop in the log at INFO; what the user sees by default is their count per reason,
    which every batch carries to the training loop (see `batches`)."""
    log.info(
        "skipped %s in %s: %s %s",
        drop.key or "part of a shard",
        drop.shard,
        drop.reason,
        drop.detail,
    )


def tar_samples(src: Iterable[dict]) -> Iterator[dict | Drop]:
    """Stage: shard dicts (`url`) to samples, through the project's fsspec tar reader. What a
    shard loses (not a tar, cut short, unreadable) comes down the stream as a Drop by the
    end of that shard, and is counted with the samples' own drops: a labeled folder of
    broken shards shows in every epoch's line and the run's manifest."""
    for shard in src:
        lost: list[Drop] = []
        for sample in iter_shard(shard["url"], lost.append):
            yield from lost
            lost.clear()
            yield sample
        yield from lost


@dataclass(frozen=True)
class Failed:
    """A user's mistake or a storage failure met in a loader worker, carried to the training
    loop as its message: raised there as one line, where PyTorch's own re-raise would give
    "Caught ... in DataLoader worker process 0" and the worker's traceback."""

    message: str
    storage: bool

    def error(self) -> Exception:
        return OSError(self.message) if self.storage else UsageError(self.message)


def batches(
    src: Iterable,
    batch_size: int | Sequence[int],
    *,
    keep_last: bool = False,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, int]] | Failed]:
    """Stage: (inputs, targets, drops) batches, `drops` counting by reason the samples a
    decoder left out since the previous batch, so they reach the loop that shows them.

    `batch_size` a sequence: the sizes of a step's micro-batches, in turn over the loader's
    batches, of which this worker makes every num_workers-th (PyTorch takes the workers'
    batches in turn): each micro-batch comes whole from one worker, and a step's from all.
    With `keep_last` the last batch may be short (or empty, carrying only drops). `limit`:
    so many unusable samples in a row are an error (shards without classes, say), not a
    hang. A user error ends the stream as a `Failed` item (see `Loader`)."""
    if isinstance(batch_size, int):
        sizes: Iterator[int] = itertools.repeat(batch_size)
    else:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cycle = list(batch_size)
        sizes = (cycle[k % len(cycle)] for k in itertools.count(worker, workers))
    try:
        yield from _batches(src, sizes, keep_last, limit)
    except USER_ERRORS as exc:
        yield Failed(str(exc) or type(exc).__name__, isinstance(exc, OSError))


def _batches(
    src: Iterable, sizes: Iterator[int], keep_last: bool, limit: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]:
    items, drops, in_a_row = [], Counter(), 0
    size = next(sizes)
    for item in src:
        if isinstance(item, Drop):
            _log_drop(item)
            drops[item.reason] += 1
            in_a_row += 1
            if limit is not None and in_a_row >= limit:
                raise UsageError(
                    f"{in_a_row} samples in a row could not be used, the last for "
                    f"{item.reason} in {item.shard}: are these the right shards?"
                )
            continue
        in_a_row = 0
        items.append(item)
        if len(items) == size:
            inputs, targets = default_collate(items)
            yield inputs, targets, dict(drops)
            items, drops, size = [], Counter(), next(sizes)
    if keep_last and (items or drops):
        if items:
            inputs, targets = default_collate(items)
        else:
            inputs, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
        yield inputs, targets, dict(drops)


# --- decoders ----------------------------------------------------------------------------


def _image(sample: dict, transform: Transform) -> torch.Tensor | Drop:
    found = find_image(sample)
    if found is None:
        return Drop(
            sample.get("__url__", ""), sample["__key__"], "no_image", no_image_detail(sample)
        )
    image, reason = decode_image(found[1])
    if image is None:
        return Drop(sample.get("__url__", ""), sample["__key__"], reason)
    return transform(image)


def _class_id(sample: dict, num_classes: int) -> int | Drop:
    drop = partial(Drop, sample.get("__url__", ""), sample["__key__"])
    try:
        cls = read_cls(sample)
    except ValueError as exc:
        return drop("malformed_class", str(exc))
    if cls is None:
        return drop("no_class")
    if cls >= num_classes:
        return drop("unknown_class", f"class {cls} of a {num_classes}-class model")
    return cls


class LabeledDecoder:
    """sample -> (image tensor, class id); a Drop for what cannot be used; None for headers."""

    def __init__(self, transform: Transform, num_classes: int) -> None:
        self.transform, self.num_classes = transform, num_classes

    def __call__(self, sample: dict | Drop) -> tuple[torch.Tensor, int] | Drop | None:
        if isinstance(sample, Drop):  # a part of a shard that could not be read
            return sample
        if sample["__key__"] == SHARD_HEADER_KEY:
            return None
        cls = _class_id(sample, self.num_classes)
        if isinstance(cls, Drop):
            return cls
        image = _image(sample, self.transform)
        return image if isinstance(image, Drop) else (image, cls)


def soft_target(indices: Sequence[int], probs: Sequence[float], num_classes: int) -> torch.Tensor:
    """A dense distribution over the classes from a stored top-k: the k probabilities as the
    teacher gave them, and the mass it put outside them (1 - their sum) spread evenly over
    the other classes. Renormalising the top-k instead would hand that mass to the kept
    classes, a target further from the teacher's at every k (bench/bench_topk.py)."""
    top = torch.as_tensor(probs, dtype=torch.float32).clamp_min(0)
    rest = num_classes - len(top)
    tail = max(0.0, 1.0 - float(top.sum())) / rest if rest else 0.0
    target = torch.full((num_classes,), tail)
    target[torch.as_tensor(indices, dtype=torch.long)] = top
    return target / target.sum()  # float16 probabilities need not sum to exactly one


class PseudoDecoder:
    """sample -> (image tensor, dense soft target) from a training shard of `pipeline filter`.

    The soft label is the `.pl` record. A hard label (a record of one class, as `filter
    --hard` and the top-k strategy write, or only a `.cls`) is smoothed by `smoothing` as
    the labeled cross-entropy is, which is what the official Noisy Student code does; soft
    labels stay as the teacher gave them.
    """

    def __init__(self, transform: Transform, num_classes: int, smoothing: float = 0.0) -> None:
        self.transform, self.num_classes, self.smoothing = transform, num_classes, smoothing

    def _hard(self, cls: int) -> torch.Tensor:
        target = torch.full((self.num_classes,), self.smoothing / self.num_classes)
        target[cls] += 1.0 - self.smoothing
        return target

    def _target(self, sample: dict) -> torch.Tensor | Drop:
        drop = partial(Drop, sample.get("__url__", ""), sample["__key__"])
        payload = sample.get(PSEUDO_EXT)
        if payload is None:
            cls = _class_id(sample, self.num_classes)
            return cls if isinstance(cls, Drop) else self._hard(cls)
        try:
            label = decode_pseudo(sample["__key__"], payload)
        except Exception as exc:  # a damaged record is a dropped sample, whatever broke
            return drop("malformed_pseudo_label", str(exc))
        if label.indices.size == 0 or float(label.probs.astype("float32").sum()) <= 0:
            return drop("empty_pseudo_label")
        if int(label.indices.max()) >= self.num_classes:
            return drop("unknown_class", f"class {label.indices.max()} of {self.num_classes}")
        if label.indices.size == 1 and float(label.probs[0]) == 1.0:
            return self._hard(int(label.indices[0]))
        return soft_target(label.indices, label.probs.astype("float32"), self.num_classes)

    def __call__(self, sample: dict | Drop) -> tuple[torch.Tensor, torch.Tensor] | Drop | None:
        if isinstance(sample, Drop):  # a part of a shard that could not be read
            return sample
        if sample["__key__"] == SHARD_HEADER_KEY:
            return None
        target = self._target(sample)
        if isinstance(target, Drop):
            return target
        image = _image(sample, self.transform)
        return image if isinstance(image, Drop) else (image, target)


# --- loaders -----------------------------------------------------------------------------


def end_with_parent(parent: int, worker_id: int) -> None:
    """A loader worker's start: it dies with the process it loads for (Linux's parent-death
    signal). PyTorch's own watchdog looks only between batches, never while a read blocks.
    The signal follows the thread that started the worker: loaders start in the main one."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except AttributeError:  # no prctl: not Linux, where the watchdog alone must do
        return
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os.kill(os.getpid(), signal.SIGKILL)


class Loader:
    """A DataLoader whose workers end with this process and whose `Failed` items are raised
    here, as the one-line errors they are."""

    def __init__(self, dataset: Iterable, workers: int, **options: object) -> None:
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=partial(end_with_parent, os.getpid()) if workers else None,
            persistent_workers=workers > 0,  # iterated once an epoch, started once a run
            **options,
        )

    def __iter__(self) -> Iterator:
        for item in self.loader:
            if isinstance(item, Failed):
                raise item.error()
            yield item


class EpochStream(torch.utils.data.IterableDataset):
    """One rank's training stream for loader workers that live for the whole run: each
    `iter` of it (once per epoch, in every worker) starts the next epoch, whose shards,
    shuffle and augmentation are seeded by (seed, epoch, rank, stream, worker) alone, so
    epoch e's data is the same whether the run was interrupted before it or not, and no
    epoch waits for workers to start and fill their buffers from nothing."""

    def __init__(
        self,
        urls: Sequence[str],
        decode: Callable[[dict], object],
        batch_size: int | Sequence[int],
        *,
        rank: int,
        world: int,
        seed: int,
        first_epoch: int,
        shuffle_buffer: int,
        stream: int,
    ) -> None:
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.rank, self.world, self.seed, self.stream = rank, world, seed, stream
        self.shuffle_buffer = shuffle_buffer
        self.epoch = first_epoch  # the next to start, counted by each process on its own

    def shards(self, epoch: int) -> list[str]:
        return node_shards(self.urls, self.rank, self.world, seed=make_seed(self.seed, epoch))

    def __iter__(self) -> Iterator:
        epoch, self.epoch = self.epoch, self.epoch + 1
        stream_seed = make_seed(self.seed, epoch, self.rank, self.stream)
        info = torch.utils.data.get_worker_info()
        if info is not None:  # in the main process the trainer seeds each epoch itself
            seed_everything(stream_seed, info.id)
        yield from wds.DataPipeline(
            wds.SimpleShardList(self.shards(epoch)),
            wds.split_by_worker,
            partial(resample, seed=stream_seed),
            tar_samples,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=stream_seed),
            wds.map(self.decode),
            partial(batches, batch_size=self.batch_size, limit=MAX_DROPS_IN_A_ROW),
        )


def train_loader(
    urls: Sequence[str],
    decode: Callable[[dict], object],
    batch_size: int | Sequence[int],
    *,
    rank: int,
    world: int,
    first_epoch: int,
    seed: int,
    workers: int,
    shuffle_buffer: int,
    pin_memory: bool = False,
    stream: int = 0,
) -> Loader:
    """One rank's training loader for a run from `first_epoch` on: each `iter` of it is the
    next epoch's endless stream of (uint8 images, targets, drops) batches, of `batch_size`
    images or, given a step's micro-batch sizes, of those in turn (see `batches`), from the
    same worker processes (see `EpochStream`); `stream` tells apart the streams of one rank
    (labeled, pseudo-labeled) so they draw apart."""
    dataset = EpochStream(
        urls,
        decode,
        batch_size,
        rank=rank,
        world=world,
        seed=seed,
        first_epoch=first_epoch,
        shuffle_buffer=shuffle_buffer,
        stream=stream,
    )
    # Every epoch's slice of the shards has the same length: as many workers as it has shards.
    return Loader(
        dataset,
        min(workers, len(dataset.shards(first_epoch))),
        pin_memory=pin_memory,
        # the workers' own start seed, drawn from this and not from the trainer's RNG, whose
        # draws (dropout, stochastic depth) must not depend on when the loader started
        generator=torch.Generator().manual_seed(make_seed(seed, rank, stream)),
    )


def eval_loader(
    urls: Sequence[str],
    transform: Transform,
    num_classes: int,
    batch_size: int,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
) -> Loader | list:
    """Every labeled sample of this rank's shards once, in (images, labels, drops) batches.

    With fewer shards than ranks, the ranks past the last shard read nothing.
    """
    shards = list(urls)[rank::world]
    if not shards:  # webdataset's shard list must not be empty: this rank has nothing to read
        return []
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        tar_samples,
        wds.map(LabeledDecoder(transform, num_classes)),
        partial(batches, batch_size=batch_size, keep_last=True),
    )
    return Loader(pipeline, min(workers, len(shards)))


# --- what the shards hold ----------------------------------------------------------------


@dataclass(frozen=True)
class Counted:
    """What a count of labeled shards found: image samples, and those with a class by
    class index (a class of classes.json with none is named before training)."""

    samples: int
    classes: Counter


def _count_shard(url: str) -> Counted:
    """Image samples in one shard and their classes, from the tar headers and the few bytes
    of each `.cls`: images are seeked past, not read, so counting ImageNet costs seconds. A
    damaged shard counts none: the loaders drop what they cannot read of it and count that
    in every epoch's line and the manifest."""
    images, classes = set(), {}
    try:
        members = small_members(url, lambda name: name.lower().endswith(".cls"))
    except ShardFault:
        return Counted(0, Counter())
    for name, data in members:
        base, ext = base_plus_ext(name)
        if not base or base == SHARD_HEADER_KEY or not ext:
            continue
        if ext.lower() in IMAGE_EXTS:
            images.add(base)
        elif ext.lower() == "cls":
            try:
                classes[base] = read_cls({"cls": data})
            except ValueError:  # the loaders drop it, with its reason
                pass
    return Counted(len(images), Counter(c for k, c in classes.items() if k in images))


def count_samples(urls: Sequence[str], threads: int = 16) -> Counted:
    with ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(_count_shard, urls))
    return Counted(sum(c.samples for c in counts), sum((c.classes for c in counts), Counter()))


def has_classes(urls: Sequence[str]) -> bool:
    """Whether the first shard that holds images holds classes too (`.cls` members), from
    its tar headers: unlabeled validation shards are refused before training, not found out
    after the first epoch."""
    for url in urls:
        try:
            exts = {(base_plus_ext(name)[1] or "").lower() for name in member_names(url)}
        except ShardFault:  # a damaged shard says nothing; the next one may
            continue
        if exts & set(IMAGE_EXTS):
            return "cls" in exts
    return False


def has_samples(urls: Sequence[str]) -> bool:
    """Whether any shard holds an image sample; stops at the first that does."""
    return any(_count_shard(url).samples for url in urls)
