"""Weights files and run directories: safe to load, unwrapped as training writes them, and a
run directory that gives back exactly the model that went in."""

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rs_pseudolabel.teachers import (
    WeightsError,
    create_model,
    export_run,
    load_teacher,
    read_weights,
)
from tests.conftest import message_lines, run_cli


def _trained_looking(num_classes: int = 10) -> torch.nn.Module:
    """rs-mini with random BN statistics, so outputs depend on every tensor."""
    torch.manual_seed(0)
    model = create_model("rs-mini", num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_run_dir_round_trip_gives_identical_outputs_and_description(tmp_path: Path):
    model = _trained_looking()
    names = [f"digit {i}" for i in range(10)]
    exported = export_run(tmp_path, model, "rs-mini", names, extra={"top1": 0.97})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]

    loaded, info = load_teacher(str(tmp_path))
    assert info == exported and not loaded.training
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert info.teacher_id == f"rs-mini@{digest[:8]}"
    assert (info.num_classes, info.class_names, info.eval_size, info.crop_pct) == (10, names, 32, 1)
    assert info.extra == {"top1": 0.97}
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["model"] == "rs-mini" and meta["interpolation"] == "bicubic"

    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_model_name_with_weights_takes_class_count_from_the_classifier(tmp_path: Path):
    path = tmp_path / "teacher.pth"
    torch.save(_trained_looking(num_classes=7).state_dict(), path)
    model, info = load_teacher("rs-mini", str(path))
    assert info.num_classes == 7 and info.class_names is None
    assert info.teacher_id == f"rs-mini@{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
    assert model.fc.out_features == 7


def test_training_checkpoints_unwrap_to_ema_weights_without_ddp_prefix(tmp_path: Path):
    raw = _trained_looking().state_dict()
    ema = {f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": raw, "state_dict_ema": ema, "epoch": 3}, path)
    state = read_weights(path)
    assert state.keys() == raw.keys()
    assert torch.equal(state["fc.bias"], raw["fc.bias"] + 1)


class _CreatesFile:
    """A pickle that, if ever loaded unsafely, creates a file: stands in for any payload."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(10, 512), "payload": _CreatesFile(marker)}, path)
    with pytest.raises(WeightsError, match="refused.*Unsupported global: GLOBAL io.open"):
        load_teacher("rs-mini", str(path))
    assert not marker.exists()


def test_model_name_without_weights_is_a_clear_value_error():
    with pytest.raises(ValueError, match="needs weights"):
        load_teacher("rs-50")


def test_teacher_that_is_neither_model_nor_run_dir_is_a_clear_value_error(tmp_path: Path):
    with pytest.raises(ValueError, match="neither a model name"):
        load_teacher(str(tmp_path))


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("w.safetensors", b"not safetensors", "not a readable safetensors"),
        ("w.pth", b"not a zip", "refused by torch's weights-only loader"),
        ("w.pt", _saved({"fc.bias": torch.zeros(3)})[:60], "not a readable torch checkpoint"),
        ("w.onnx", b"", "must be .safetensors"),
    ],
)
def test_unreadable_weights_files_are_weights_errors(
    tmp_path: Path, name: str, content: bytes, message: str
):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        read_weights(tmp_path / name)


def test_missing_weights_file_is_a_weights_error(tmp_path: Path):
    with pytest.raises(WeightsError, match="file not found"):
        load_teacher("rs-mini", str(tmp_path / "absent.safetensors"))


def test_export_refuses_class_names_that_do_not_match_the_classifier(tmp_path: Path):
    with pytest.raises(ValueError, match="3 class names for a model with 10 classes"):
        export_run(tmp_path, _trained_looking(), "rs-mini", ["a", "b", "c"])


def test_safetensors_weights_load_by_model_name(tmp_path: Path):
    model = _trained_looking()
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), path)
    loaded, _ = load_teacher("rs-mini", str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_a_run_directory_whose_weights_were_replaced_says_so_in_one_line(
    digits_dir: Path, tmp_path: Path
):
    run, other = tmp_path / "run", tmp_path / "other"
    export_run(str(run), _trained_looking(), "rs-mini", [str(i) for i in range(10)])
    torch.manual_seed(1)
    export_run(str(other), create_model("rs-mini", num_classes=10), "rs-mini", None)
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    for _ in range(2):  # a rerun says the same: the fix is the user's, not a rerun
        result = run_cli("label", "--teacher", str(run), "--input", str(shard),
                         "--output", str(tmp_path / "labels"))  # fmt: skip
        assert result.returncode == 2, result.stderr
        lines = message_lines(result.stderr)
        assert len(lines) == 1, lines
        assert "model.safetensors is not the file model.json records" in lines[0]
        assert "rerun" not in lines[0]


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            {"mean": [0.485, 0.456]},
            "mean must be 3 numbers, one per RGB channel, not [0.485, 0.456]",
        ),
        ({"std": [0.2, 0.0, 0.2]}, "std must be 3 numbers above 0"),
        ({"num_classes": "ten"}, 'num_classes must be a whole number above 0, not "ten"'),
        ({"class_names": ["0", "1"]}, "class_names must be 10 names (num_classes)"),
        ({"interpolation": "cubic"}, "interpolation must be one of bicubic, bilinear"),
        ({"eval_size": 0}, "eval_size must be a whole number of pixels above 0, not 0"),
        ({"crop_pct": 1.5}, "crop_pct must be a number in (0, 1], not 1.5"),
        ({"model": None}, "model must be a model name, not null"),
    ],
)
def test_a_hand_edited_model_json_is_named_in_one_line(
    digits_dir: Path, tmp_path: Path, edit: dict, said: str
):
    """A run directory's model.json edited by hand (a 2-value mean ended label as "internal
    error ... 6 units failed ... size of tensor a (3) must match") is refused on the
    launcher, naming the file and the field, before anything is claimed."""
    run = tmp_path / "run"
    export_run(str(run), _trained_looking(), "rs-mini", [str(i) for i in range(10)])
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, **edit}))
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    result = run_cli("label", "--teacher", str(run), "--input", str(shard),
                     "--output", str(tmp_path / "labels"))  # fmt: skip
    lines = message_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(
        f"pipeline label: error: {run / 'model.json'} was edited or damaged: "
    )
    assert said in lines[0], lines[0]
    assert not (tmp_path / "labels").exists()
