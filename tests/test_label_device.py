"""The device decode path, run on the CPU through the same code that runs nvJPEG on a GPU:
web variety, refused JPEGs, out-of-memory, the time split and the spread over devices."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.corpus import web_image
from bench.fixtures import write_shard
from rs_pseudolabel.data.device import worker_devices
from rs_pseudolabel.data.read import iter_samples, iter_shard
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo
from rs_pseudolabel.pipeline.label import LabelArgs, run
from rs_pseudolabel.pipeline.label_shard import Teacher, Teachers, label_shard
from rs_pseudolabel.pipeline.stats import collect, format_report, time_rows
from tests.conftest import run_cli


def _web_shard(path: Path) -> dict[str, str]:
    """A shard of what a crawl holds; returns the drop reason expected for each bad key."""
    rng = np.random.default_rng(7)
    samples = []
    for i, (w, h) in enumerate([(60 + 37 * i, 48 + 23 * (i % 9)) for i in range(24)]):
        samples.append({"__key__": f"base{i:02d}", "jpg": web_image(rng, "baseline", w, h)[1]})
    for i in range(4):
        samples.append({"__key__": f"prog{i}", "jpg": web_image(rng, "progressive", 300, 220)[1]})
    for kind in ("cmyk", "png", "webp", "gif"):
        ext, data = web_image(rng, kind, 260, 180)
        samples.append({"__key__": kind, ext: data})
    gray = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8), "L").save(gray, "JPEG")
    samples.append({"__key__": "gray", "jpg": gray.getvalue()})
    rgba = io.BytesIO()
    Image.new("RGBA", (70, 50), (200, 30, 30, 128)).save(rgba, "PNG")
    samples.append({"__key__": "rgba", "png": rgba.getvalue()})
    samples.append({"__key__": "cut", "jpg": web_image(rng, "undecodable", 320, 240)[1]})
    samples.append({"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8})
    write_shard(str(path), samples)
    return {"cut": "truncated_image", "garbage": "undecodable_image"}


def _labels(out: Path) -> dict[str, int]:
    samples = iter_samples([str(p) for p in sorted(out.glob("*.tar"))], lambda d: None)
    return {
        s["__key__"]: decode_pseudo(s["__key__"], s[PSEUDO_EXT]).top1
        for s in samples
        if PSEUDO_EXT in s
    }


def _dropped(out: Path) -> dict[str, str]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {e["key"]: e["reason"] for e in map(json.loads, lines)}


def test_web_variety_labels_alike_on_the_device_path_and_the_cpu_path(
    trained_teacher: Path, tmp_path: Path
):
    expected_drops = _web_shard(tmp_path / "src" / "web-000000.tar")
    common = ["--teacher", str(trained_teacher), "--input", str(tmp_path / "src")]
    for decode in ("device", "cpu"):
        result = run_cli(
            "label", *common, "--output", str(tmp_path / decode), "--decode", decode,
            "--device", "cpu", "--batch-size", "8",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    device, cpu = _labels(tmp_path / "device"), _labels(tmp_path / "cpu")
    assert set(device) == set(cpu) and len(cpu) == 34
    assert _dropped(tmp_path / "device") == _dropped(tmp_path / "cpu") == expected_drops
    agree = sum(device[k] == cpu[k] for k in cpu) / len(cpu)
    assert agree >= 0.95, agree
    report = json.loads((tmp_path / "device" / "manifest.json").read_text())["time_split"]
    # Baseline, progressive and gray JPEGs on the device; CMYK, the other formats and the
    # two bad JPEGs on the CPU.
    assert (report["on_device"], report["on_cpu"]) == (29, 7)
    # Either path counts the JPEGs by their first bytes (the CMYK and bad ones too), for
    # stats' advice on what --decode device would take.
    jpegs = sum(
        data[:2] == b"\xff\xd8"
        for sample in iter_shard(str(tmp_path / "src" / "web-000000.tar"), print)
        for name, data in sample.items()
        if not name.startswith("__")
    )
    cpu_split = json.loads((tmp_path / "cpu" / "manifest.json").read_text())["time_split"]
    assert report["jpeg"] == cpu_split["jpeg"] == jpegs > 29


def _teacher(run_dir: Path, decode: str = "device") -> Teacher:
    return Teacher.load(str(run_dir), None, "cpu", decode=decode, processes=1)


def test_a_jpeg_the_device_refuses_goes_alone_to_the_cpu(random_teacher: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    jpegs = [web_image(rng, "baseline", 120 + 10 * i, 90)[1] for i in range(8)]
    table = jpegs[3].find(b"\xff\xc4")  # a Huffman table whose counts libjpeg-turbo refuses
    broken = bytearray(jpegs[3])
    broken[table + 5] = 0xFF
    jpegs[3] = bytes(broken)
    src = tmp_path / "one.tar"
    write_shard(str(src), [{"__key__": f"k{i}", "jpg": data} for i, data in enumerate(jpegs)])
    report = label_shard(
        str(src), "one.tar", str(tmp_path / "out"), _teacher(random_teacher), 8, 5, False
    )
    assert (report.on_device, report.on_cpu) == (7, 1)
    assert [(d.key, d.reason) for d in report.drops] == [("k3", "undecodable_image")]
    assert report.samples_out == 7


def test_out_of_memory_in_the_forward_halves_the_batch_and_drops_nothing(
    random_teacher: Path, tmp_path: Path
):
    rng = np.random.default_rng(1)
    samples = [
        {"__key__": f"k{i:02d}", "jpg": web_image(rng, "baseline", 80, 64)[1]} for i in range(20)
    ]
    src = tmp_path / "src.tar"
    write_shard(str(src), samples)
    plain = _teacher(random_teacher, "cpu")
    label_shard(str(src), "s.tar", str(tmp_path / "plain"), plain, 16, 5, False)
    teacher = _teacher(random_teacher, "cpu")
    forward, sizes = teacher.predictor.forward, []

    def tight(batch: torch.Tensor):
        sizes.append(len(batch))
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(batch)

    teacher.predictor.forward = tight
    report = label_shard(str(src), "s.tar", str(tmp_path / "tight"), teacher, 16, 5, False)
    assert report.samples_out == 20 and report.drops == []
    assert teacher.fits == 4 and sizes[:4] == [16, 8, 4, 4] and max(sizes[4:]) == 4
    assert _labels(tmp_path / "tight") == _labels(tmp_path / "plain")

    teacher.predictor.forward = lambda batch: (_ for _ in ()).throw(torch.OutOfMemoryError("oom"))
    teacher.fits = 0
    with pytest.raises(ValueError, match="ran out of memory in the forward pass of one image"):
        label_shard(str(src), "s2.tar", str(tmp_path / "never"), teacher, 16, 5, False)
    assert not (tmp_path / "never" / "s2.tar").exists()


def test_time_split_adds_up_and_stats_says_where_the_time_went(
    random_teacher: Path, digits_dir: Path, tmp_path: Path
):
    out = tmp_path / "labels"
    run(
        LabelArgs(
            teacher=str(random_teacher), input=str(digits_dir / "unlabeled"), output=str(out)
        ),
        [],
    )
    for path in (out / "_reports").glob("*.json"):
        r = json.loads(path.read_text())
        driving = r["input_wait_seconds"] + r["forward_seconds"] + r["output_seconds"]
        assert abs(driving - r["seconds"]) <= 0.01 * r["seconds"], r
        assert r["read_seconds"] > 0 and r["decode_seconds"] > 0 and r["write_seconds"] > 0
        assert r["on_cpu"] == r["samples_in"]
    manifest = json.loads((out / "manifest.json").read_text())
    split = manifest["time_split"]
    assert split["on_cpu"] == manifest["samples_in"]
    assert split["forward_seconds"] <= split["seconds"]
    assert split["jpeg"] == 0  # the digits are PNGs
    text = format_report(*collect(str(out)))
    assert "waiting for input" in text and ("input-bound" in text or "not input-bound" in text)
    # The advice when input-bound fits the corpus: --decode device takes JPEGs alone.
    bound = {**split, "input_wait_seconds": split["seconds"] / 2}
    (verdict,) = [v for k, v in time_rows(bound) if k == "verdict"]
    assert verdict.endswith("; none of its images is a JPEG, the one format --decode device takes")
    images = split["on_cpu"]
    for jpeg, advice in [
        (images, " or decode on it (--decode device)"),
        (images // 4, " or decode its JPEGs on it (--decode device: 25% of the images)"),
        (None, " or decode its JPEGs on it (--decode device)"),  # a job recorded before the count
    ]:
        (verdict,) = [v for k, v in time_rows({**bound, "jpeg": jpeg}) if k == "verdict"]
        assert verdict.endswith(advice), verdict


def test_threads_spread_over_every_device_with_one_teacher_each():
    assert worker_devices("auto", cuda_devices=0) == ["cpu"]
    assert worker_devices("cuda", cuda_devices=4) == [f"cuda:{i}" for i in range(4)]
    assert worker_devices("cuda:2", cuda_devices=4) == ["cuda:2"]
    with pytest.raises(ValueError, match="sees no CUDA device"):
        worker_devices("cuda", cuda_devices=0)
    loads = []
    teachers = Teachers(
        lambda d: loads.append(d) or f"teacher on {d}", [f"cuda:{i}" for i in range(4)], None
    )
    assigned = [teachers.assign() for _ in range(8)]
    assert sorted(loads) == [f"cuda:{i}" for i in range(4)]  # one model per device
    assert sorted(t for t, _ in assigned) == sorted(
        f"teacher on cuda:{i}" for i in range(4) for _ in range(2)
    )
    slot = assigned[0][1]
    assert slot.acquire(blocking=False) and not slot.acquire(blocking=False)  # 1 forward in flight
    slot.release()


def _jpeg_shard(path: Path, n: int, broken: int | None = None, seed: int = 2) -> None:
    """`n` baseline JPEGs of several sizes; the one at `broken` has a Huffman table that
    libjpeg-turbo (and nvJPEG) refuse although the file is whole."""
    rng = np.random.default_rng(seed)
    jpegs = [web_image(rng, "baseline", 96 + 8 * (i % 5), 80)[1] for i in range(n)]
    if broken is not None:
        data = bytearray(jpegs[broken])
        data[data.find(b"\xff\xc4") + 5] = 0xFF
        jpegs[broken] = bytes(data)
    write_shard(str(path), [{"__key__": f"k{i:03d}", "jpg": d} for i, d in enumerate(jpegs)])


def _recording(teacher: Teacher, fail=lambda images: None) -> list:
    """Record the device decoder's calls in order: each drain of the side stream, and each
    decode call with its size; `fail(images)` may raise as torchvision does."""
    decoder, events = teacher.decoder, []
    decode = decoder.decode_batch
    decoder.feed.drain = lambda: events.append("drain")

    def stand_in(images: list[bytes]):
        events.append(len(images))
        fail(images)
        return decode(images)

    decoder.decode_batch = stand_in
    return events


def test_the_side_stream_is_drained_before_every_device_decode(
    random_teacher: Path, tmp_path: Path
):
    """torchvision's CUDA decoder writes from a stream of its own that does not wait for the
    caller's: the side stream must be idle at every call, or a block freed while a queued
    kernel still reads it can be decoded over (another image's pixels, no error)."""
    src = tmp_path / "s.tar"
    _jpeg_shard(src, 40)
    plain = label_shard(
        str(src), "s.tar", str(tmp_path / "cpu"), _teacher(random_teacher, "cpu"), 8, 5, False
    )
    teacher = _teacher(random_teacher)
    events = _recording(teacher)
    report = label_shard(str(src), "s.tar", str(tmp_path / "device"), teacher, 8, 5, False)
    calls = [i for i, e in enumerate(events) if e != "drain"]
    assert len(calls) == 5 == report.decode_calls  # one call per chunk of 8
    assert all(events[i - 1] == "drain" for i in calls), events
    assert report.on_device == plain.samples_out == report.samples_out == 40
    assert _labels(tmp_path / "device") == _labels(tmp_path / "cpu")


def test_one_refused_jpeg_costs_a_bisection_not_a_call_per_image(
    random_teacher: Path, tmp_path: Path
):
    src = tmp_path / "s.tar"
    _jpeg_shard(src, 64, broken=37)
    teacher = _teacher(random_teacher)
    events = _recording(teacher)
    report = label_shard(str(src), "s.tar", str(tmp_path / "out"), teacher, 64, 5, False)
    assert report.decode_calls == 13 <= 2 * 6 + 1  # 2 log2 n + 1 for n = 64
    calls = sorted((e for e in events if e != "drain"), reverse=True)
    assert calls == [64, 32, 32, 16, 16, 8, 8, 4, 4, 2, 2, 1, 1]  # each half of each level
    assert [(d.key, d.reason) for d in report.drops] == [("k037", "undecodable_image")]
    assert (report.on_device, report.on_cpu, report.samples_out) == (63, 1, 63)


def test_out_of_memory_in_the_device_decoder_halves_the_call_and_drops_nothing(
    random_teacher: Path, tmp_path: Path
):
    """torchvision wraps the decoder's out-of-memory as a plain RuntimeError: recognised by
    its words, it halves the calls (remembered), and one JPEG that does not fit is one line."""
    src = tmp_path / "s.tar"
    _jpeg_shard(src, 24)
    label_shard(str(src), "s.tar", str(tmp_path / "plain"), _teacher(random_teacher), 8, 5, False)

    def tight(images: list[bytes]) -> None:
        if len(images) > 2:
            raise RuntimeError("Error while decoding JPEG images: CUDA out of memory.")

    teacher = _teacher(random_teacher)
    events = _recording(teacher, tight)
    report = label_shard(str(src), "s.tar", str(tmp_path / "tight"), teacher, 8, 5, False)
    assert report.drops == [] and (report.on_device, report.on_cpu) == (24, 0)
    assert teacher.decoder.fits == 2
    calls = [e for e in events if e != "drain"]
    assert calls[:7] == [8, 4, 2, 2, 4, 2, 2] and max(calls[7:]) == 2  # then remembered
    assert _labels(tmp_path / "tight") == _labels(tmp_path / "plain")

    def never(images: list[bytes]) -> None:
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory.")

    teacher = _teacher(random_teacher)
    _recording(teacher, never)
    with pytest.raises(ValueError, match="ran out of memory decoding one JPEG"):
        label_shard(str(src), "s.tar", str(tmp_path / "never"), teacher, 8, 5, False)


def test_one_gpu_of_a_process_keeps_the_nvjpeg_decoder_and_the_others_decode_on_the_cpu(
    monkeypatch, capsys
):
    """torchvision's one nvJPEG decoder per process is rebuilt (and the old one leaked) at
    every call that names another GPU: threads on several GPUs must never alternate it."""
    from rs_pseudolabel.pipeline import label_decode
    from rs_pseudolabel.pipeline.label_decode import decode_path

    monkeypatch.setattr(label_decode, "_nvjpeg_owner", [])
    gpu = [torch.device(f"cuda:{i}") for i in range(3)]
    assert decode_path("auto", gpu[1]) == decode_path("device", gpu[1]) == "device"
    assert decode_path("device", gpu[0]) == decode_path("auto", gpu[2]) == "cpu"
    assert "cuda:2 decodes on the CPU: torchvision's nvJPEG decoder is cuda:1's" in (
        capsys.readouterr().err
    )
    assert decode_path("cpu", gpu[1]) == "cpu"
    cpu = torch.device("cpu")
    assert (decode_path("auto", cpu), decode_path("device", cpu)) == ("cpu", "device")
    with pytest.raises(ValueError, match="--decode must be one of"):
        decode_path("nvjpeg", gpu[1])


def test_each_thread_feeding_a_device_has_a_side_stream_of_its_own():
    """A label worker's threads share a teacher and its feed: with one side stream between
    them, one thread's drain before a decode would not wait for what another had just
    queued (and freed), and the decoder could be handed that block."""
    import threading

    from rs_pseudolabel.data.device import DeviceFeed

    feed = DeviceFeed(torch.device("cpu"))
    assert feed.stream is None  # the CPU has no streams
    feed.new_stream = object  # what a CUDA feed makes: torch.cuda.Stream(device)
    mine = feed.stream
    assert feed.stream is mine  # the same one for the same thread
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(feed.stream))
    thread.start()
    thread.join()
    assert theirs[0] is not None and theirs[0] is not mine
