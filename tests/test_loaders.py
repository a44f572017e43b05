"""The trainer's decoders and loaders: bad samples turned into reasons, labels smoothed as the
recipe says, micro-batches whose update is the whole batch's, workers kept across epochs."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rs_pseudolabel.data.device import Normalizer
from rs_pseudolabel.data.errors import Drop
from rs_pseudolabel.data.records import PSEUDO_EXT, PseudoLabel, encode_pseudo, shard_header
from rs_pseudolabel.students.config import Recipe
from rs_pseudolabel.students.data import LabeledDecoder, PseudoDecoder
from rs_pseudolabel.students.losses import soft_cross_entropy
from rs_pseudolabel.students.presets import TrainPreset
from rs_pseudolabel.teachers import create_model
from tests.conftest import image_bytes


def _identity(image):
    return torch.zeros(1)


def _pseudo(key: str, indices: list[int], probs: list[float]) -> bytes:
    label = PseudoLabel(
        key=key,
        indices=np.array(indices),
        probs=np.array(probs, np.float16),
        confidence=0.5,
        entropy=0.5,
        content_hash=b"\0" * 8,
    )
    return encode_pseudo(label)


def test_decoders_turn_bad_samples_into_reasons():
    png = image_bytes()
    labeled = LabeledDecoder(_identity, num_classes=10)
    assert labeled({"__key__": "a", "png": png, "cls": b"3"})[1] == 3
    assert labeled(shard_header(teacher="t")) is None
    reasons = {
        "no_class": {"__key__": "b", "png": png},
        "unknown_class": {"__key__": "c", "png": png, "cls": b"12"},
        "malformed_class": {"__key__": "d", "png": png, "cls": b"x"},
        "undecodable_image": {"__key__": "e", "png": b"not an image", "cls": b"1"},
        "no_image": {"__key__": "f", "cls": b"1"},
    }
    for reason, sample in reasons.items():
        drop = labeled(sample)
        assert isinstance(drop, Drop) and drop.reason == reason, (reason, drop)

    pseudo = PseudoDecoder(_identity, num_classes=10)
    _, target = pseudo({"__key__": "g", "png": png, PSEUDO_EXT: _pseudo("g", [2, 5], [0.3, 0.1])})
    assert target.shape == (10,) and target[2] == pytest.approx(0.3, abs=1e-3)
    assert target.sum() == pytest.approx(1) and target[0] == pytest.approx(0.6 / 8, abs=1e-3)
    _, one_hot = pseudo({"__key__": "h", "png": png, "cls": b"4"})
    assert one_hot[4] == 1 and one_hot.sum() == 1
    bad = {
        "unknown_class": _pseudo("i", [11], [0.9]),
        "empty_pseudo_label": _pseudo("j", [], []),
        "malformed_pseudo_label": b"\x07garbage",
    }
    for reason, payload in bad.items():
        drop = pseudo({"__key__": "k", "png": png, PSEUDO_EXT: payload})
        assert isinstance(drop, Drop) and drop.reason == reason, (reason, drop)


def test_hard_pseudo_labels_are_smoothed_as_labeled_ones_and_soft_ones_are_not():

    png = image_bytes()
    pseudo = PseudoDecoder(_identity, num_classes=10, smoothing=0.1)
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    for hard in ({"cls": b"4"}, {PSEUDO_EXT: _pseudo("h", [4], [1.0])}):
        _, target = pseudo({"__key__": "h", "png": png, **hard})
        assert target[4] == pytest.approx(0.91) and target[0] == pytest.approx(0.01)
        smoothed = F.cross_entropy(logits, torch.tensor([4]), label_smoothing=0.1)
        assert soft_cross_entropy(logits, target[None]) == pytest.approx(float(smoothed))
    _, soft = pseudo({"__key__": "g", "png": png, PSEUDO_EXT: _pseudo("g", [2, 5], [0.7, 0.3])})
    assert soft[2] == pytest.approx(0.7, abs=1e-3) and soft[0] == 0


def test_a_stream_of_nothing_but_unusable_samples_is_an_error():
    from rs_pseudolabel.students.data import Failed, Loader, batches

    good = (torch.zeros(1), 1)
    drops = [Drop("s.tar", f"k{i}", "no_class") for i in range(3)]
    # Drops between usable samples are counted on the batch that follows them.
    out = list(batches([drops[0], good, drops[1], good], batch_size=1, limit=2))
    assert [d for _, _, d in out] == [{"no_class": 1}, {"no_class": 1}]
    assert [t.tolist() for _, t, _ in out] == [[1], [1]]
    # In a loader worker the error ends the stream as an item, raised by the loop as itself.
    (failed,) = list(batches(drops, batch_size=1, limit=3))
    assert isinstance(failed, Failed) and not failed.storage
    with pytest.raises(ValueError, match="3 samples in a row .* no_class in s.tar"):
        list(Loader([failed], workers=0))


def _step(micro_batch: int, batch: tuple) -> tuple[list[torch.Tensor], torch.Tensor]:
    from rs_pseudolabel.students.train import train_step
    from tests.batches import split_batch

    torch.manual_seed(0)
    model = create_model("rs-mini", num_classes=10, drop_rate=0.0, drop_path_rate=0.0).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    recipe = Recipe(model="rs-mini", micro_batch=micro_batch, unlabeled_ratio=3.0)
    normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    parts, splits = split_batch(batch, micro_batch)
    loss, _, _ = train_step(model, optimizer, parts, splits, recipe, normal)
    return [p.detach().clone() for p in model.parameters()], loss


def test_micro_batches_give_the_update_of_the_whole_batch():
    """Eval-mode batch norm (its statistics are the running ones, the same for every split),
    no dropout: the only difference left is the split, so the updates must agree."""
    from rs_pseudolabel.students.train import micro_splits

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (16,), generator=gen)
    targets = torch.softmax(torch.randn(48, 10, generator=gen), dim=1)

    def pixels(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8)

    batch = (pixels(16), labels, pixels(48), targets)
    whole, whole_loss = _step(0, batch)
    split, split_loss = _step(16, batch)  # B/4 of the 64 images: four parts
    assert len(micro_splits(16, 48, 16)) == 4
    assert all((s.stop - s.start, t.stop - t.start) == (4, 12) for s, t in micro_splits(16, 48, 16))
    assert torch.allclose(whole_loss, split_loss, rtol=1e-5)
    moved = sum(float((p - q).abs().sum()) for p, q in zip(whole, _step(0, batch)[0], strict=True))
    assert moved == 0.0  # the step is deterministic: equal updates are not luck
    for p, q in zip(whole, split, strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4)
    # An uneven split: parts of unequal sizes, as many as there are labeled images (never
    # a part without one), still the same.
    uneven, _ = _step(7, (batch[0][:3], labels[:3], batch[2][:20], targets[:20]))
    plain, _ = _step(0, (batch[0][:3], labels[:3], batch[2][:20], targets[:20]))
    assert [(s.stop - s.start, t.stop - t.start) for s, t in micro_splits(3, 20, 7)] == [
        (1, 7), (1, 6), (1, 7),
    ]  # fmt: skip
    for p, q in zip(plain, uneven, strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4)


def _four_class_shards(tmp_path: Path) -> list[str]:
    """Four shards of 12 small PNGs each, every image of shard k of class k."""
    from bench.fixtures import write_shard

    urls = []
    for k in range(4):
        urls.append(str(tmp_path / f"part-{k}.tar"))
        samples = [{"__key__": f"s{k}i{i}", "png": image_bytes(size=(20 + i, 16)), "cls": b"%d" % k}
                   for i in range(12)]  # fmt: skip
        write_shard(urls[-1], samples)
    return urls


def test_the_loader_cuts_each_step_in_micro_batches_that_its_workers_share(tmp_path: Path):
    """Two loader workers, each step of 8 labeled images in micro-batches of 3, 2 and 3: the
    loader's batches come in those sizes, as uint8, and in turn from the two workers (each
    reads its own half of the shards, told apart here by the class of each shard)."""
    from rs_pseudolabel.students.data import LabeledDecoder, train_loader

    urls = _four_class_shards(tmp_path)
    loader = train_loader(
        urls,
        LabeledDecoder(TrainPreset(16, flip=False, randaugment_ops=0), 4),
        [3, 2, 3],
        rank=0,
        world=1,
        first_epoch=0,
        seed=0,
        workers=2,
        shuffle_buffer=4,
    )
    got = list(itertools.islice(iter(loader), 12))
    assert [len(labels) for _, labels, _ in got] == [3, 2, 3] * 4
    assert all(
        images.dtype == torch.uint8 and images.shape[1:] == (16, 16, 3) for images, _, _ in got
    )
    halves = [set(labels.tolist()) for _, labels, _ in got]
    first, second = set().union(*halves[0::2]), set().union(*halves[1::2])
    assert first and second and not first & second and first | second <= {0, 1, 2, 3}


class _WithPid:
    """A decoder's (image, class) with the id of the process that decoded it."""

    def __init__(self, decode: LabeledDecoder) -> None:
        self.decode = decode

    def __call__(self, sample: dict | Drop) -> object:
        out = self.decode(sample)
        return ((out[0], os.getpid()), out[1]) if isinstance(out, tuple) else out


def test_training_loaders_keep_their_workers_and_each_epoch_its_data(tmp_path: Path):
    """A training loader started once serves epoch after epoch from the same two worker
    processes, and its epochs 1 and 2 (augmentation included) are those of a loader started
    at epoch 1, as a resumed run starts it."""
    from rs_pseudolabel.students.data import train_loader

    urls = _four_class_shards(tmp_path)
    decode = _WithPid(LabeledDecoder(TrainPreset(16, randaugment_magnitude=15), 4))

    def epochs(first: int, count: int) -> list[list]:
        loader = train_loader(
            urls, decode, 4, rank=0, world=1, first_epoch=first, seed=0, workers=2,
            shuffle_buffer=8,
        )  # fmt: skip
        return [list(itertools.islice(iter(loader), 6)) for _ in range(count)]

    run, resumed = epochs(0, 3), epochs(1, 2)
    pids = [{pid for (_, pids), _, _ in epoch for pid in pids.tolist()} for epoch in run]
    assert len(pids[0]) == 2 and os.getpid() not in pids[0] and pids[1] == pids[0] == pids[2]
    for ours, theirs in zip(run[1:], resumed, strict=True):
        for ((images, _), labels, _), ((others, _), other_labels, _) in zip(
            ours, theirs, strict=True
        ):
            assert torch.equal(images, others) and torch.equal(labels, other_labels)
    assert not all(
        torch.equal(a[0][0], b[0][0]) for a, b in zip(run[0], run[1], strict=True)
    )  # each epoch draws anew
