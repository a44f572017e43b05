"""Teacher inference: the eval preprocessing, and probabilities plus features from one pass."""

import pytest
import torch
from PIL import Image

from rs_pseudolabel.data.device import normalize
from rs_pseudolabel.teachers import Predictor, TeacherInfo, create_model, get_config
from rs_pseudolabel.teachers.inference import eval_pixels


def _info(name: str) -> TeacherInfo:
    cfg = get_config(name)
    return TeacherInfo(
        teacher_id=f"{name}@00000000",
        model_name=name,
        num_classes=1000,
        class_names=None,
        eval_size=cfg.eval_size,
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )


def eval_transform(info: TeacherInfo):
    """The teacher's eval pixels, normalised on the CPU: float CHW."""
    return lambda image: normalize(eval_pixels(info)(image), info.mean, info.std)


def test_eval_transform_resizes_center_crops_and_normalises():
    info = _info("rs-50")  # 160 px, resized to 192 first
    image = Image.new("RGB", (384, 192), (255, 0, 0))
    image.paste((0, 0, 255), (192, 0, 384, 192))  # left half red, right half blue
    out = eval_transform(info)(image)
    assert out.shape == (3, 160, 160) and out.dtype == torch.float32
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    red, blue = (torch.tensor([1.0, 0, 0]) - mean) / std, (torch.tensor([0, 0, 1.0]) - mean) / std
    assert torch.allclose(out[:, 80, 0], red, atol=1e-5)
    assert torch.allclose(out[:, 80, 159], blue, atol=1e-5)


def test_eval_transform_takes_any_mode_and_keeps_full_frame_for_small_members():
    out = eval_transform(_info("rs-mini"))(Image.new("L", (32, 32), 128))
    assert out.shape == (3, 32, 32)
    expected = (128 / 255 - torch.tensor(get_config("rs-mini").mean)) / torch.tensor(
        get_config("rs-mini").std
    )
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)
    assert torch.allclose(out[:, 31, 31], expected, atol=1e-5)


def test_predictor_returns_distributions_and_pooled_features_of_one_pass():
    torch.manual_seed(0)
    model = create_model("rs-mini", num_classes=10)
    predictor = Predictor(model.train())
    batch = torch.randn(4, 3, 32, 32)
    probs, features = predictor.predict(batch)
    assert probs.shape == (4, 10) and probs.dtype == torch.float32
    assert features.shape == (4, model.num_features) and features.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-6)
    assert not model.training  # the teacher is never noised
    with torch.inference_mode():
        assert torch.allclose(probs, model(batch).softmax(1), atol=1e-6)
        assert torch.allclose(model.fc(features), model(batch), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_predictor_on_gpu_matches_cpu_within_bf16_precision():
    torch.manual_seed(0)
    model = create_model("rs-mini", num_classes=10).eval()
    batch = torch.randn(8, 3, 32, 32)
    cpu_probs, _ = Predictor(model).predict(batch)
    gpu_probs, gpu_features = Predictor(model, "cuda").predict(batch)
    assert gpu_probs.device.type == "cpu" and gpu_features.dtype == torch.float32
    assert (gpu_probs - cpu_probs).abs().max() < 0.02


def test_a_compiled_teacher_compiles_once_for_every_batch_size_and_leaves_cudnn_alone():
    """Full batches and a shard's shorter last one share one compilation (a second one costs
    minutes for rs-152 on a GPU); building a predictor (as eval and validation do) leaves
    the process-wide cuDNN choice as the trainer set it."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    predictor = Predictor(create_model("rs-mini", num_classes=10), compile=counter)
    assert predictor.features == predictor.model.num_features and counter.frame_count == 0
    eager = Predictor(predictor.model)
    for n in (8, 5, 3, 8):
        x = torch.randn(n, 3, 32, 32)
        probs, _ = predictor.predict(x)
        assert torch.allclose(probs, eager.predict(x)[0], atol=1e-6)
    assert counter.frame_count == 1
    assert torch.backends.cudnn.benchmark is False
