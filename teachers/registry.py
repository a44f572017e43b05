"""The model table: the ResNet-RS family as rows, and any timm model by name.

A row says how to build its model, where its classifier is, how to preprocess for it and
its recipe defaults, as data; `create_model` builds any row, so the trainer, the labeler,
run directories and `--init` treat every family alike. `timm:NAME` (any architecture timm
knows, with an optional `.tag`) is a row made on demand from timm's own pretrained config
for that name: its eval resolution, crop, interpolation, mean and std are what
`timm.data.resolve_data_config` gives, so it labels as timm's own eval transform would.
The rules below that belong to ResNet-RS (RandAugment by size, its stochastic-depth schedule)
apply to its rows only.


Every recipe number a stage needs (resolutions, crop, dropout, stochastic depth, RandAugment
magnitude) lives in `MODELS`, read by the trainer, the labeler and `pipeline models` alike;
adding a member is one row and never touches the model code. Numbers are those of the
official ResNet-RS configs (tensorflow/tpu, models/official/resnet/resnet_rs/configs):
train resolution = eval resolution; dropout 0.25, and 0.4 at 320 px (RS-350 and RS-420);
stochastic depth 0.1 from RS-200 up, per stage as the official code schedules it
(`resnet_rs.stage_drop_path_rate`); RandAugment 10 at 160 px and below and 15 above, a rule of
the training resolution on the TF reference's scale (`students.randaugment`). RS-350 is listed at 256 px; its 320-px
config raises dropout to 0.4 (`image_size: 320`, `dropout: 0.4` in a recipe). The eval crop pads 32 px like the official ResNet-RS eval (resize
to size + 32, center-crop size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from torch import nn

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.teachers.resnet_rs import ResNetRS, scale_depth
from rs_pseudolabel.teachers.weights import WeightsSource, apply_weights, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RS50_LAYERS = (3, 4, 6, 3)
# Images per forward and backward at the train resolution that fit a 40 GiB GPU in bf16:
# from activation memory measured on a CPU by bench/bench_micro.py (BENCHMARKS.md). The
# small members train on CPUs, whole batches (0).
MICRO = {
    "rs-50": 464,
    "rs-101": 232,
    "rs-152": 120,
    "rs-200": 88,
    "rs-270": 64,
    "rs-350": 48,
    "rs-420": 32,
}


def randaugment_magnitude_at(size: int) -> int:
    """The official configs' RandAugment magnitude for a training resolution (10 at 160 px
    and below, 15 above), on the TF reference's scale: a rule of the size, not of the model,
    so RS-101 trained at 160 px gets RS-50's 10."""
    return 10 if size <= 160 else 15


TIMM_PREFIX = "timm:"
# RandAugment magnitude of timm rows at every size: timm's recipes' `rand-m9` (both scales
# divide by 10), since the size rule above is ResNet-RS's.
TIMM_RANDAUGMENT = 9


class _OneSize:
    """A row trained and evaluated at one resolution, `size` (the paper's rule, and timm's
    pretrained configs')."""

    size: int

    @property
    def train_size(self) -> int:
        return self.size

    @property
    def eval_size(self) -> int:
        return self.size


@dataclass(frozen=True)
class ModelConfig(_OneSize):
    """One member of the family: its architecture and the recipe it is trained and run with."""

    family = "resnet-rs"
    classifier = "fc"  # the classifier's module: its weight's rows are the classes

    name: str
    layers: tuple[int, int, int, int]
    size: int  # train and eval resolution (the paper trains and evaluates at the same size)
    depth: float = 1.0  # multiplier on `layers`
    width: float = 1.0  # multiplier on every channel count
    crop_padding: int = 32  # eval: resize to size + padding, center-crop size
    drop_rate: float = 0.25
    drop_path_rate: float = 0.0
    micro_batch: int = 0  # images per forward and backward that fit a 40 GiB GPU (bench_micro)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    timm_name: str | None = None  # the timm model whose state dicts load as they are

    @property
    def randaugment_magnitude(self) -> int:
        return randaugment_magnitude_at(self.size)

    def randaugment_magnitude_at(self, size: int) -> int:
        return randaugment_magnitude_at(size)

    @property
    def crop_pct(self) -> float:
        return self.crop_pct_at(self.size)

    def crop_pct_at(self, size: int) -> float:
        """The center crop's share at an eval size: the image resized to size + padding."""
        return size / (size + self.crop_padding)

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage as built, after the depth multiplier."""
        return scale_depth(self.layers, self.depth)

    def build(self, num_classes: int, image_size: int | None = None, **overrides) -> nn.Module:
        """The model; `overrides` (e.g. `drop_path_rate=0.2`) go to `ResNetRS` over the
        table's values. Convolutional all through, it takes any `image_size` as built."""
        arch = dict(
            layers=self.layers,
            depth=self.depth,
            width=self.width,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
        )
        return ResNetRS(num_classes=num_classes, **(arch | overrides))


@dataclass(frozen=True)
class TimmConfig(_OneSize):
    """A timm architecture as a row: built by `timm.create_model(arch, pretrained=False)`
    (weights come from `--weights` or a run directory, never a download), preprocessed as
    timm's pretrained config for `name` says, with no regularisation unless a recipe sets
    `dropout` / `stochastic_depth` (timm's `drop_rate` / `drop_path_rate`)."""

    name: str  # timm:ARCH[.TAG]
    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: str
    fixed_input_size: bool  # position embeddings and the like: built for one image size
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    family = "timm"

    @property
    def micro_batch(self) -> int:
        """Images per forward and backward that fit a 40 GiB GPU at the train size, measured
        as bench/bench_micro.py measured the ResNet-RS rows (teachers.micro), when first
        asked: a CPU forward of 2 images."""
        return _timm_micro_batch(self.name)

    @property
    def arch(self) -> str:
        return self.name.removeprefix(TIMM_PREFIX).split(".", 1)[0]

    @property
    def randaugment_magnitude(self) -> int:
        return TIMM_RANDAUGMENT

    def randaugment_magnitude_at(self, size: int) -> int:
        return TIMM_RANDAUGMENT

    def crop_pct_at(self, size: int) -> float:
        """timm's crop share is one number for every size."""
        return self.crop_pct

    def build(self, num_classes: int, image_size: int | None = None, **overrides) -> nn.Module:
        """The model with random weights; built for `image_size` where the architecture's
        shapes depend on it (a ViT's position embeddings), else size-agnostic."""
        import timm

        kwargs = {"drop_rate": self.drop_rate, "drop_path_rate": self.drop_path_rate}
        if self.fixed_input_size and image_size not in (None, self.size):
            kwargs["img_size"] = image_size
        return timm.create_model(
            self.arch, pretrained=False, num_classes=num_classes, **(kwargs | overrides)
        )


@cache
def timm_config(name: str) -> TimmConfig:
    """The row of `timm:ARCH[.TAG]`, from timm's pretrained config for it (timm's defaults
    where it has none): one line for a name timm does not know or a preprocessing the
    labeler cannot reproduce."""
    import timm
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    model = name.removeprefix(TIMM_PREFIX)
    arch = model.split(".", 1)[0]
    if not model or not timm.is_model(arch):
        raise UsageError(
            f'unknown timm model {model!r}: python -c "import timm; '
            f"print(timm.list_models('*{arch[:6]}*'))\" lists the names"
        )
    try:
        pretrained = get_pretrained_cfg(model)
    except RuntimeError:  # a tag timm does not have for this architecture
        raise UsageError(f"timm has no pretrained config {model!r}") from None
    cfg = pretrained.to_dict() if pretrained is not None else {}
    data = resolve_data_config(pretrained_cfg=cfg)
    _, height, width = data["input_size"]
    if height != width:
        raise UsageError(f"{name} takes {height}x{width} images: only square inputs are supported")
    if data.get("crop_mode", "center") != "center":
        raise UsageError(
            f"{name}'s eval crop is timm's {data['crop_mode']!r} mode: only 'center' is supported"
        )
    classifier = cfg.get("classifier") or "head"
    return TimmConfig(
        name=f"{TIMM_PREFIX}{model}",
        size=height,
        crop_pct=float(data["crop_pct"]),
        interpolation=data["interpolation"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        classifier=classifier if isinstance(classifier, str) else classifier[0],
        fixed_input_size=bool(cfg.get("fixed_input_size", False)),
    )


@cache
def _timm_micro_batch(name: str) -> int:
    from rs_pseudolabel.teachers.micro import measured_micro_batch

    cfg = timm_config(name)
    return measured_micro_batch(cfg.build(1000), cfg.train_size)


ModelRow = ModelConfig | TimmConfig


def _paper(number: int, layers: tuple[int, int, int, int], size: int, **recipe) -> ModelConfig:
    return ModelConfig(f"rs-{number}", layers, size, timm_name=f"resnetrs{number}", **recipe)


def _small(name: str, size: int, depth: float, width: float, crop_padding: int = 32) -> ModelConfig:
    return ModelConfig(
        name,
        RS50_LAYERS,
        size,
        depth=depth,
        width=width,
        crop_padding=crop_padding,
    )


MODELS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        # Small members for CPUs: RS-50 scaled down along the paper's two axes. The 32 px ones
        # are sized for the embedded digits, which fill the frame: no crop padding.
        _small("rs-mini", 32, depth=0.25, width=0.25, crop_padding=0),
        _small("rs-tiny", 32, depth=0.5, width=0.5, crop_padding=0),
        _small("rs-small", 128, depth=1.0, width=0.5),
        _paper(50, RS50_LAYERS, 160, micro_batch=MICRO["rs-50"]),
        _paper(101, (3, 4, 23, 3), 192, micro_batch=MICRO["rs-101"]),
        _paper(152, (3, 8, 36, 3), 256, micro_batch=MICRO["rs-152"]),
        _paper(200, (3, 24, 36, 3), 256, drop_path_rate=0.1, micro_batch=MICRO["rs-200"]),
        _paper(270, (4, 29, 53, 4), 256, drop_path_rate=0.1, micro_batch=MICRO["rs-270"]),
        _paper(350, (4, 36, 72, 4), 256, drop_path_rate=0.1, micro_batch=MICRO["rs-350"]),
        _paper(
            420, (4, 44, 87, 4), 320, drop_rate=0.4, drop_path_rate=0.1, micro_batch=MICRO["rs-420"]
        ),
    )
}


def list_models() -> list[str]:
    """The table's own rows; any timm model joins by name (`timm:NAME`)."""
    return list(MODELS)


def is_model_name(name: str) -> bool:
    """A row of the table or a timm name (not checked against timm here)."""
    return name in MODELS or name.startswith(TIMM_PREFIX)


def get_config(name: str) -> ModelRow:
    if name.startswith(TIMM_PREFIX):
        return timm_config(name)
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(
            f"unknown model {name!r}; known: {', '.join(MODELS)}, or timm:NAME for any timm model"
        ) from None


def create_model(
    name: str,
    num_classes: int = 1000,
    weights: WeightsSource | None = None,
    image_size: int | None = None,
    **overrides,
) -> nn.Module:
    """Build a row of the table, optionally with weights (a .safetensors/.pth/.pt path or
    URL, or a mapping, in the layout of the row's builder: timm's, or the project's).

    `image_size`: the size it is trained at, for architectures built for one size;
    `overrides` go to the builder over the table's values, e.g. `drop_path_rate=0.2`: the
    regularisation rates do not change any tensor, so weights load regardless.
    """
    model = get_config(name).build(num_classes, image_size, **overrides)
    if weights is not None:
        apply_weights(model, read_weights(weights), f"{name} with {num_classes} classes")
    return model
