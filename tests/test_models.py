"""The ResNet-RS family: timm's layout and logits, the table, stochastic depth, and a small
member that really learns."""

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rs_pseudolabel.teachers import (
    WeightsError,
    create_model,
    format_table,
    get_config,
    list_models,
    models_table,
)
from rs_pseudolabel.teachers.resnet_rs import Bottleneck, DropPath


@pytest.fixture(autouse=True)
def one_thread():
    """These models are small or their inputs are: a second thread gains little, while OpenMP
    threads spin-waiting for a core another process holds make a test many times slower on
    a shared two-core machine. One thread keeps timings steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PAPER_MODELS = ["rs-50", "rs-101", "rs-152", "rs-200", "rs-270", "rs-350", "rs-420"]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_tensor_names_shapes_and_parameter_count_equal_timm(name: str):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(get_config(name).timm_name, pretrained=False)
    assert _shapes(ours) == _shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """timm zero-inits each block's last BN, which would hide every residual branch from a
    logits comparison; random BN statistics make all of the network count."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module", params=["rs-50", "rs-101"])
def timm_checkpoint(request, tmp_path_factory) -> tuple[str, torch.nn.Module, dict[str, Path]]:
    """A random timm model saved both ways timm weights come: .pth and .safetensors."""
    torch.manual_seed(0)
    name = request.param
    model = timm.create_model(get_config(name).timm_name, pretrained=False).eval()
    _randomise_batchnorm(model)
    out = tmp_path_factory.mktemp(name)
    files = {"pth": out / "weights.pth", "safetensors": out / "weights.safetensors"}
    torch.save(model.state_dict(), files["pth"])
    save_file(model.state_dict(), files["safetensors"])
    return name, model, files


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_weights_load_unchanged_and_give_the_same_logits(timm_checkpoint, fmt: str):
    name, reference, files = timm_checkpoint
    ours = create_model(name, weights=files[fmt]).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected, got = reference(x), ours(x)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-4


def test_weights_of_other_class_count_name_tensor_and_both_shapes():
    ten_classes = create_model("rs-mini", num_classes=10).state_dict()
    with pytest.raises(WeightsError, match=r"'fc\.weight' has shape \(10, 512\).*\(1000, 512\)"):
        create_model("rs-mini", weights=ten_classes)


def test_weights_of_other_depth_name_the_first_extra_or_missing_tensor(timm_checkpoint):
    name, reference, _ = timm_checkpoint
    other = "rs-101" if name == "rs-50" else "rs-50"
    key = "'layer3.6.conv1.weight'"
    problem = f"{key} is missing" if name == "rs-50" else f"unexpected tensor {key}"
    with pytest.raises(WeightsError, match=re.escape(problem)):
        create_model(other, weights=reference.state_dict())


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="rs-mini.*rs-420"):
        create_model("rs-9000")


def test_every_block_starts_as_identity_through_zero_initialised_last_bn():
    blocks = [m for m in create_model("rs-tiny").modules() if isinstance(m, Bottleneck)]
    assert blocks and all(torch.all(b.bn3.weight == 0) for b in blocks)


@pytest.mark.parametrize("name", list_models())
def test_stochastic_depth_is_the_official_per_stage_schedule(name: str):
    # tensorflow/tpu resnet_rs: each stage's blocks share init_rate * (stage + 2) / 5.
    rate = get_config(name).drop_path_rate or 0.1
    # a sixteenth of the width: the same blocks per stage, built in a moment
    model = create_model(name, num_classes=10, drop_path_rate=rate, width=1 / 16)
    for stage, blocks in enumerate(get_config(name).stage_depths):
        layer = getattr(model, f"layer{stage + 1}")
        assert [b.drop_path.rate for b in layer] == [pytest.approx(rate * (stage + 2) / 5)] * blocks


def test_stochastic_depth_acts_only_in_training():
    model = create_model("rs-tiny", num_classes=10, drop_rate=0.0, drop_path_rate=0.4)

    drop = DropPath(0.5).train()
    x = torch.ones(1000, 4)
    kept = drop(x)[:, 0]
    assert set(kept.unique().tolist()) == {0.0, 2.0} and 0.4 < (kept > 0).float().mean() < 0.6
    assert torch.equal(drop.eval()(x), x)

    _randomise_batchnorm(model)  # give the residual branches something to drop
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x))


def test_models_table_measures_params_and_paper_flops():
    rows = models_table(["rs-50", "rs-mini"])
    rs50 = rows[0]
    assert rs50["params_m"] == 35.7 and rs50["gflops"] == pytest.approx(4.56, abs=0.01)
    assert (rs50["train_size"], rs50["eval_size"], rs50["randaugment"]) == (160, 160, 10)
    assert rows[1]["layers"] == "1-1-2-1"
    text = format_table(rows)
    assert "rs-50" in text and "rs-mini" in text and len(text.splitlines()) == 4
    assert set(list_models()) >= set(PAPER_MODELS) | {"rs-mini", "rs-tiny"}


# (size, dropout_rate, drop_connect_rate, randaug_magnitude) of the official ResNet-RS configs,
# tensorflow/tpu models/official/resnet/resnet_rs/configs/resnetrsN_iSIZE.yaml.
OFFICIAL = {
    "rs-50": (160, 0.25, 0.0, 10),
    "rs-101": (192, 0.25, 0.0, 15),
    "rs-152": (256, 0.25, 0.0, 15),
    "rs-200": (256, 0.25, 0.1, 15),
    "rs-270": (256, 0.25, 0.1, 15),
    "rs-350": (256, 0.25, 0.1, 15),
    "rs-420": (320, 0.4, 0.1, 15),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_table_recipe_is_the_official_config(name: str):
    cfg = get_config(name)
    recipe = (cfg.size, cfg.drop_rate, cfg.drop_path_rate, cfg.randaugment_magnitude)
    assert recipe == OFFICIAL[name]


def _digits() -> tuple[torch.Tensor, ...]:
    """The 8x8 digits, bicubic-upscaled to rs-mini's 32 px and made 3-channel."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=32, mode="bicubic", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(digits.target)
    train, held_out = train_test_split(
        torch.arange(len(y)), test_size=500, stratify=digits.target, random_state=0
    )
    return x[train], y[train], x[held_out], y[held_out]


def test_rs_mini_learns_digits_to_90_percent_held_out():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = _digits()
    model = create_model("rs-mini", num_classes=10)
    epochs, batch = 5, 64
    steps = epochs * -(-len(y_train) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train)).split(batch):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9
