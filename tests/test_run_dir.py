"""A training run directory knows what made it: --resume continues only the same recipe and
inputs (a longer run excepted), classes must agree across splits, and samples the loaders
drop are counted where the user sees them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench.fixtures import write_shard
from rs_pseudolabel.data.classes import write_class_names
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.data.storage import write_json
from rs_pseudolabel.students import run_dir
from rs_pseudolabel.students.run_dir import CLAIM_FILE, STALE_SECONDS, live_claim
from tests.conftest import DIGITS_RECIPE, run_cli

QUICK = ["--model", "rs-mini", "--config", str(DIGITS_RECIPE), "--batch-size", "16"] + [
    arg for kv in ("epoch_samples=32", "workers=0", "shuffle_buffer=32") for arg in ("--set", kv)
]


def _train(digits: Path, out: Path, *extra: str):
    return run_cli(
        "train-student", "--labeled", str(digits / "labeled"), "--out", str(out), *QUICK, *extra
    )


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_refuses_a_changed_recipe_and_follows_a_longer_one(digits_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert _train(digits_dir, run, "--epochs", "1").returncode == 0
    refused = _train(digits_dir, run, "--epochs", "1", "--resume", "--set", "lr=10")
    assert refused.returncode == 2
    assert "recipe.lr is 10.0 now but 0.1 there" in refused.stderr.strip().splitlines()[-1]
    assert "lr: 0.1" in (run / "config.yaml").read_text()
    again = _train(digits_dir, run, "--epochs", "1")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    longer = _train(digits_dir, run, "--epochs", "2", "--resume")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert [r["epoch"] for r in _log(run)] == [1, 2]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["state"] == "done" and manifest["fingerprint"]["recipe"]["epochs"] == 2
    # A smaller plan would rewrite the finished run's record over weights it does not describe.
    record = {f: (run / f).read_bytes() for f in ("config.yaml", "manifest.json", "model.json")}
    shorter = _train(digits_dir, run, "--epochs", "1", "--resume")
    assert shorter.returncode == 2
    assert f"{run} holds a run of 2 epochs: --resume continues it to as many or more, not 1" in (
        shorter.stderr
    )
    assert record == {f: (run / f).read_bytes() for f in record}
    # How the same steps are computed may change on resume: micro-batches, the validation
    # batch, the loader processes (a run that ran out of memory continues in smaller parts).
    how = ("micro_batch=4", "eval_batch_size=32", "workers=1")
    changed = _train(digits_dir, run, "--epochs", "3", "--resume", *[
        arg for kv in how for arg in ("--set", kv)
    ])  # fmt: skip
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert [r["epoch"] for r in _log(run)] == [1, 2, 3]
    assert "micro_batch: 4" in (run / "config.yaml").read_text()


def test_overwrite_starts_afresh_and_equals_a_fresh_run(digits_dir: Path, tmp_path: Path):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert _train(digits_dir, run, "--epochs", "1").returncode == 0
    assert (
        _train(digits_dir, run, "--epochs", "1", "--set", "lr=0.2", "--overwrite").returncode == 0
    )
    assert _train(digits_dir, fresh, "--epochs", "1", "--set", "lr=0.2").returncode == 0
    shas = [json.loads((d / "model.json").read_text())["weights_sha256"] for d in (run, fresh)]
    assert shas[0] == shas[1]


def test_val_classes_that_disagree_with_the_labeled_set_are_refused(
    digits_dir: Path, tmp_path: Path
):
    val = tmp_path / "val"
    for url in expand_shards(str(digits_dir / "val")):
        (val / Path(url).name).parent.mkdir(parents=True, exist_ok=True)
        (val / Path(url).name).write_bytes(Path(url).read_bytes())
    write_class_names(str(val), [str(d) for d in (0, 1, 2, 3, 4, 5, 6, 7, 9, 8)])
    result = _train(digits_dir, tmp_path / "run", "--epochs", "1", "--val", str(val))
    assert result.returncode == 2
    assert (
        "the validation shards' classes.json disagrees: class 8 is '9' there but '8' in the "
        "labeled set" in result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_samples_dropped_in_training_are_counted_and_shown(digits_dir: Path, tmp_path: Path):
    """A tenth of the labeled samples name a class the model does not have: each epoch's log
    record and line say how many were dropped and why."""
    labeled = tmp_path / "labeled"
    samples = list(iter_samples(expand_shards(str(digits_dir / "labeled")), lambda d: None))
    for i, sample in enumerate(samples):
        if i % 10 == 0:
            sample["cls"] = b"12"
    write_shard(
        str(labeled / "part-000000.tar"),
        [{k: v for k, v in s.items() if k != "__url__"} for s in samples],
    )
    write_class_names(str(labeled), [str(d) for d in range(10)])
    run = tmp_path / "run"
    result = run_cli(
        "train-student", "--labeled", str(labeled), "--out", str(run), *QUICK, "--epochs", "2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "warning: 20 of the 200 labeled samples have class ids up to 12, but classes.json "
        "names 10 classes (0 to 9): they are dropped (unknown_class) and counted every epoch"
    ) in result.stderr
    records = _log(run)
    for record in records:
        dropped = record["dropped"]
        assert set(dropped) == {"unknown_class"} and dropped["unknown_class"] >= 1
        assert f"dropped {dropped['unknown_class']} samples (" in result.stderr + result.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    total = sum(r["dropped"]["unknown_class"] for r in records)
    assert manifest["drops"] == {"unknown_class": total} == {"unknown_class": manifest["dropped"]}


def test_a_damaged_shard_is_counted_when_the_recipe_leaves_the_epoch_to_the_data(
    digits_dir: Path, tmp_path: Path
):
    """Without `epoch_samples` (the digits and ImageNet recipes) the trainer counts the
    labeled images from the tar headers: a shard of random bytes, an empty one and one cut
    short count none (they ended the run as an internal error), and the run trains; the
    loaders drop what they cannot read of them, as they do with --set epoch_samples."""
    labeled = tmp_path / "labeled"
    shutil.copytree(digits_dir / "labeled", labeled)
    good = sorted(labeled.glob("*.tar"))[0].read_bytes()
    (labeled / "zz-random.tar").write_bytes(os.urandom(5000))
    (labeled / "zz-empty.tar").write_bytes(b"")
    (labeled / "zz-cut.tar").write_bytes(good[: len(good) // 2 + 100])
    run = tmp_path / "run"
    result = run_cli(
        "train-student", "--labeled", str(labeled), "--out", str(run), "--model", "rs-mini",
        "--config", str(DIGITS_RECIPE), "--batch-size", "64", "--epochs", "1",
        "--set", "workers=0", "--set", "shuffle_buffer=32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    counted = yaml.safe_load((run / "config.yaml").read_text())["epoch_samples"]
    assert counted == 200  # the whole shard's: the damaged ones count none


def test_resume_on_a_bucket_needs_nothing_local(gcs_server, digits_dir: Path):
    out = gcs_server.make_bucket("runs") + "/run"
    assert _train(digits_dir, out, "--epochs", "1").returncode == 0
    longer = _train(digits_dir, out, "--epochs", "2", "--resume")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resuming" in longer.stdout


def _refused_while_running(digits_dir: Path, run: Path, *extra: str) -> None:
    """A trainer into `run` (with `extra`) runs; a second one with --overwrite is refused in
    one line naming it, and leaves the running one's files alone. Then it is SIGKILLed."""
    args = ["train-student", "--labeled", str(digits_dir / "labeled"), "--out", str(run)]
    epochs = len(_log(run)) if (run / "log.jsonl").exists() else 0
    trainer = subprocess.Popen(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args, *QUICK, "--epochs", "500", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").exists() or len(_log(run)) <= epochs:
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read()
            time.sleep(0.2)
        config = (run / "config.yaml").read_text()
        second = _train(digits_dir, run, "--epochs", "1", "--set", "lr=0.2", "--overwrite")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {trainer.pid}" in lines[0], second.stderr
        assert (run / "config.yaml").read_text() == config  # the running run's, untouched
        assert trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait()


def test_a_run_directory_another_live_trainer_holds_is_refused_even_with_overwrite(
    digits_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    _refused_while_running(digits_dir, run)
    _refused_while_running(digits_dir, run, "--resume")  # a resumed run holds it as well
    # Killed, its claim is a dead process's: the directory can be taken over.
    again = _train(digits_dir, run, "--epochs", "1", "--set", "lr=0.2", "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "lr: 0.2" in (run / "config.yaml").read_text()
    assert not (run / CLAIM_FILE).exists()


def test_a_claim_from_another_machine_holds_until_its_beat_goes_stale(tmp_path: Path):
    run = str(tmp_path / "run")
    claim = {"host": "elsewhere", "pid": 1, "start": "0", "beat": time.time() - 10}
    write_json(f"{run}/{CLAIM_FILE}", claim)
    assert "pid 1 on elsewhere" in live_claim(run)
    write_json(f"{run}/{CLAIM_FILE}", {**claim, "beat": time.time() - STALE_SECONDS - 1})
    assert live_claim(run) is None


def test_an_epoch_smaller_than_a_batch_warns_in_one_line(digits_dir: Path, tmp_path: Path):
    result = _train(digits_dir, tmp_path / "run", "--epochs", "2", "--batch-size", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "32 samples is smaller than one batch of 64" in warnings[0]
    assert "2 steps in all" in warnings[0]


def test_the_training_size_reaches_model_json_eval_and_label(digits_dir: Path, tmp_path: Path):
    """Weights trained at 48 px are validated, evaluated and label at 48 px (the table's
    rs-mini size is 32), or at the eval_size asked for."""
    from rs_pseudolabel.teachers import get_config, load_teacher
    from rs_pseudolabel.teachers.inference import eval_crop

    run, larger = tmp_path / "run", tmp_path / "larger"
    assert _train(digits_dir, run, "--epochs", "1", "--set", "image_size=48").returncode == 0
    meta = json.loads((run / "model.json").read_text())
    padding = get_config("rs-mini").crop_padding  # the table's padding, kept at 48 px
    assert meta["eval_size"] == 48 and meta["crop_pct"] == 48 / (48 + padding)
    assert yaml.safe_load((run / "config.yaml").read_text())["eval_size"] == 48
    scores = tmp_path / "scores.json"
    result = run_cli("eval", "--checkpoint", str(run), "--data", str(digits_dir / "val"),
                     "--json", str(scores))  # fmt: skip
    assert result.returncode == 0 and "at 48 px" in result.stdout, result.stderr
    assert json.loads(scores.read_text())["eval_size"] == 48
    crop = eval_crop(load_teacher(str(run))[1])  # what label's decoders crop to
    assert (crop.resize, crop.crop) == (48 + padding, 48)
    extra = ("--set", "image_size=48", "--set", "eval_size=64")
    assert _train(digits_dir, larger, "--epochs", "1", *extra).returncode == 0
    assert json.loads((larger / "model.json").read_text())["eval_size"] == 64


def test_init_starts_from_another_runs_weights_with_a_new_head_for_other_classes(
    digits_dir: Path, tmp_path: Path
):
    from rs_pseudolabel.students.train import init_from
    from rs_pseudolabel.teachers import create_model, export_run

    torch.manual_seed(3)
    source = create_model("rs-mini", num_classes=10)
    export_run(str(tmp_path / "source"), source, "rs-mini", [str(i) for i in range(10)])
    same = create_model("rs-mini", num_classes=10)
    assert init_from(same, str(tmp_path / "source"), "rs-mini") is None
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                  source.state_dict().values(), strict=True))  # fmt: skip
    torch.manual_seed(4)
    other = create_model("rs-mini", num_classes=5)
    fresh_head = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("fc.")}
    said = init_from(other, str(tmp_path / "source"), "rs-mini")
    assert "10 classes and this run 5" in said
    for key, value in other.state_dict().items():
        expected = fresh_head[key] if key in fresh_head else source.state_dict()[key]
        assert torch.equal(value, expected), key
    # From the command line: recorded in the run's fingerprint, and refused for another model.
    run = tmp_path / "run"
    result = _train(digits_dir, run, "--epochs", "1", "--init", str(tmp_path / "source"))
    assert result.returncode == 0, result.stderr[-2000:]
    fingerprint = json.loads((run / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["init"].startswith("rs-mini@")
    wrong = run_cli("train-student", "--model", "rs-tiny", "--labeled",
                    str(digits_dir / "labeled"), "--out", str(tmp_path / "wrong"),
                    "--init", str(tmp_path / "source"), "--epochs", "1")  # fmt: skip
    assert wrong.returncode == 2 and "holds a rs-mini, not a rs-tiny" in wrong.stderr
    # A refused start leaves no folder to block the corrected command: weights that are no
    # checkpoint at all are found only after the run claimed its directory.
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    retry = tmp_path / "retry"
    bad = _train(digits_dir, retry, "--epochs", "1", "--init", str(tmp_path / "garbage.pt"))
    assert bad.returncode == 2 and "garbage.pt" in bad.stderr.strip().splitlines()[-1]
    assert not retry.exists()
    good = _train(digits_dir, retry, "--epochs", "1", "--init", str(tmp_path / "source"))
    assert good.returncode == 0, good.stderr[-2000:]
    # Refused on --resume of a run with a checkpoint: the run stays as it was.
    kept = sorted(p.name for p in retry.iterdir())
    again = _train(digits_dir, retry, "--epochs", "2", "--resume", "--set", "freeze_through=stem")
    assert again.returncode == 2 and sorted(p.name for p in retry.iterdir()) == kept


def test_the_finetune_recipe_trains_on_eval_crops_with_its_first_layers_frozen(
    digits_dir: Path, tmp_path: Path
):
    """configs/finetune.yaml on the digits: the pixels it trains on are the eval transform's
    at its size, the stem and stage 1 (weights and batch-norm statistics) leave the run as
    --init gave them while the rest trains, and the LR is the schedule's tail."""
    import io
    import math

    from PIL import Image

    from rs_pseudolabel.students.config import resolve_recipe
    from rs_pseudolabel.students.presets import train_preset
    from rs_pseudolabel.students.train import peak_lr, warmup_cosine
    from rs_pseudolabel.teachers import create_model, export_run, get_config
    from rs_pseudolabel.teachers.checkpoint import run_info
    from rs_pseudolabel.teachers.inference import eval_pixels
    from rs_pseudolabel.teachers.weights import read_weights
    from tests.conftest import image_bytes

    sets = ["image_size=40", "num_classes=10", "epoch_samples=64", "batch_size=32"]
    sets += ["warmup_epochs=1", "schedule_epochs=4", "workers=0", "shuffle_buffer=32"]
    recipe = resolve_recipe("finetune", sets, model="rs-mini")
    preset = train_preset(get_config("rs-mini"), recipe)
    evaluated = eval_pixels(run_info("rs-mini", 10, None, eval_size=40))
    image = Image.open(io.BytesIO(image_bytes(size=(57, 43))))
    assert preset(image).shape == (40, 40, 3)
    assert torch.equal(preset(image), evaluated(image)) and torch.equal(
        preset(image), preset(image)
    )

    # A source with batch-norm statistics of its own (a fresh model's are zeros and ones).
    torch.manual_seed(5)
    source = create_model("rs-mini", num_classes=10)
    for buffer in source.buffers():
        if buffer.is_floating_point():
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    export_run(str(tmp_path / "source"), source, "rs-mini", [str(i) for i in range(10)])
    before = source.state_dict()
    run = tmp_path / "run"
    result = run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--out", str(run),
        "--model", "rs-mini", "--config", "finetune", "--init", str(tmp_path / "source"),
        "--epochs", "1", *[arg for kv in sets for arg in ("--set", kv)],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    trained = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    exported = read_weights(str(run / "model.safetensors"))
    frozen = ("conv1.", "bn1.", "layer1.")
    for key, value in before.items():
        if key.startswith(frozen):
            assert torch.equal(trained[key], value), key
            assert torch.equal(exported[key], value), key
    moved = [k for k, v in before.items() if k.startswith("layer2.") and v.is_floating_point()]
    assert any(not torch.equal(trained[k], before[k]) for k in moved)
    # 2 steps an epoch: the run's two steps are the last of the 8 of a 4-epoch schedule.
    lr = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["lr"]
    assert math.isclose(lr, peak_lr(0.1, 32) * warmup_cosine(7, 2, 8), rel_tol=1e-6)

    refused = run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--out", str(tmp_path / "r"),
        "--model", "rs-mini", "--config", "finetune", "--epochs", "1",
        *[arg for kv in sets for arg in ("--set", kv)],
    )  # fmt: skip
    assert refused.returncode == 2
    assert "without --init they would stay at their random" in refused.stderr
    wrong = run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--out", str(tmp_path / "w"),
        "--model", "rs-mini", "--config", "finetune", "--init", str(tmp_path / "source"),
        "--epochs", "1", *[arg for kv in [*sets, "freeze_through=stem"] for arg in ("--set", kv)],
    )  # fmt: skip
    assert wrong.returncode == 2
    assert "conv1, bn1, maxpool, layer1, layer2, layer3, layer4, fc" in wrong.stderr


def test_a_run_recorded_before_a_recipe_key_existed_resumes_with_its_default(
    digits_dir: Path, tmp_path: Path
):
    """The keys of the fine-tune (train_crop, freeze_through, schedule_epochs) came after
    runs were recorded without them: such a run trained with their defaults, and resumes."""
    run = tmp_path / "run"
    assert _train(digits_dir, run, "--epochs", "1").returncode == 0
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("train_crop", "freeze_through", "schedule_epochs"):
        del manifest["fingerprint"]["recipe"][key]
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = _train(digits_dir, run, "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and len(_log(run)) == 2
    # A key it recorded with another value is still refused.
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["fingerprint"]["recipe"]["train_crop"] = "center"
    (run / "manifest.json").write_text(json.dumps(manifest))
    refused = _train(digits_dir, run, "--epochs", "3", "--resume")
    assert refused.returncode == 2 and "train_crop" in refused.stderr


def _beating(run: str, claim: dict, skew: float = 0.0) -> threading.Event:
    """Another trainer's claim, kept alive as its heartbeat would (with its clock `skew`
    seconds off this machine's) until the returned event is set."""
    stop = threading.Event()

    def beat() -> None:
        beats = 0
        while not stop.is_set():
            write_json(f"{run}/{CLAIM_FILE}", {**claim, "beats": beats, "beat": time.time() + skew})
            beats += 1
            stop.wait(run_dir.BEAT_SECONDS)

    threading.Thread(target=beat, daemon=True).start()
    while not Path(f"{run}/{CLAIM_FILE}").exists():
        time.sleep(0.01)
    return stop


def test_a_claim_is_judged_by_its_heartbeat_in_another_pid_namespace_or_with_a_skewed_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A trainer in a container sharing this host's name and boot has pid 1 there: its pid
    says nothing here, so its heartbeat decides; a second trainer with --overwrite is
    refused and deletes nothing. A clock an hour ahead neither keeps a dead claim alive nor
    a live one from being seen."""
    monkeypatch.setattr(run_dir, "BEAT_SECONDS", 0.2)
    run = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("theirs")
    me = run_dir._me()
    claim = {**me, "pidns": "pid:[1]", "pid": 1, "start": "0", "token": "t", "dir": run}
    for skew in (0.0, 3600.0):
        stop = _beating(run, claim, skew)
        try:
            holder = live_claim(run)
            assert holder is not None and "pid 1 on" in holder, holder
            assert ("an hour" not in holder) and (("3600 s ahead" in holder) == (skew > 0))
            with pytest.raises(UsageError, match="another trainer"):
                run_dir.claim_run(run, {"recipe": {}}, [], resume=False, overwrite=True)
            assert (tmp_path / "run" / "config.yaml").read_text() == "theirs"
        finally:
            stop.set()
        time.sleep(0.5)
        assert live_claim(run) is None  # its heartbeat stopped: stale after the watch
        (tmp_path / "run" / CLAIM_FILE).unlink()
    # A claim copied with its folder (cp -r of a live run) names the folder it was made in.
    write_json(f"{run}/{CLAIM_FILE}", {**claim, "dir": str(tmp_path / "original"), "beats": 0})
    assert live_claim(run) is None


def test_an_epoch_many_times_a_small_labeled_set_warns_in_one_line(
    digits_dir: Path, tmp_path: Path
):
    """configs/finetune.yaml's epoch is ImageNet's: on 200 digits it would repeat each one
    thousands of times an epoch without a word. (The run is then refused for its unlabeled
    validation shards, which are checked after: the warning needs no training.)"""
    result = _train(
        digits_dir, tmp_path / "run", "--set", "epoch_samples=20000",
        "--val", str(digits_dir / "unlabeled"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "epoch_samples 20,000 is 100 times the 200 labeled samples" in warnings[0]
    quiet = _train(
        digits_dir, tmp_path / "quiet", "--set", "epoch_samples=19999",
        "--val", str(digits_dir / "unlabeled"),
    )  # fmt: skip
    assert "warning:" not in quiet.stderr and "note:" not in quiet.stderr
    # Another model than the recipe's is taken, as --set model= is, and said.
    other = _train(digits_dir, tmp_path / "other", "--model", "rs-tiny",
                   "--val", str(digits_dir / "unlabeled"))  # fmt: skip
    notes = [line for line in other.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: training rs-tiny with the recipe {DIGITS_RECIPE}, written for rs-mini (its "
        "other keys as they are)"
    ], other.stderr


def test_classes_without_a_labeled_image_are_named_before_training(
    digits_dir: Path, tmp_path: Path
):
    """classes.json names ten digits; a labeled set with no 3 and no 7 (and one sample whose
    class is unreadable, which the loaders drop) is said in one line before the first step,
    read from each sample's `.cls` while the images are seeked past."""
    from rs_pseudolabel.students.data import count_samples

    labeled = tmp_path / "labeled"
    labeled.mkdir()
    shutil.copy(digits_dir / "labeled" / "classes.json", labeled / "classes.json")
    samples = [
        {**s, "cls": b"x"} if i == 0 else s
        for i, s in enumerate(iter_samples(expand_shards(str(digits_dir / "labeled")), print))
        if s.get("cls", b"").strip() not in (b"3", b"7")
    ]
    write_shard(str(labeled / "part-000000.tar"), samples)
    counted = count_samples(expand_shards(str(labeled)))
    assert counted.samples == len(samples)
    assert sorted(counted.classes) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert sum(counted.classes.values()) == len(samples) - 1  # the unreadable class
    result = run_cli(
        "train-student", "--labeled", str(labeled), "--out", str(tmp_path / "run"), *QUICK,
        "--val", str(digits_dir / "unlabeled"),
    )  # fmt: skip
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 2 of the 10 classes have no labeled image: 3, 7 (learned from pseudo-labels "
        "alone, if any)"
    ], result.stderr


def test_a_stopped_training_run_says_how_to_continue_it(digits_dir: Path, tmp_path: Path):
    """SIGTERM ends training in one line that tells the command which continues it: the
    trainer continues a run only with --resume (the same command again is refused)."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "rs_pseudolabel.pipeline", "train-student", "--labeled",
               str(digits_dir / "labeled"), "--out", str(run), *QUICK, "--epochs", "30"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        "pipeline train-student: stopped by SIGTERM; rerun it with --resume to continue after "
        "its last finished epoch"
    )
    resumed = run_cli(*command[3:], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["epoch"] for r in _log(run)] == list(range(1, 31))


def test_a_classes_json_that_contradicts_the_labels_is_refused(digits_dir: Path, tmp_path: Path):
    """Three class names over digits 0-9 dropped 70% of the labeled set with exit 0, and a
    name given twice merged two classes without a word: both are one line before training.
    (A few samples beyond the classes are damaged ones: dropped, counted and warned of.)"""
    labeled = tmp_path / "labeled"
    shutil.copytree(digits_dir / "labeled", labeled)
    for names, said in [
        (["a", "b", "c"], "labeled samples have class ids up to 9, but classes.json names 3 "),
        ([*"012345678", "8"], "classes.json names 1 class twice ('8'): each class needs a name"),
    ]:
        (labeled / "classes.json").write_text(json.dumps(names))
        result = run_cli("train-student", "--labeled", str(labeled), "--out",
                         str(tmp_path / "run"), *QUICK, "--epochs", "1")  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode == 2 and len(lines) == 1 and said in lines[0], result.stderr
        assert not (tmp_path / "run").exists()
