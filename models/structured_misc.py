"""PyTorch reference modules for the U-Net, Flatten/Reshape → Gemm MLP and grouped-conv golden models.

Imported lazily by :mod:`models.structured` (imports torch at top level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .structured_cnn import conv_bn


class ConvBnReLU(nn.Sequential):
    """``Conv`` (bias-free) → unfused ``BatchNormalization`` → ``Relu``."""

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int | None = None) -> None:
        pad = k // 2 if padding is None else padding
        super().__init__(nn.Conv2d(cin, cout, k, 1, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Two-level U-Net: encoder (Conv+BN+ReLU ×2, MaxPool) ×2, bottleneck Conv+BN+ReLU, decoder
    ConvTranspose (stride 2, bias) → Concat skip on channels → Conv+BN+ReLU; the last decoder Conv
    is preceded by an explicit ``Pad``; a final 1×1 Conv to 2 channels is the graph output."""

    def __init__(self, c: int = 16, out: int = 2) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(ConvBnReLU(3, c), ConvBnReLU(c, c))
        self.enc2 = nn.Sequential(ConvBnReLU(c, 2 * c), ConvBnReLU(2 * c, 2 * c))
        self.bottleneck = ConvBnReLU(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = ConvBnReLU(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = ConvBnReLU(2 * c, c, padding=0)
        self.out = nn.Conv2d(c, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        h = self.bottleneck(F.max_pool2d(s2, 2))
        h = self.dec2(torch.cat([self.up2(h), s2], 1))
        h = torch.cat([self.up1(h), s1], 1)
        return self.out(self.dec1(F.pad(h, (1, 1, 1, 1))))


class StructuredMLP(nn.Module):
    """Conv+BN+ReLU → [N, 8, 4, 4] → Flatten (or Reshape) → Gemm 128→64 → Relu → MatMul 64→32 + Add
    bias → Mul by a per-feature constant [32] → Relu → Gemm 32→10."""

    def __init__(self, reshape: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(128, 64)
        self.w2 = nn.Parameter(torch.randn(64, 32) * (2.0 / 64) ** 0.5)
        self.b2 = nn.Parameter(torch.randn(32) * 0.1)
        self.register_buffer("scale", torch.rand(32) + 0.5)
        self.fc3 = nn.Linear(32, 10)
        self.reshape = reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = x.reshape(-1, 128) if self.reshape else torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu((x @ self.w2 + self.b2) * self.scale)
        return self.fc3(x)


class Grouped(nn.Module):
    """Conv+BN+ReLU → Sub/Div by per-channel constants [1, C, 1, 1] → grouped Conv (groups=4) → ReLU
    → Add per-channel constant → AveragePool → Sigmoid gate (``h * sigmoid(conv1x1(h))``) → Mul by a
    per-channel constant → Conv."""

    def __init__(self, c: int = 32, out: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn(3, c, 3)
        self.register_buffer("mean", torch.randn(1, c, 1, 1) * 0.1)
        self.register_buffer("std", torch.rand(1, c, 1, 1) + 0.5)
        self.grouped = nn.Conv2d(c, c, 3, 1, 1, groups=4)
        self.register_buffer("shift", torch.randn(1, c, 1, 1) * 0.1)
        self.gate = nn.Conv2d(c, c, 1)
        self.register_buffer("scale", torch.rand(1, c, 1, 1) + 0.5)
        self.out = nn.Conv2d(c, out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (F.relu(self.stem(x)) - self.mean) / self.std
        h = F.avg_pool2d(F.relu(self.grouped(h)) + self.shift, 2)
        h = h * torch.sigmoid(self.gate(h)) * self.scale
        return self.out(h)
