"""The CUDA paths of the device feed and of the GPU check's memory peak, run on the CPU:
torch.cuda is replaced by a stand-in that records what is called on which stream, so the
order a GPU would see is pinned here (no GPU here or in CI). The CPU twin of each path is
the same calls with a CPU device."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from rs_pseudolabel.data.device import DeviceFeed, memory_format


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[tuple]]:
    """torch.cuda's streams, events, current stream, cache and memory peak, recording their
    calls: (the current stream, the calls)."""
    calls: list[tuple] = []

    class Stream:
        def __init__(self, device: object) -> None:
            calls.append(("stream", device))

        def synchronize(self) -> None:
            calls.append(("synchronize", self))

        def wait_event(self, event: object) -> None:
            calls.append(("wait", self, event))

    class Event:
        def record(self, stream: object) -> None:
            calls.append(("record", self, stream))

    current = Stream("current")
    calls.clear()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: calls.append(("on", s)) or nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset_peak", d))
    )
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 3 * 2**20
    )
    return current, calls


class _Pixels:
    """A batch on the device: where it is, and the streams its memory is recorded on."""

    device = torch.device("cuda", 0)

    def __init__(self, calls: list[tuple]) -> None:
        self.calls = calls

    def record_stream(self, stream: object) -> None:
        self.calls.append(("record_stream", stream))


def test_a_cuda_feed_marks_on_its_side_stream_and_the_model_waits_for_the_mark(fake_cuda):
    current, calls = fake_cuda
    device = torch.device("cuda", 0)
    feed = DeviceFeed(device)
    assert feed.cuda and feed.pin_memory
    with feed.context():  # the input thread's work goes to its side stream, made on first use
        ready = feed.mark()
    side = feed.stream
    assert calls == [("stream", device), ("on", side), ("record", ready, side)]
    calls.clear()
    pixels = _Pixels(calls)
    DeviceFeed.accept(pixels, ready)  # the model's stream waits, then keeps the memory
    assert calls == [("wait", current, ready), ("record_stream", current)]
    calls.clear()
    after = feed.mark(current=True)
    feed.drain()
    feed.release_cached()
    assert calls == [("record", after, current), ("synchronize", side), ("empty_cache",)]


def test_a_cpu_feed_makes_none_of_those_calls(fake_cuda):
    _, calls = fake_cuda
    feed = DeviceFeed(torch.device("cpu"))
    assert not feed.cuda and not feed.pin_memory and feed.stream is None
    with feed.context():
        assert feed.mark() is None and feed.mark(current=True) is None
    DeviceFeed.accept(torch.zeros(1), None)
    feed.drain()
    feed.release_cached()
    assert calls == [] and torch.equal(feed.to_device([1, 2]), torch.tensor([1, 2]))


def test_the_layout_is_channels_last_on_cuda_alone():
    assert memory_format(torch.device("cuda", 0)) is torch.channels_last
    assert memory_format(torch.device("cpu")) is torch.contiguous_format


def test_the_gpu_checks_memory_peak_is_reset_then_read_on_cuda_and_none_on_the_cpu(fake_cuda):
    from bench.gpu_check import DevicePeak

    _, calls = fake_cuda
    peak = DevicePeak(torch.device("cuda", 1))
    peak.start()
    assert calls == [("reset_peak", torch.device("cuda", 1))]
    assert peak.mib() == 3.0
    assert calls[1:] == [("peak", torch.device("cuda", 1))]
    calls.clear()
    cpu = DevicePeak(torch.device("cpu"))
    cpu.start()
    assert cpu.mib() is None and calls == []
