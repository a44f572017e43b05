"""timm models as teachers and students: labels equal to a plain loop written with timm's own
API, a timm student through the digits loop, and names timm does not know said in one line."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from rs_pseudolabel.data.decode import decode_image
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo
from tests.conftest import DIGITS_RECIPE, message_lines, run_cli
from tests.test_label_device import _web_shard

# Three families, built small by timm itself (its `test_*` architectures, at 160 px).
ARCHS = ("test_convnext", "test_vit", "test_efficientnet")
CLASSES = 10
FP16 = 2e-3  # relative precision of the float16 the records store probabilities in


def _weights(arch: str, path: Path) -> Path:
    """Seeded random weights in timm's layout, the classifier drawn wide so that the
    probabilities spread (timm initialises some heads at zero: every class alike)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=CLASSES)
    head = model.get_classifier()
    torch.nn.init.normal_(head.weight, std=3.0 / head.weight.shape[1] ** 0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _plain_timm(arch: str, weights: Path, shard: Path) -> dict[str, np.ndarray]:
    """Each image's probabilities by timm's API alone, on the images as the pipeline decodes
    them."""
    from safetensors.torch import load_file

    model = timm.create_model(arch, pretrained=False, num_classes=CLASSES)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    transform = create_transform(**resolve_data_config(model=model))
    probs = {}
    for sample in iter_samples([str(shard)], lambda d: None):
        data = next((sample[e] for e in ("jpg", "png", "webp", "gif") if e in sample), None)
        image, _ = decode_image(data)
        if image is None:
            continue
        with torch.inference_mode():
            probs[sample["__key__"]] = model(transform(image)[None]).softmax(1)[0].numpy()
    return probs


def _labels(out: Path) -> dict:
    samples = iter_samples([str(p) for p in sorted(out.glob("*.tar"))], lambda d: None)
    return {
        s["__key__"]: decode_pseudo(s["__key__"], s[PSEUDO_EXT]) for s in samples if PSEUDO_EXT in s
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_a_timm_teacher_labels_as_timms_own_eval_transform_does(arch: str, tmp_path: Path):
    src = tmp_path / "src" / "web-000000.tar"
    _web_shard(src)
    weights = _weights(arch, tmp_path / f"{arch}.safetensors")
    outputs = {}
    for decode in ("cpu", "device"):
        result = run_cli(
            "label", "--teacher", f"timm:{arch}", "--weights", str(weights),
            "--input", str(src.parent), "--output", str(tmp_path / decode), "--decode", decode,
            "--device", "cpu", "--batch-size", "8",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[decode] = _labels(tmp_path / decode)
    expected = _plain_timm(arch, weights, src)
    cpu = outputs["cpu"]
    assert set(cpu) == set(expected) and len(cpu) == 34
    for key, label in cpu.items():
        truth = expected[key]
        got = label.probs.astype(np.float64)
        assert np.allclose(got, truth[label.indices], rtol=FP16, atol=1e-4), key
        # The same top 5, but for classes whose probabilities tie within the precision.
        top5, fifth = label.indices[:5], np.sort(truth)[-5]
        sure = {int(i) for i in np.flatnonzero(truth > fifth * (1 + 2 * FP16))}
        assert sure <= set(top5.tolist()), key
        assert all(truth[i] >= fifth * (1 - 2 * FP16) for i in top5), key
    device = outputs["device"]
    agree = sum(device[k].top1 == cpu[k].top1 for k in cpu) / len(cpu)
    assert agree >= 0.95, agree


def test_a_timm_student_trains_exports_labels_and_initialises_the_next(
    digits_dir: Path, tmp_path: Path
):
    recipe = yaml.safe_load(DIGITS_RECIPE.read_text()) | {"model": "timm:test_resnet"}
    config = tmp_path / "timm-digits.yaml"
    config.write_text(yaml.safe_dump(recipe))
    common = ["--config", str(config), "--set", "image_size=32", "--set", "epoch_samples=128"]
    run = tmp_path / "student"
    result = run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--val",
        str(digits_dir / "val"), "--out", str(run), "--epochs", "2", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = yaml.safe_load((run / "model.json").read_text())
    assert meta["model"] == "timm:test_resnet" and meta["eval_size"] == 32
    labels = tmp_path / "labels"
    result = run_cli(
        "label", "--teacher", str(run), "--input", str(digits_dir / "unlabeled"),
        "--output", str(labels), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(_labels(labels)) > 0
    result = run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--out",
        str(tmp_path / "next"), "--epochs", "1", "--init", str(run), *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("teacher", "said"),
    [
        ("timm:no_such_net", "unknown timm model 'no_such_net'"),
        ("timm:resnet10t.no_such_tag", "timm has no pretrained config 'resnet10t.no_such_tag'"),
    ],
)
def test_a_timm_name_timm_does_not_know_is_one_line(teacher: str, said: str, tmp_path: Path):
    result = run_cli(
        "label", "--teacher", teacher, "--weights", str(tmp_path / "w.safetensors"),
        "--input", str(tmp_path), "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and said in lines[0], result.stderr


def test_a_timm_model_built_for_its_training_size_loads_at_that_size(tmp_path: Path):
    from rs_pseudolabel.teachers import create_model, export_run, load_teacher

    torch.manual_seed(0)
    model = create_model("timm:test_vit", CLASSES, image_size=32).eval()
    export_run(str(tmp_path), model, "timm:test_vit", None, {"recipe": {"image_size": 32}}, 32)
    loaded, info = load_teacher(str(tmp_path))
    image = torch.rand(2, 3, 32, 32)
    assert (info.eval_size, info.crop_pct, info.mean) == (32, 0.95, (0.5, 0.5, 0.5))
    with torch.inference_mode():
        assert torch.equal(loaded(image), model(image))


def test_a_timm_rows_micro_batch_is_measured_as_the_resnet_rs_rows_were():
    """The measurement that gave the table's ResNet-RS figures (bench/bench_micro.py) gives
    them again, and a timm row's recipe gets its own from it."""
    from rs_pseudolabel.students.config import resolve_recipe
    from rs_pseudolabel.teachers import create_model
    from rs_pseudolabel.teachers.micro import measured_micro_batch
    from rs_pseudolabel.teachers.registry import MICRO

    assert measured_micro_batch(create_model("rs-50"), 160) == MICRO["rs-50"]
    recipe = resolve_recipe(None, (), model="timm:test_resnet")
    model = timm.create_model("test_resnet", pretrained=False)
    assert recipe.micro_batch == measured_micro_batch(model, 160) > 0
