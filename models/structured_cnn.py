"""PyTorch reference modules for the ResNet, MobileNetV3 and C2f structured-pruning golden models.

Imported lazily by :mod:`models.structured` (this module imports torch at top level, so
``import models`` stays torch-free). Each module documents the channel structure it
exercises; the ONNX export and the seeded weight randomisation live in ``structured``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free ``Conv`` (same padding) followed by an unfused ``BatchNormalization``."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block: Conv+BN+ReLU → Conv+BN, residual Add, ReLU.

    With ``stride > 1`` or a channel change the shortcut is a strided 1×1 Conv+BN, so the Add
    couples the output channels of ``conv2`` and ``shortcut`` (not of the block input).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """Stem Conv+BN+ReLU (optionally 7×7/2 + MaxPool), stages of basic blocks, GAP → Flatten → Gemm.

    ``stages`` is a sequence of ``(width, blocks, stride)``; the first block of a stage carries
    the stride (and a 1×1 Conv+BN shortcut when the shape changes).
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int]],
        stem_width: int,
        imagenet_stem: bool = False,
        classes: int = 10,
    ) -> None:
        super().__init__()
        k, s = (7, 2) if imagenet_stem else (3, 1)
        self.stem = conv_bn(3, stem_width, k, s)
        self.pool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        blocks: list[nn.Module] = []
        cin = stem_width
        for width, n, stride in stages:
            for i in range(n):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.pool(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    """GlobalAveragePool → 1×1 Conv → act → 1×1 Conv → HardSigmoid → Mul with the block feature."""

    def __init__(self, c: int, squeeze: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1×1 expand Conv+BN+act, depthwise 3×3 Conv+BN+act, SE, 1×1 project Conv+BN.

    The residual Add is present when ``stride == 1`` and ``cin == cout``.
    """

    def __init__(
        self, cin: int, exp: int, cout: int, stride: int, acts: tuple[nn.Module, nn.Module, nn.Module]
    ) -> None:
        super().__init__()
        self.expand, self.act1 = conv_bn(cin, exp, 1), acts[0]
        self.dw, self.act2 = conv_bn(exp, exp, 3, stride, groups=exp), acts[1]
        self.se = SqueezeExcite(exp, exp // 4, acts[2])
        self.project = conv_bn(exp, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.dw(self.act1(self.expand(x))))
        h = self.project(self.se(h))
        return x + h if self.residual else h


class MobileNetV3(nn.Module):
    """Stem Conv+BN+HardSwish, a residual SE block (HardSwish), a strided SE block (PRelu, ReLU6 =
    Clip, LeakyRelu in the SE), head 1×1 Conv + HardSwish, GAP → Flatten → Gemm."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.stem_act = nn.Hardswish()
        self.block1 = InvertedResidual(16, 64, 16, 1, (nn.Hardswish(), nn.Hardswish(), nn.ReLU()))
        self.block2 = InvertedResidual(16, 48, 24, 2, (nn.PReLU(48), nn.ReLU6(), nn.LeakyReLU(0.1)))
        self.head = nn.Conv2d(24, 64, 1)
        self.head_act = nn.Hardswish()
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem_act(self.stem(x))))
        x = self.head_act(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvBnSiLU(nn.Module):
    """YOLO ``Conv``: Conv+BN+SiLU, SiLU exported as ``Sigmoid`` + ``Mul``."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv_bn(cin, cout, k, stride)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    """Two 3×3 ConvBnSiLU with a residual Add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2fNet(nn.Module):
    """Stem, YOLOv8 C2f (Split → bottlenecks → Concat of all parts), SPPF (MaxPool ×3 → Concat),
    channel Slice ``x[:, :c]`` → nearest Resize ×2 → 1×1 Conv head."""

    def __init__(self, c: int = 32, n: int = 2, out: int = 8) -> None:
        super().__init__()
        self.stem = ConvBnSiLU(3, c, 3)
        self.cv1 = ConvBnSiLU(c, c)
        self.m = nn.ModuleList(Bottleneck(c // 2) for _ in range(n))
        self.cv2 = ConvBnSiLU((2 + n) * c // 2, c)
        self.sppf_cv1 = ConvBnSiLU(c, c // 2)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.sppf_cv2 = ConvBnSiLU(2 * c, c)
        self.head = nn.Conv2d(c // 2, out, 1)
        self.half = c // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(self.stem(x))
        parts = list(torch.split(x, [self.half, self.half], dim=1))
        for m in self.m:
            parts.append(m(parts[-1]))
        x = self.cv2(torch.cat(parts, 1))
        y1 = self.sppf_cv1(x)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        x = self.sppf_cv2(torch.cat([y1, y2, y3, self.pool(y3)], 1))
        x = F.interpolate(x[:, : self.half], scale_factor=2.0, mode="nearest")
        return self.head(x)
