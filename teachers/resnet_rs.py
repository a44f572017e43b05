"""ResNet-RS (Bello et al. 2021): a ResNet-D with squeeze-excitation, scaled in depth and width.

Parameter names and shapes follow timm's `resnetrs*` models, so their state dicts load with
`strict=True` and no renaming: the stem keeps the names `conv1`/`bn1`/`maxpool` although the
max-pool is a strided convolution here, the shortcut's pool/conv/bn sit at `downsample.0/1/2`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = (64, 128, 256, 512)
STEM_WIDTH = 32
EXPANSION = 4
SE_RATIO = 0.25


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of `divisor` (hardware-friendly widths), never
    dropping below `round_limit` of the asked value; timm's rule, so shapes agree with it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def scale_depth(layers: tuple[int, ...], depth: float) -> tuple[int, ...]:
    """Blocks per stage after the depth multiplier, rounded half up, at least one per stage."""
    return tuple(max(1, int(n * depth + 0.5)) for n in layers)


class DropPath(nn.Module):
    """Stochastic depth: drop a block's residual branch for whole samples while training, and
    scale the survivors so the expected output equals the eval-mode output."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled statistics; ResNet-RS puts it on every block."""

    def __init__(self, channels: int, ratio: float = SE_RATIO) -> None:
        super().__init__()
        reduced = make_divisible(channels * ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)), inplace=True))
        return x * gate.sigmoid()


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand, squeeze-excitation, then the shortcut.

    The shortcut of a block that changes shape is ResNet-D's: average-pool first, then a 1x1
    conv, so no activations are skipped by a strided 1x1 conv.
    """

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        out_chs = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.se = SqueezeExcite(out_chs)
        self.drop_path = DropPath(drop_path)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            pool = (
                nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                if stride != 1
                else nn.Identity()
            )
            self.downsample = nn.Sequential(
                pool, nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.se(self.bn3(self.conv3(x)))
        return F.relu(self.drop_path(x) + shortcut, inplace=True)


def _conv_bn_relu(in_chs: int, out_chs: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    ]


def stage_drop_path_rate(rate: float, stage: int) -> float:
    """The official ResNet-RS schedule: one rate for all blocks of a stage, rising with the
    stage as `rate * (stage + 2) / 5` (0.04, 0.06, 0.08, 0.10 at 0.1), the stem counted as
    the first of five groups."""
    return rate * (stage + 2) / (len(BASE_CHANNELS) + 1)


class ResNetRS(nn.Module):
    """The whole family in one class: `layers` and `depth` set the blocks per stage, `width`
    scales every channel count (1.0 gives the paper's models)."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        depth: float = 1.0,
        width: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        stem = make_divisible(STEM_WIDTH * width)
        self.conv1 = nn.Sequential(
            *_conv_bn_relu(in_chans, stem, 2),
            *_conv_bn_relu(stem, stem, 1),
            nn.Conv2d(stem, stem * 2, 3, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(stem * 2)
        self.maxpool = nn.Sequential(*_conv_bn_relu(stem * 2, stem * 2, 2))

        in_chs = stem * 2
        depths = scale_depth(layers, depth)
        for stage, (blocks, base) in enumerate(zip(depths, BASE_CHANNELS, strict=True)):
            planes = make_divisible(base * width)
            rate = stage_drop_path_rate(drop_path_rate, stage)
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stage_blocks.append(Bottleneck(in_chs, planes, stride, rate))
                in_chs = planes * EXPANSION
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init for convs; the last BN of each block starts at zero so every residual block
        begins as the identity, which keeps very deep members trainable from step one."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout, classify; `pre_logits=True` stops before the classifier so a caller
        gets the embedding and the logits from one pass (see `get_classifier`)."""
        x = F.dropout(x.mean((2, 3)), p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
